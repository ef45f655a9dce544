"""The compiled one-token step (`ttt.decode_graph.compiled_step`, what `GraphedDecoder(compile=True)`
captures in its CUDA graphs) against the eager step, on CPU: every in-batch offset r (at most three
compilations whatever b is, shared by all blocks), TTT-Linear, TTT-MLP and Mamba; the fused
Triton step kernels traced without a graph break; argument errors. The GPU capture is in test_gpu.py."""
import pytest
import torch

from ttt.config import RunOptions, get_config
from ttt.decode_graph import GraphedDecoder, compiled_step, flatten_state, rebuild_state
from ttt.model import TTTLM


def _compare(mixer, backend, b, tol):
    """Decode b + 2 tokens from a prefill of 5 (every offset r, the commit, and r = 1 twice) both ways."""
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer=mixer, vocab_size=256, mini_batch=b)).eval()
    step = compiled_step(model, backend)
    ids = torch.randint(0, 256, (2, 5 + b + 2))
    with torch.inference_mode():
        _, s = model(ids[:, :5])
        buf = rebuild_state(s, [t.clone() for t in flatten_state(s)])  # written in place by `step`
        for t in range(5, ids.shape[1]):
            le, s = model(ids[:, t:t + 1], s)
            lc = step(ids[:, t:t + 1], buf)
            buf = rebuild_state(buf, flatten_state(buf), pos=buf.pos + 1)
            torch.testing.assert_close(lc, le, rtol=tol, atol=tol)
            for x, y in zip(flatten_state(buf), flatten_state(s), strict=True):
                torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _counting(backend_name, graphs):
    from torch._dynamo.backends.registry import lookup_backend
    inner = lookup_backend(backend_name)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)
    return backend


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_mlp", "mamba"])
def test_compiled_step_equals_eager_every_offset(mixer):
    # aot_eager: Dynamo + functionalization (the in-place state writes), no code generation: fast
    graphs = []
    b = 5
    torch._dynamo.reset()  # Dynamo remembers which ints changed per code name in this process (test order)
    _compare(mixer, _counting("aot_eager", graphs), b, 1e-6)
    # graphs shared by both blocks (the head runs eagerly in the model's own step), not one per offset: the first
    # offset as a constant, then r symbolic, and the TTT layers' committing offset (a Python branch) on its own
    model = TTTLM(get_config("debug", mixer=mixer, vocab_size=256, mini_batch=b))
    assert model.decode_period == (b if mixer != "mamba" else 1) and model.static_decode_state
    assert len(graphs) == {"ttt_linear": 3, "ttt_mlp": 3, "mamba": 1}[mixer]


def test_compiled_step_traces_before_any_eager_call():
    """A fresh model decides its layers' backends (and logs the choice) outside the traced step: deciding inside
    it would break the graph. compiled_step has the model prepare first."""
    model = TTTLM(get_config("debug", vocab_size=256, mini_batch=1)).eval()
    with torch.inference_mode():
        s = model.init_state(2)
        s = rebuild_state(s, [t.detach().clone() for t in flatten_state(s)])
        compiled_step(model, "eager")(torch.zeros(2, 1, dtype=torch.long), s)  # fullgraph: raises on a break


def test_compiled_step_refreshes_merged_weights():
    """compiled_step on a model with merged decode weights (SwiGLU's gate and up here; `merge_decode_weights`) == an
    unmerged copy's eager steps, also after a weight changes in place between two tokens: the step rewrites the
    copy outside its trace, which reads it as it is."""
    import copy
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer="ttt_linear", vocab_size=256, mini_batch=4)).eval()
    ref = copy.deepcopy(model)
    model.merge_decode_weights()
    step = compiled_step(model, "aot_eager")
    ids = torch.randint(0, 256, (2, 10))
    with torch.inference_mode():
        _, s = ref(ids[:, :5])
        buf = rebuild_state(s, [t.clone() for t in flatten_state(s)])
        for t in range(5, 10):
            if t == 7:
                for m in (model, ref):
                    m.blocks[0].ffn.up.weight.mul_(1.2)
            le, s = ref(ids[:, t:t + 1], s)
            lc = step(ids[:, t:t + 1], buf)
            buf = rebuild_state(buf, flatten_state(buf), pos=buf.pos + 1)
            torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5, msg=f"token {t}")
        # merging again (a second decoder) keeps the copies the compiled step reads: no recompilation
        copies = [blk.ffn.merged for blk in model.blocks]
        model.merge_decode_weights()
        assert [blk.ffn.merged for blk in model.blocks] == copies
        with torch.compiler.set_stance("fail_on_recompile"):
            step(ids[:, 9:10], buf)


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_mlp"])
def test_compiled_step_inductor_equals_eager(mixer):
    """Inductor's code for every offset of b = 4: r a constant in the first graph, symbolic in the next (its
    kernels take it at run time), the commit."""
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    _compare(mixer, "inductor", 4, 1e-5)
    assert counters["stats"]["unique_graphs"] - graphs <= 3


def _traceable_kernels(monkeypatch, mod):
    """Dynamo told that Triton works on this GPU-less machine: `mod`'s kernels (and the shared helpers), built for
    the interpreter (test_triton.py), rebuilt as jitted kernels it can trace."""
    import triton
    from torch.utils import _triton as torch_triton
    from triton.runtime.interpreter import InterpretedFunction

    from ttt.ops import triton_utils
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for m in (mod, triton_utils):
        for name, f in list(vars(m).items()):
            if isinstance(f, InterpretedFunction):
                monkeypatch.setattr(m, name, triton.jit(f.fn))
    monkeypatch.setattr(torch_triton, "has_triton", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets backend="triton" accept CPU tensors


@pytest.mark.parametrize("kind", ["linear", "mlp", "linear+fused"])
def test_triton_step_kernel_traces_without_graph_break(monkeypatch, kind):
    """Dynamo takes the fused step kernel's launch (and the LAST bookkeeping) into one graph (fullgraph); with the
    fused layer kernels (linear+fused), the fused decode kernel's launch. From the second offset on, the position
    is an input of the graph (symbolic: the kernels take it at run time), so offsets share a graph.
    No GPU here: Dynamo is told Triton works, and the compiled function raises instead of running."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU, test_gpu.py compiles and runs the real kernels")
    pytest.importorskip("triton")
    import ttt.ops.triton_backend  # noqa: F401  (imports both step modules)
    if kind == "linear":
        from ttt.ops.ttt_linear import step_triton as mod
    elif kind == "linear+fused":
        from ttt.ops import fused_layer as mod
    else:
        from ttt.ops.ttt_mlp import step_triton as mod
    _traceable_kernels(monkeypatch, mod)

    class Traced(Exception):
        pass
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Traced
        return run

    def trace(mark=lambda model, s: s, merge=False):
        graphs.clear()
        model = TTTLM(get_config("debug", mixer=f"ttt_{kind.split('+')[0]}", vocab_size=256, mini_batch=4),
                      RunOptions(ttt_backend="triton", fused_layer=kind.endswith("+fused"))).eval()
        model.merge_decode_weights(merge)
        step = compiled_step(model, backend)
        with torch.inference_mode():
            s = model.init_state(2)
            for r in (3, 0, 1, 2):  # the commit first, then three offsets inside a mini-batch
                s = mark(model, rebuild_state(s, [t.detach().clone() for t in flatten_state(s)], pos=r))
                with pytest.raises(Exception) as e:
                    step(torch.zeros(2, 1, dtype=torch.long), s)
                assert isinstance(e.value.__cause__ or e.value, Traced) or "Traced" in str(e.value), e.value
        return list(graphs)

    def copies(g):
        return sum(1 for n in g.graph.nodes if "copy_" in str(n.target))
    if kind == "linear+fused":
        # a graphed decoder's buffers (owned, the TTT states in the rows form): the fused decode kernel writes the
        # new rows (and, on the commit, the weights) and the new Q/K conv window into them, and the block pre-conv's
        # window is pushed in place by its own kernel, so the step copies four (six) tensors fewer back than a
        # plain state's step: none
        def owned(model, s):
            s = model.decode_state(s)
            return rebuild_state(s, flatten_state(s), owned=True)
        owned_graphs = trace(owned)
        plain = trace()
        assert [copies(g) for g in plain] == [6] + [4] * (len(plain) - 1)
        assert len(owned_graphs) >= 2 and all(copies(g) == 0 for g in owned_graphs)
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        for g in owned_graphs:  # the decode kernel and the window push, nothing else
            names = sorted(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in g.graph.nodes
                           if "triton_kernel_wrapper" in str(n.target))
            assert names == ["_linear_decode_kernel", "_window_push_kernel"], names
        # merged decode weights: one GEMM for qk, v, gate and lr, one for SwiGLU's gate and up (8 -> 4 per block)
        gemms = lambda g: sum(1 for n in g.graph.nodes if "linear" in str(n.target))  # noqa: E731
        merged = trace(merge=True)
        assert [gemms(g) for g in merged] == [gemms(g) - 4 for g in plain] and gemms(plain[0]) == 8
    graphs = trace()
    assert len(graphs) <= 3  # the commit, r = 0 as a constant, then r symbolic (r = 2 reuses it)
    for g in graphs:
        launches = [n for n in g.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        assert len(launches) == 1
        if kind == "linear+fused":  # the one launch is the fused decode kernel (no separate step kernel)
            from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
            assert kernel_side_table.get_kernel(launches[0].kwargs["kernel_idx"]).fn.__name__ == "_linear_decode_kernel"
    assert any("pos" in n.name for n in graphs[-1].graph.nodes if n.op == "placeholder")


def test_owned_decode_step_writes_in_place_after_inductor(monkeypatch):
    """The graphed decoder's compiled step as on CUDA (fused layer, the block pre-conv's 4-tap sum under compile,
    owned buffers), through Inductor's graph passes up to the reinplacing of the kernels' functional launches: the
    window push writes the window in place (no clone in and copy back). Fails when the window push does not
    depend on the conv output (Inductor moves the window's reads after the push, 1.3b on the H200: two extra
    kernels per block). No GPU here: Triton's driver is stubbed for sm_90 so that torch can read which arguments each
    kernel stores to (where an earlier interpreted run leaves Triton unable to, torch takes every argument as
    written: only the window is asserted on), and the compile stops before code generation."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU, test_gpu.py compiles and runs the real kernels")
    triton = pytest.importorskip("triton")
    from torch._inductor.fx_passes import post_grad
    from triton.backends.compiler import GPUTarget

    from ttt.layers.conv import CausalConv1d
    from ttt.ops import fused_layer
    _traceable_kernels(monkeypatch, fused_layer)

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
    monkeypatch.setattr(triton.runtime.driver, "_active", Sm90(), raising=False)
    monkeypatch.setattr(CausalConv1d, "_decide", lambda self, device, dtype: True)  # CUDA's choice: the kernels

    class Passed(Exception):
        pass
    graphs = []

    def after_reinplace(graph):  # Inductor's next pass: the graph the functional launches are lowered from
        graphs.append(graph)
        raise Passed
    monkeypatch.setattr(post_grad, "decompose_triton_kernel_wrapper_functional", after_reinplace)
    model = TTTLM(get_config("debug", mixer="ttt_linear", vocab_size=256, mini_batch=4),
                  RunOptions(ttt_backend="triton", fused_layer=True)).eval()
    for m in model.modules():
        if isinstance(m, CausalConv1d) and m.width == 4 and m.channels == model.cfg.d_model:
            m.backend = "auto"  # the block pre-conv as fused_layer=None (the default) makes it on CUDA
    model.merge_decode_weights(True)  # as the graphed decoder does
    step = compiled_step(model, "inductor")
    with torch.inference_mode():
        s = model.init_state(2)
        s = rebuild_state(model.decode_state(s), [t.detach().clone() for t in flatten_state(model.decode_state(s))],
                          pos=1, owned=True)
        with pytest.raises(Exception, match="Passed"):
            step(torch.zeros(2, 1, dtype=torch.long), s)
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    pushes = [n for n in graphs[0].nodes if "triton_kernel_wrapper_functional" in str(n.target)
              and kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ == "_window_push_kernel"]
    assert len(pushes) == 1 and "win_ptr" not in pushes[0].kwargs["tensors_to_clone"]
    win = pushes[0].kwargs["kwargs"]["win_ptr"]
    assert win.op == "placeholder" and not [n for n in win.users if "copy_" in str(n.target)]


def test_compile_arguments_are_checked():
    model = TTTLM(get_config("debug", vocab_size=256))
    with pytest.raises(ValueError, match="^compile: expected a bool or a torch.compile mode"):
        GraphedDecoder(model, model.init_state(1), compile="reduce-overhead")  # its own CUDA graphs
    with pytest.raises(ValueError, match="^warmup: expected an int >= 0"):
        GraphedDecoder(model, model.init_state(1), warmup=-1)
    with pytest.raises(ValueError, match="^merge: expected a bool or None"):
        GraphedDecoder(model, model.init_state(1), merge="yes")
    with pytest.raises(ValueError, match="^model: expected a TTTLM"):
        compiled_step(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="^model: expected a TTTLM"):
        GraphedDecoder(torch.nn.Linear(2, 2), model.init_state(1))
    attn = TTTLM(get_config("debug", mixer="attention", vocab_size=256))
    assert attn.decode_period == 1 and not attn.static_decode_state  # its KV cache grows
    with pytest.raises(ValueError, match="^model: CUDA-graph decode needs a fixed-size state"):
        GraphedDecoder(attn, attn.init_state(1))
    with pytest.raises(ValueError, match="^backend: expected a torch.compile backend"):
        compiled_step(model, backend=3)
    with pytest.raises(ValueError, match="^mode: expected one of"):
        compiled_step(model, mode="max-autotune")


def test_generate_compile_decode_is_checked():
    from ttt.generate import generate
    model = TTTLM(get_config("debug", vocab_size=256))
    with pytest.raises(ValueError, match="^compile_decode: expected a bool"):
        generate(model, [1, 2], 3, compile_decode=1)
    with pytest.raises(ValueError, match="^compile_decode: the compiled step is captured in CUDA graphs"):
        generate(model, [1, 2], 3, compile_decode=True)  # a CPU model: no graphs
    with pytest.raises(ValueError, match="^merge_weights: expected a bool or None"):
        generate(model, [1, 2], 3, merge_weights="yes")
    with pytest.raises(ValueError, match="^merge_weights: the merged weights serve the CUDA-graphed decoder"):
        generate(model, [1, 2], 3, merge_weights=True)
    assert len(generate(model, [1, 2], 3, merge_weights=False)) == 3  # off needs no graphs
