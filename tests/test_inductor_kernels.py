"""benchmarks/inductor_kernels.py: the Triton kernels Inductor writes for one compiled block, listed on the CPU.

In a fresh interpreter (the tool patches Inductor for its process): one TTT-Linear (M) block on the fused layer
path and one Transformer++ block at a short length, each with a forward and a backward graph of kernels whose
bytes are Inductor's own count and whose fused operators name the block's norms, whose kernels move twice the bytes
at twice the length. The parser alone on a made-up source."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_offline_compile import ROOT

pytest.importorskip("triton")

from benchmarks.inductor_kernels import kernels, launches  # noqa: E402

SCRIPT = """
import json
from benchmarks.inductor_kernels import block_graphs, kernels, launches
out = {{}}
for m in {mixers!r}:
    graphs = {{T: block_graphs(m, 1, T) for T in (32, 64)}}
    out[m] = {{T: {{p: kernels(s) for p, s in g.items()}} for T, g in graphs.items()}}
    out[m]["launches"] = {{p: launches(s) for p, s in graphs[32].items()}}
print(json.dumps(out))
"""


def run(mixers):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(mixers=mixers)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_parser_reads_names_bytes_and_operators():
    src = "\n".join([
        "# Topologically Sorted Source Nodes: [mul, sum_1], Original ATen: [aten.mul, aten.sum]",
        "@triton_heuristics.reduction(",
        "    inductor_meta={'kernel_name': 'x', 'kernel_num_gb': 0.0125, 'num_load': 2},",
        ")",
        "@triton.jit",
        "def triton_red_fused_mul_sum_0(in_ptr0, out_ptr0, xnumel, r0_numel, XBLOCK : tl.constexpr):",
        "    pass",
        "# Topologically Sorted Source Nodes: [add], Original ATen: [aten.add]",
        "@triton_heuristics.pointwise(",
        "    inductor_meta={'kernel_num_gb': 2e-3},",
        ")",
        "@triton.jit",
        "def triton_poi_fused_add_1(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):",
        "    tmp0 = 'kernel_num_gb': 5.0",  # a body line: not the next kernel's bytes
        "def call(args):",
    ])
    assert kernels(src) == [("triton_red_fused_mul_sum_0", 12.5, "mul, sum"), ("triton_poi_fused_add_1", 2.0, "add")]


def test_launches_counts_the_graphs_calls_only():
    src = "\n".join([
        "async_compile.triton('''",
        "def call(args):",
        "    triton_poi_fused_add_0.run(*args, stream=s)",  # a kernel's own benchmark harness: not the graph's
        "''')",
        "async_compile.wait(globals())",
        "    def call(self, args):",
        "        triton_poi_fused_add_0.run(buf0, buf1, 16, stream=raw_stream0)",
        "        extern_kernels.mm(buf1, buf2, out=buf3)",
        "        buf4 = torch.ops.ttt.conv_rope_fwd.default(buf3, None)",
        "        # Topologically Sorted Source Nodes: [x], Original ATen: [ttt.conv_rope_fwd]",
        "        triton_poi_fused_add_0.run(buf4, buf5, 16, stream=raw_stream0)",
        "        buf6 = torch.ops.ttt.conv_rope_fwd.default(buf5, None)",
    ])
    assert launches(src) == {"triton": 2, "extern": 1, "ops": {"ttt::conv_rope_fwd": 2}}


def test_blocks_forward_and_backward_kernels():
    out = run(["ttt_linear+fused", "attention"])
    n = {m: out[m].pop("launches") for m in out}
    for mixer, graphs in n.items():  # every kernel runs at least once; the mixer's own calls
        for part in ("forward", "backward"):
            assert graphs[part]["triton"] >= len(out[mixer]["32"][part]) and graphs[part]["extern"] >= 4, graphs
    assert n["ttt_linear+fused"]["forward"]["ops"] == {"ttt::conv_rope_fwd": 2, "ttt::linear_chunk_fwd": 1}
    assert n["ttt_linear+fused"]["backward"]["ops"] == {"ttt::linear_chunk_bwd": 1, "ttt::conv_rope_bwd": 2}
    for mixer, by_len in out.items():
        for T, graphs in by_len.items():
            assert set(graphs) == {"forward", "backward"}
            for part, ks in graphs.items():
                assert ks and all(mb >= 0 for _, mb, _ in ks) and sum(mb for _, mb, _ in ks) > 0, \
                    (mixer, T, part, ks)
        norms = {T: [mb for _, mb, o in graphs["forward"] if "rsqrt" in o] for T, graphs in by_len.items()}
        assert norms["32"] and len(norms["32"]) == len(norms["64"]), (mixer, norms)  # the RMSNorms' kernels
        ratio = sum(norms["64"]) / sum(norms["32"])  # activations: twice the tokens, twice the bytes
        assert 1.8 < ratio < 2.2, (mixer, norms)
    ttt_bwd = " ".join(o for _, _, o in out["ttt_linear+fused"]["32"]["backward"])
    assert "native_layer_norm_backward" in ttt_bwd and "gelu_backward" in ttt_bwd  # the post-norm x gate
    # a training step's block (state_out=False) builds no state: no window copies, no zero accumulators
    ttt_fwd = [o for _, _, o in out["ttt_linear+fused"]["32"]["forward"]]
    assert not [o for o in ttt_fwd if "zeros_like" in o or "clone" in o], ttt_fwd
