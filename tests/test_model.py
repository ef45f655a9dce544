"""The LM as a whole: teacher-forced decoding == full forward for every mixer and backbone (rung 5 of
the test ladder), chunked evaluation carrying state == one pass, preset parameter counts against the
paper's, and input validation."""
from __future__ import annotations

import pytest
import torch

from ttt.config import EXECUTION_FIELDS, ModelConfig, RunOptions, get_config
from ttt.evaluate import evaluate_model
from ttt.model import TTTLM, BlockState, LMState

V, B, T, MB = 61, 2, 10, 4  # vocab, batch, sequence length, TTT mini-batch b

MODELS = [("ttt_linear", "mamba"), ("ttt_linear", "transformer"), ("ttt_mlp", "mamba"),
          ("ttt_mlp", "transformer"), ("attention", "transformer"), ("mamba", "transformer")]


def make_model(mixer, backbone, seed=0):
    torch.manual_seed(seed)
    cfg = get_config("debug", mixer=mixer, backbone=backbone, vocab_size=V, mini_batch=MB)
    return TTTLM(cfg).double().eval()


def ids(seed=1, shape=(B, T)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mixer,backbone", MODELS, ids=[f"{m}-{b}" for m, b in MODELS])
@torch.no_grad()
def test_teacher_forced_decoding_equals_full_forward(mixer, backbone):
    model = make_model(mixer, backbone)
    x = ids()
    full, full_state = model(x)
    assert full.dtype == torch.float32 and full.shape == (B, T, V)
    for prompt_len in (1, MB - 1, MB + 1):  # before, at and after a mini-batch boundary
        logits, state = model(x[:, :prompt_len])  # prefill
        steps = [logits]
        for t in range(prompt_len, T):
            logits, state = model(x[:, t:t + 1], state)  # one-token decode steps
            steps.append(logits)
        got = torch.cat(steps, 1)
        assert state.pos == T
        torch.testing.assert_close(got, full, rtol=0, atol=1e-5, msg=f"prompt length {prompt_len}")
        torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(full, -1), rtol=0, atol=1e-5)


@torch.no_grad()
def test_decoding_depends_on_state():
    """Guards the test above: decoding from a fresh state must not reproduce the full forward."""
    model = make_model("ttt_linear", "mamba")
    x = ids()
    full, _ = model(x)
    fresh, _ = model(x[:, 5:6])
    assert (fresh[:, 0] - full[:, 5]).abs().max() > 1e-3


@pytest.mark.parametrize("mixer,backbone", [("ttt_linear", "mamba"), ("ttt_mlp", "transformer"),
                                            ("attention", "transformer"), ("mamba", "transformer")])
def test_chunked_evaluation_equals_one_pass(mixer, backbone):
    model = make_model(mixer, backbone)
    x = ids(2, (3, 23))
    one = evaluate_model(model, x, chunk_len=None, batch_size=3)
    assert one.shape == (22,) and one.dtype == torch.float64
    for chunk_len, batch_size in ((MB, 2), (7, 3), (1, 1), (100, 2)):
        got = evaluate_model(model, x, chunk_len=chunk_len, batch_size=batch_size)
        torch.testing.assert_close(got, one, rtol=0, atol=1e-6, msg=f"chunk_len={chunk_len}")


@pytest.mark.parametrize("size,expected", [("125m", 110.4e6), ("350m", 337.7e6), ("760m", 733.6e6),
                                           ("1.3b", 1285.6e6)])
def test_preset_parameter_counts_match_paper(size, expected):
    cfg = get_config(size, mixer="ttt_linear", backbone="mamba", vocab_size=32000)
    with torch.device("meta"):  # no memory, no init cost
        model = TTTLM(cfg)
    n = model.num_parameters()
    assert abs(n - expected) / expected < 0.02, f"{size}: {n / 1e6:.1f}M vs paper {expected / 1e6:.1f}M"


def test_parameter_count_excludes_embedding_once():
    model = TTTLM(get_config("debug", vocab_size=V))
    n = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == n
    assert model.num_parameters(exclude_embedding=True) == n - V * model.cfg.d_model


@pytest.mark.parametrize("bad", [torch.zeros(2, 3), torch.zeros(3, dtype=torch.long),
                                 torch.zeros(2, 0, dtype=torch.long), [[1, 2, 3]]])
def test_bad_ids_raise_value_error_naming_ids(bad):
    model = TTTLM(get_config("debug", vocab_size=V))
    with pytest.raises(ValueError, match="ids"):
        model(bad)


@pytest.mark.parametrize("mixer,backbone", MODELS, ids=[f"{m}-{b}" for m, b in MODELS])
@torch.no_grad()
def test_state_is_typed_and_counts_tokens_once(mixer, backbone):
    """One BlockState per block (the pre-conv window and the mixer's own state), no position beside the
    mixers' own; an untyped per-block state is refused."""
    import dataclasses
    model = make_model(mixer, backbone)
    _, state = model(ids())
    assert [f.name for f in dataclasses.fields(state)] == ["blocks"]
    assert all(isinstance(b, BlockState) and b.pos == T for b in state.blocks) and state.pos == T
    assert (state.blocks[0].conv is not None) == (backbone == "mamba" and mixer.startswith("ttt"))
    _, state = model(ids(shape=(B, 3)), state)
    assert state.pos == T + 3
    with pytest.raises(ValueError, match="^state: expected an LMState"):
        model(ids(), LMState([(b.conv, b.mixer) for b in state.blocks]))


def test_state_of_another_model_is_rejected():
    model = TTTLM(get_config("debug", vocab_size=V))
    other = TTTLM(get_config("debug", vocab_size=V, n_layers=3))
    _, state = other(ids())
    with pytest.raises(ValueError, match="state"):
        model(ids(), state)


@pytest.mark.parametrize("mixer", ["ttt_linear", "attention"])
def test_grad_checkpointing_same_loss_and_grads(mixer):
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer=mixer, vocab_size=64, mini_batch=4)).double()
    ids = torch.randint(0, 64, (2, 11))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        logits, _ = model(ids)
        logits.logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mixer,backbone", MODELS, ids=[f"{m}-{b}" for m, b in MODELS])
def test_state_out_false_gives_no_state_and_the_same_loss_and_grads(mixer, backbone):
    """state_out=False (a training step's forward): None for the state, the loss and every gradient as with it,
    with and without gradient checkpointing."""
    model = make_model(mixer, backbone).train()
    x, y = ids(1), ids(2)
    runs = []
    for state_out, ckpt in ((True, False), (False, False), (False, True)):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        loss, state = model(x, targets=y, state_out=state_out)
        assert (state is None) == (not state_out)
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for run in runs[1:]:
        for a, e in zip(run, runs[0]):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_the_fused_layer_is_auto_by_default():
    """By default (RunOptions(), and a TTT layer or conv built alone) the fused layer kernels are auto: on where the
    op runs its triton backend on CUDA (tests/test_gpu.py checks that side); on the CPU the PyTorch layer path."""
    from ttt.layers.conv import CausalConv1d
    from ttt.layers.ttt import TTTLinear
    assert RunOptions().fused_layer is None
    model = TTTLM(get_config("debug", vocab_size=V, mini_batch=MB))
    assert all(b.mixer.fused is None and b.conv.backend == "auto" for b in model.blocks)
    assert not any(b.mixer.prepare(torch.device("cpu"), torch.float32).fused for b in model.blocks)
    assert TTTLinear(16, 2).fused is None and CausalConv1d(4).backend == "auto"


def test_run_options_are_apart_from_the_architecture():
    """RunOptions change how a model runs, never what it computes or what is saved; set_run_options switches a
    built model; the old ModelConfig fields still work, with a DeprecationWarning naming RunOptions."""
    cfg = get_config("debug", vocab_size=V, mini_batch=MB)
    assert not set(EXECUTION_FIELDS) & set(cfg.to_dict())
    assert ModelConfig.from_dict({**cfg.to_dict(), "ttt_backend": "triton", "fused_layer": True}) == cfg
    with pytest.raises(ValueError, match="^config: unknown fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "ttt_backnd": "dual"})
    with pytest.raises(ValueError, match="^ttt_backend: expected one of"):
        RunOptions(ttt_backend="fast")
    torch.manual_seed(0)
    model = TTTLM(cfg).double()
    x = ids()
    ref, _ = model(x)
    model.set_run_options(RunOptions(ttt_backend="naive"))
    assert all(b.mixer.prepare().op.backend == "naive" for b in model.blocks)
    got, _ = model(x)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="^run: expected a RunOptions"):
        TTTLM(cfg, run={"ttt_backend": "dual"})
    with pytest.warns(DeprecationWarning, match="RunOptions"):
        old = get_config("debug", vocab_size=V, ttt_backend="naive")
    assert TTTLM(old).blocks[0].mixer.backend == "naive" and "ttt_backend" not in old.to_dict()
    mamba = get_config("debug", mixer="mamba", vocab_size=V)
    with pytest.warns(DeprecationWarning, match="RunOptions"):
        mamba.mamba_backend = "torch"  # as scripts written before RunOptions do
    assert TTTLM(mamba).blocks[0].mixer.backend == "torch"
    assert TTTLM(mamba, RunOptions()).blocks[0].mixer.backend == "auto"  # an explicit run wins


def test_merged_decode_weights_equal_separate_and_follow_changes():
    """merge_decode_weights: one-token steps without gradients read SwiGLU's gate and up as one concatenated copy;
    the logits equal an unmerged copy's token by token, also after a weight changes in place between two tokens;
    with gradients the weights themselves are used (they get gradients); off drops every copy."""
    import copy
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer="attention", vocab_size=V)).eval()
    ref = copy.deepcopy(model)
    model.merge_decode_weights()
    ffns = [blk.ffn for blk in model.blocks]
    assert all(f.merged is not None and f.merged.sizes == [f.gate.out_features] * 2 for f in ffns)
    from ttt.layers.merged import ALIGN_ROWS
    for f in ffns:  # rows padded with zeros to Inductor's alignment; split drops the pad
        n = 2 * f.gate.out_features
        assert f.merged.weight.shape[0] % ALIGN_ROWS == 0 and f.merged.weight.shape[0] >= n
        assert not f.merged.weight[n:].any() and torch.equal(f.merged.weight[:n], torch.cat([f.gate.weight, f.up.weight]))
    ids = torch.randint(0, V, (B, 8))
    with torch.no_grad():
        _, s = model(ids[:, :4])
        _, sr = ref(ids[:, :4])
        for t in range(4, 8):
            if t == 6:
                for m in (model, ref):
                    m.blocks[0].ffn.gate.weight.add_(0.1)
            lm, s = model(ids[:, t:t + 1], s)
            lr, sr = ref(ids[:, t:t + 1], sr)
            torch.testing.assert_close(lm, lr, rtol=1e-5, atol=1e-5, msg=f"token {t}")
    loss, _ = model(ids[:, :1], targets=ids[:, :1])
    loss.backward()
    assert model.blocks[0].ffn.gate.weight.grad is not None and model.blocks[0].ffn.up.weight.grad.abs().sum() > 0
    with torch.inference_mode():  # a merged model copied under inference_mode: its sources lost their version
        frozen = copy.deepcopy(model).eval()  # counters, so the copies are declined (the weights themselves used)
        _, sf = frozen(ids[:, :4])
        _, sr = ref(ids[:, :4])
        torch.testing.assert_close(frozen(ids[:, 4:5], sf)[0], ref(ids[:, 4:5], sr)[0], rtol=1e-5, atol=1e-5)
    model.merge_decode_weights(False)
    assert all(f.merged is None for f in ffns)
    with torch.inference_mode():
        frozen = copy.deepcopy(ref).eval()  # made under inference_mode: inference tensors, no version counters
    with pytest.raises(ValueError, match="^weights: inference tensors"):
        frozen.merge_decode_weights()
    assert all(blk.ffn.merged is None for blk in frozen.blocks)


def test_merged_weights_refuse_sources_that_do_not_stack():
    from ttt.layers.merged import MergedWeights
    with pytest.raises(ValueError, match=r"^sources: expected 2-D weights of one in-dim, dtype and device, got "
                                         r"\(2, 3\) torch.float32 cpu, \(2, 4\)"):
        MergedWeights([torch.zeros(2, 3), torch.zeros(2, 4)])
