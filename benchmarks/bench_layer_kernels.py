"""The fused layer's conv kernels on the GPU (ttt/ops/fused_layer.py): the causal conv(s) + RoPE, forward and
backward, beside the PyTorch layer path they replace, at model shapes.

First checks each kernel at the timed shapes against the PyTorch reference computed in fp32 from the same
(rounded) inputs: outputs and every gradient (x, both convs' weights and biases), and refuses to time a failing
one. Then times (medians of triton.testing.do_bench, ms) each launch variant of the conv kernels and the PyTorch
path, and prints the effective bandwidth (the bytes each call must move, over its time) and what the calls cost
per 125m training step (12 layers: one conv + RoPE pair and one block pre-conv each).

    python3 -m benchmarks.bench_layer_kernels                       # checks, then every shape and launch variant
    python3 -m benchmarks.bench_layer_kernels --shapes 4x8192x768 --launches default 16,64,4,2
    python3 -m benchmarks.bench_layer_kernels --launches default 8,64,1,12   # R,BC,warps,programs per SM
    python3 -m benchmarks.bench_layer_kernels --packed --launches default   # packed documents (cu_seqlens)
    python3 -m benchmarks.bench_layer_kernels --decode default 8 4:128   # the fused decode step's launches
    python3 -m benchmarks.bench_layer_kernels --gemms                    # the decode's GEMMs, from memory / L2
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.common import bench, environment, graphed_ms, rel
from ttt.checkpoint import write_json
from ttt.layers.attention import apply_rope
from ttt.layers.merged import ALIGN_ROWS
from ttt.ops import fused_layer

SHAPES = ["4x8192x768", "16x2048x768", "4x8192x2048"]  # B x T x D: 125m training at 8k and 2k, 1.3b at 8k
HEAD_DIM, MB, W = 64, 16, 4
DEV = "cuda"
DOC_LENS = (3000, 17, 1029, 640, 300, 47, 2048, 1)  # --packed: documents of these lengths, repeated to fill B x T


def tol(dtype) -> float:
    """The largest relative error a kernel may have against the fp32 reference before it is not timed."""
    return 2e-2 if dtype == torch.bfloat16 else 1e-4


def packed_docs(n: int) -> torch.Tensor:
    """cu_seqlens of documents of DOC_LENS (repeated, the last one cut) filling n rows."""
    lens = []
    while sum(lens) < n:
        lens.append(min(DOC_LENS[len(lens) % len(DOC_LENS)], n - sum(lens)))
    return torch.tensor([0, *lens], device=DEV).cumsum(0)


def ref_conv_rope(x, wa, ba, wb, bb, rope, cu=None):
    """The PyTorch layer path: depthwise causal conv(s) by cuDNN, then RoPE at position mod b (`apply_rope`); packed
    documents (cu: cu_seqlens, x [1, T, D]) each alone, concatenated."""
    if cu is not None:
        parts = [ref_conv_rope(x[:, s:e], wa, ba, wb, bb, rope) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return [torch.cat(ys, 1) for ys in zip(*parts)]
    B, T, D = x.shape
    xs = F.pad(x.transpose(1, 2), (W - 1, 0))  # [B, D, W-1+T]
    outs = []
    for w, b in ((wa, ba), (wb, bb)) if wb is not None else ((wa, ba),):
        y = F.conv1d(xs, w.to(x.dtype), b.to(x.dtype), groups=D).transpose(1, 2)  # [B, T, D]
        if rope:
            pos = torch.arange(T, device=x.device) % MB
            y = apply_rope(y.reshape(B, T, D // HEAD_DIM, HEAD_DIM), pos, 10000.0).reshape(B, T, D)
        outs.append(y)
    return outs


def conv_inputs(B, T, D, rope, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=DEV)  # noqa: E731
    x = r(B, T, D).to(dtype)
    wa, wb = r(D, 1, W) * 0.5, r(D, 1, W) * 0.5
    ba, bb = r(D) * 0.1, r(D) * 0.1
    return (x, wa, ba, wb, bb) if rope else (x, wa, ba, None, None)


def conv_launch_of(spec: str, T: int, D: int, rope: bool, sms: int):
    """A --launches entry as the `fused_layer.ConvLaunch` to time (both kernels): None for "default" (each kernel's
    own), else R,BC,warps,programs per SM (R rows loaded at once, BC channels per program)."""
    if spec == "default":
        return None
    r, bc, w, per_sm = (int(v) for v in spec.split(","))
    return fused_layer.ConvLaunch(R=r, BC=bc, warps=w, programs=per_sm * sms)


def _tok(x, cu):
    """The packed rows' RoPE positions for the kernels (None unpacked)."""
    return None if cu is None else fused_layer._packed_rows(cu, x, None, 0, MB)[1]


def check_conv(B, T, D, rope, dtype, launch, packed=False):
    """Max relative error of the kernel path (outputs, then every gradient) against the fp32 reference; `packed`:
    the B x T rows as packed documents (`packed_docs`)."""
    x, wa, ba, wb, bb = conv_inputs(B, T, D, rope, dtype)
    x, cu = (x.view(1, B * T, D), packed_docs(B * T)) if packed else (x, None)
    tok = _tok(x, cu)
    ref_in = [None if t is None else t.detach().float().requires_grad_() for t in (x, wa, ba, wb, bb)]
    ref = ref_conv_rope(*ref_in, rope, cu)
    ys = fused_layer._conv_fwd(x, None, wa, ba, wb, bb, 0, MB, HEAD_DIM, 10000.0, rope, launch=launch, tok=tok)
    ys = ys if rope else ys[:1]
    gys = [torch.randn_like(y) for y in ref]
    live = [t for t in ref_in if t is not None]
    want = torch.autograd.grad(sum((y * gy).sum() for y, gy in zip(ref, gys)), live)
    dya, dyb = gys[0].to(dtype), (gys[1].to(dtype) if rope else None)
    got = fused_layer._conv_bwd(x, None, wa, wb, dya, dyb, 0, MB, HEAD_DIM, 10000.0, rope, launch=launch, tok=tok)
    got = [got[0], got[2], got[3], *(got[4:6] if rope else [])]  # dx, dwa, dba (, dwb, dbb); no window
    return max([rel(y.float(), r) for y, r in zip(ys, ref)] + [rel(a, b) for a, b in zip(got, want)])


def conv_bytes(B, T, D, rope, elt):
    """Bytes a call must move: forward x in, one or two outputs out; backward x and the output gradient(s) in, dx out."""
    n = B * T * D * elt
    k = 2 if rope else 1
    return n * (1 + k), n * (2 + k)


def time_conv(B, T, D, rope, dtype, launch, packed=False):
    x, wa, ba, wb, bb = conv_inputs(B, T, D, rope, dtype)
    x, cu = (x.view(1, B * T, D), packed_docs(B * T)) if packed else (x, None)
    tok = _tok(x, cu)
    ys = fused_layer._conv_fwd(x, None, wa, ba, wb, bb, 0, MB, HEAD_DIM, 10000.0, rope, launch=launch, tok=tok)
    dys = [torch.randn_like(ys[0]), torch.randn_like(ys[0]) if rope else None]
    fwd = bench(lambda: fused_layer._conv_fwd(x, None, wa, ba, wb, bb, 0, MB, HEAD_DIM, 10000.0, rope, launch=launch,
                                              tok=tok))
    bwd = bench(lambda: fused_layer._conv_bwd(x, None, wa, wb, *dys, 0, MB, HEAD_DIM, 10000.0, rope, launch=launch,
                                              tok=tok))
    return fwd, bwd


def time_ref(B, T, D, rope, dtype):
    x, wa, ba, wb, bb = conv_inputs(B, T, D, rope, dtype)
    x.requires_grad_()
    ys = ref_conv_rope(x, wa, ba, wb, bb, rope)
    dys = [torch.randn_like(y) for y in ys]
    fwd = bench(lambda: ref_conv_rope(x, wa, ba, wb, bb, rope))
    both = bench(lambda: torch.autograd.grad(ref_conv_rope(x, wa, ba, wb, bb, rope), [x], dys))
    return fwd, both - fwd


def decode_inputs(B=16, D=2048, d=64, b=16, seed=0):
    """The fused decode step's arguments at 1.3b shapes (B sequences, D = H x d, bf16 activations, fp32 state)."""
    from ttt.ops import TTTState
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=DEV)  # noqa: E731
    H = D // d
    bf = torch.bfloat16
    state = TTTState("linear", (r(B, H, d, d) * 0.02, r(B, H, d) * 0.02), (r(B, H, d, d) * 1e-3, r(B, H, d) * 1e-3), 0)
    args = (r(B, 1, D).to(bf), r(B, 1, D).to(bf), r(B, 1, H).to(bf), r(B, W - 1, D).to(bf), r(D, 1, W) * 0.5,
            r(D) * 0.1, r(D, 1, W) * 0.5, r(D) * 0.1, r(H) * 0.1, torch.tensor(1.0, device=DEV), r(b) * 0.1,
            1 + 0.1 * r(H, d), 0.1 * r(H, d))
    return args, state


def steady_rows(state, i, b=16, seed=1):
    """`state`'s weights at in-batch position i in the rows form (`RowsState`) a graphed decoder holds from its first
    commit on: i random rows (k_s, lr_s g_s), no prefix sums."""
    from ttt.ops import RowsState
    A, a = state.accum
    B, H, d = a.shape
    g = torch.Generator(device=DEV).manual_seed(seed)
    K = torch.randn(B, H, b, d, generator=g, device=DEV) * 0.1
    G = torch.randn(B, H, b, d, generator=g, device=DEV) * 1e-3
    return RowsState("linear", state.params, (torch.zeros_like(A), torch.zeros_like(a), K, G, a.new_zeros(B, H)), i)


def model_form(args, states):
    """The decode step's arguments as the 1.3b model's graphed decoder hands them over: u, v and the lr gate as
    column ranges of the merged projection's output (`cols`, row stride padded as `layers/merged.py` pads), per state
    (the rows form) its own window, both written in place (`inplace`)."""
    u, v, gate, win, *params = args
    B, _, D = u.shape
    H = gate.shape[-1]
    y = torch.zeros(B, 1, -(-(3 * D + H) // ALIGN_ROWS) * ALIGN_ROWS, device=u.device, dtype=u.dtype)
    y[..., :D], y[..., D:2 * D], y[..., 3 * D:3 * D + H] = u, v, gate
    return [((y, y, y, win.clone(), *params), s) for s in states], dict(cols=(0, D, 3 * D), inplace=True)


def bench_decode_kernel(launches, positions=(3, 15), **shape):
    """`fused_layer.linear_decode_step` at 1.3b B16 per launch variant ("default" or WARPS or WARPS:MAXNREG), in two
    forms: its arguments apart (a plain state: converted to the rows form and back around the kernel), and as the
    graphed model hands them over (`model_form`: one merged tensor, the rows form after a first commit
    (`steady_rows`), in place); each
    checked against the default launch's apart form (output, new state, window), then timed in a CUDA graph of 8
    calls, each on its own state (from memory, as the 24 layers' are), at a position inside a mini-batch and at its
    last (the commit writes the weights too); ms per call and per token of 24 layers. shape: decode_inputs' sizes."""
    from dataclasses import replace
    args, state = decode_inputs(**shape)
    rows = []

    def copies(st, n):
        return [replace(st, params=tuple(t.clone() for t in st.params), accum=tuple(t.clone() for t in st.accum))
                for _ in range(n)]
    for i in positions:
        rs = steady_rows(state, i)
        st = rs.summed()  # the same state in the plain form
        ref = fused_layer.linear_decode_step(*args, st, mini_batch=16)
        for spec in launches:
            w, _, reg = spec.partition(":")
            launch = None if spec == "default" else (int(w), int(reg) if reg else None)
            forms = {"apart": ([(args, s) for s in copies(st, 9)], {}), "as in the model": model_form(args, copies(rs, 9))}
            for form, (calls, kw) in forms.items():
                (a0, s0), calls = calls[0], calls[1:]  # the first call is checked (in place: on its own copies)
                o, s, win = fused_layer.linear_decode_step(*a0, s0, mini_batch=16, launch=launch, **kw)
                s = s.summed() if hasattr(s, "summed") else s  # the rows form's sums
                err = max(rel(o.float(), ref[0].float()), rel(win.float(), ref[2].float()),
                          *(rel(x, y) for x, y in zip((*s.params, *s.accum), (*ref[1].params, *ref[1].accum))))
                row = dict(kernel="linear decode step", launch=spec, form=form, position=i, max_rel_err=err,
                           ok=err < 1e-2)
                if row["ok"]:
                    ms = graphed_ms([lambda a=a, s=s: fused_layer.linear_decode_step(*a, s, mini_batch=16, launch=launch,
                                                                                     **kw) for a, s in calls])
                    row.update(ms=ms, ms_per_token_24_layers=24 * ms)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


# the 1.3b decode's GEMMs per block, (name, N, K): merged qk/v/gate/lr (rows padded to 64), o_proj, merged SwiGLU
# gate+up, down
DECODE_GEMMS = (("qk|v|gate|lr", 6208, 2048), ("o", 2048, 2048), ("gate|up", 11008, 2048), ("down", 2048, 5504))


def bench_decode_gemms(B=16, dtype=torch.bfloat16, copies=20, blas=("cublas",), names=None, rows_mm=()):
    """The decode's GEMMs (F.linear) at B rows, each a CUDA graph of `copies` calls: on a weight copy each
    (read from memory, as the decode's blocks do) and all on one weight (after the first call from L2: what
    prefetching the weights into L2 beside the step's latency-bound kernels could reach); us per call and the
    weight's read rate (TB/s). blas: the libraries to time them with (torch.backends.cuda.preferred_blas_library:
    "cublas", "cublaslt"); the preference is restored after. names: only these of DECODE_GEMMS (None: all).
    rows_mm: launches of `ttt.ops.rows_mm` ("BN,BK,splits,warps,stages,swap") timed beside them from memory, each
    checked first against the fp32 product."""
    rows = []
    before = torch.backends.cuda.preferred_blas_library()
    try:
        for lib in blas:
            torch.backends.cuda.preferred_blas_library(lib)
            for name, N, K in (g for g in DECODE_GEMMS if names is None or g[0] in names):
                x = torch.randn(B, 1, K, device=DEV, dtype=dtype)
                ws = [(torch.randn(N, K, device=DEV) * K ** -0.5).to(dtype) for _ in range(copies)]
                for weights, where in ((ws, "memory"), ([ws[0]] * copies, "L2")):
                    ms = graphed_ms([lambda w=w: F.linear(x, w) for w in weights])
                    row = dict(kernel="decode gemm", blas=lib, gemm=name, N=N, K=K, rows=B, weights_from=where,
                               us=ms * 1e3, weight_tb_per_s=N * K * 2 / (ms * 1e-3) / 1e12)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                if lib == blas[0]:
                    rows += time_rows_mm(x, ws, name, rows_mm)
    finally:
        torch.backends.cuda.preferred_blas_library(before)
    return rows


def time_rows_mm(x, ws, name, specs):
    """`rows_mm` at each launch spec ("BN,BK,splits,warps,stages,swap") on the weight copies ws (from memory)."""
    from ttt.ops.rows_mm import rows_mm
    rows, ref = [], F.linear(x.float(), ws[0].float())
    N, K = ws[0].shape
    for spec in specs:
        bn, bk, sp, nw, ns, sw = (int(v) for v in spec.split(","))
        kw = dict(BN=bn, BK=bk, splits=sp, num_warps=nw, num_stages=ns, swap=bool(sw))
        row = dict(kernel="decode gemm", blas="rows_mm", launch=spec, gemm=name, N=N, K=K, rows=x.shape[0])
        try:
            row.update(max_rel_err=rel(rows_mm(x, ws[0], **kw).float(), ref))
        except Exception as e:  # a launch that does not compile (shared memory) is reported, not timed
            row.update(error=f"{type(e).__name__}: {str(e)[:120]}")
        row["ok"] = row.get("max_rel_err", 1.0) < tol(x.dtype)
        if row["ok"]:
            ms = graphed_ms([lambda w=w: rows_mm(x, w, **kw) for w in ws])
            row.update(weights_from="memory", us=ms * 1e3, weight_tb_per_s=N * K * 2 / (ms * 1e-3) / 1e12)
            if sp > 1:  # the kernel alone, its partials left unsummed (a compiled consumer would sum them)
                row.update(us_partials=graphed_ms([lambda w=w: rows_mm(x, w, partials=True, **kw) for w in ws]) * 1e3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", nargs="*", default=None,
                    help="time the fused decode step instead, at these launches (default, WARPS or WARPS:MAXNREG; "
                         "none given: default 8 4:128 2)")
    ap.add_argument("--positions", default="3,15", help="with --decode: the in-batch positions to time the step at "
                                                        "(15: the commit of a 16-token mini-batch)")
    ap.add_argument("--gemms", action="store_true", help="time the 1.3b decode's GEMMs instead (cuBLAS, weights "
                                                            "from memory and from L2)")
    ap.add_argument("--blas", nargs="+", default=["cublas"], choices=("cublas", "cublaslt"),
                    help="with --gemms: the BLAS libraries to time them with")
    ap.add_argument("--gemm-names", nargs="+", default=None, choices=[g[0] for g in DECODE_GEMMS],
                    help="with --gemms: only these (e.g. one GEMM for Nsight Compute: run_on_gpu.sh ncu)")
    ap.add_argument("--rows-mm", nargs="+", default=[], metavar="BN,BK,SPLITS,WARPS,STAGES,SWAP",
                    help="with --gemms: time ttt.ops.rows_mm at these launches beside cuBLAS")
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="B x T x D")
    ap.add_argument("--launches", nargs="+",
                    default=["default", "8,64,1,12", "16,64,1,8", "8,128,2,6"],
                    help="conv launch variants: default or R,BC,warps,programs per SM (R rows loaded at once)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--packed", action="store_true", help="each B x T as one row of packed documents (cu_seqlens; "
                                                           "lengths " + ", ".join(map(str, DOC_LENS)) + ", repeated)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    elt = 2 if a.dtype == "bf16" else 4
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = [environment()]
    print(json.dumps(rows[0]), flush=True)
    if a.decode is not None:
        rows += bench_decode_kernel(a.decode or ["default", "8", "4:128", "2"],
                                    positions=tuple(int(p) for p in a.positions.split(",")))
        a.shapes = []
    if a.gemms:
        rows += bench_decode_gemms(blas=a.blas, names=a.gemm_names, rows_mm=a.rows_mm)
        a.shapes = []
    for shape in a.shapes:
        B, T, D = (int(v) for v in shape.split("x"))
        step = {}
        for rope in (True, False):
            fb, bb = conv_bytes(B, T, D, rope, elt)
            if not a.packed:  # (the PyTorch path of packed documents is another one: the kernels are its only form)
                rf, rb = time_ref(B, T, D, rope, dtype)
                ref_row = dict(kernel="conv+rope" if rope else "conv", launch="pytorch (cuDNN conv, apply_rope)",
                               shape=shape, fwd_ms=rf, bwd_ms=rb)
                print(json.dumps(ref_row), flush=True)
                rows.append(ref_row)
            for spec in a.launches:
                L = conv_launch_of(spec, T, D, rope, sms)
                err = check_conv(B, min(T, 2048), D, rope, dtype, L, a.packed)
                ok = err < tol(dtype)
                row = dict(kernel="conv+rope" if rope else "conv", launch=spec, shape=shape, max_rel_err=err, ok=ok,
                           **({"packed": DOC_LENS} if a.packed else {}))
                if ok:
                    f, b = time_conv(B, T, D, rope, dtype, L, a.packed)
                    row.update(fwd_ms=f, bwd_ms=b, fwd_GBps=fb / f / 1e6, bwd_GBps=bb / b / 1e6)
                    step.setdefault(spec, {})[rope] = b
                print(json.dumps(row), flush=True)
                rows.append(row)
        for spec, t in step.items():
            if len(t) == 2:
                print(json.dumps(dict(shape=shape, launch=spec, conv_bwd_ms_per_125m_step=12 * (t[True] + t[False]))),
                      flush=True)
    if a.out:
        write_json(a.out, rows)


if __name__ == "__main__":
    main()
