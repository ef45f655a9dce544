"""Run a Gluon kernel's own source in Triton's CPU interpreter (test helper; needs TRITON_INTERPRET=1).

Gluon has no interpreter. `interpretable(kernel)` rebuilds the kernel's Python function (and every @gluon.jit
helper it calls) with `gl` and the Hopper ops bound to small emulations on top of `triton.language`, which the
interpreter runs: layouts are ignored, shared memory is a numpy array per allocation (views for `slice` and
`permute`, stores cast to its dtype), `warpgroup_mma` / `mma_v2` / `dot_fma` are `tl.dot` on the loaded operands (fp16
operands stay fp16, bf16 ones are widened to fp32, which the interpreter's own bf16 dot misreads; fp32 accumulation),
barriers, fences and the waits of asynchronous copies are no-ops (a program is one thread here; a copy is
done when issued). Every program of a launch runs in its own Python
thread with its own program id, so programs that wait on one another through global-memory atomics (the split
kernels' exchanges) make progress as they would on a GPU.

What this checks: the kernel's arithmetic, indexing, masking, its use of shared memory as storage and its
exchanges between programs. What it cannot: layouts, the hardware's shapes (wgmma needs M >= 64), register and
shared-memory budgets, and the ordering the fences and barriers provide. The offline sm_90 compile
(benchmarks/offline_compile.py) and the GPU tests (marked `gpu`) cover those.
"""
from __future__ import annotations

import inspect
import threading
import time
import types

import numpy as np
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import ampere, hopper
from triton.runtime import interpreter as _interp

_tls = threading.local()


class _Layout:
    """Any layout: accepted and ignored."""

    def __init__(self, *args, **kwargs):
        pass

    @staticmethod
    def get_default_for(*args, **kwargs):
        return _Layout()


def _program_id(axis):
    return tl.full([], _tls.pid[axis], tl.int32)


def _num_programs(axis):
    return tl.full([], _tls.grid[axis], tl.int32)


class _Smem:
    """A shared-memory allocation: a numpy array of the element type; views index into it."""

    def __init__(self, dtype, shape, value=None):
        self.dtype = dtype
        self.data = np.zeros(shape, dtype=_np_dtype(dtype))
        self.shape = list(shape)
        if value is not None:
            self.store(value)

    def _get(self):
        return self.data

    def _set(self, arr):
        self.data[...] = arr

    def load(self, layout=None):
        arr = np.array(self._get(), order="C")  # a copy, as registers are: a later store or copy into the
        # allocation must not change what was loaded (np.ascontiguousarray returned the allocation itself)
        return tl.core.tensor(_interp.TensorHandle(arr, self.dtype), tl.block_type(self.dtype, list(arr.shape)))

    def store(self, value):
        value = value.to(self.dtype)
        self._set(value.handle.data.reshape(self._get().shape))

    def slice(self, start, length, dim=0):
        return _View(self, lambda a: _take(a, dim, start, length), _slice_setter(dim, start, length))

    def index(self, i):
        return _View(self, lambda a: a[i], _index_setter(i))

    def permute(self, order):
        order = tuple(order)
        inv = tuple(np.argsort(order))
        return _View(self, lambda a: np.transpose(a, order), lambda a, v: _assign_perm(a, v, inv))


class _View(_Smem):
    def __init__(self, parent, get, set_):
        self.parent, self.get_fn, self.set_fn, self.dtype = parent, get, set_, parent.dtype
        self.shape = list(self._get().shape)

    def _get(self):
        return self.get_fn(self.parent._get())

    def _set(self, arr):
        whole = self.parent._get().copy()
        self.set_fn(whole, arr)
        self.parent._set(whole)


def _take(a, dim, start, length):
    idx = [slice(None)] * a.ndim
    idx[dim] = slice(start, start + length)
    return a[tuple(idx)]


def _slice_setter(dim, start, length):
    def set_(whole, v):
        idx = [slice(None)] * whole.ndim
        idx[dim] = slice(start, start + length)
        whole[tuple(idx)] = v
    return set_


def _index_setter(i):
    def set_(whole, v):
        whole[i] = v
    return set_


def _assign_perm(whole, v, inv):
    whole[...] = np.transpose(v, inv)


def _np_dtype(dtype):
    return _interp._get_np_dtype(dtype)  # the interpreter's own storage type (bf16 as its bit pattern)


def _operand(x):
    x = x.load() if isinstance(x, _Smem) else x
    # the interpreter's tl.dot reads bf16 operands as their bit patterns (Triton 3.9: a 16 x 16 product off by
    # 1e10); widened to fp32 (exact) the product is the one the tensor cores form: exact products, fp32 sums
    return x.to(tl.float32) if x.dtype == tl.bfloat16 else x


def _warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
    a, b = _operand(a), _operand(b)
    if not use_acc:
        acc = tl.zeros(acc.shape, acc.dtype)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


def _warpgroup_mma_wait(num_outstanding=0, deps=None):
    return deps[0] if len(deps) == 1 else tuple(deps)


def _dot_fma(a, b, acc):
    return tl.dot(_operand(a), _operand(b), acc, input_precision="ieee", out_dtype=acc.dtype)


def _noop(*args, **kwargs):
    return None


def _reduce(x, axis, combine_fn, keep_dims):
    """gl.reduce, as a tree of whole-array combines (halving the axis, log2 n calls) where the axis is a power of two:
    the interpreter's own reduce calls the combine once per element pair (the smem tests 4x slower)."""
    xs = list(x) if isinstance(x, tuple) else [x]
    shape = list(xs[0].shape)
    n, last = shape[axis], len(shape) - 1
    if n & (n - 1):
        return tl.reduce(x, axis, combine_fn, keep_dims=keep_dims)
    order = [i for i in range(len(shape)) if i != axis] + [axis]  # the reduced axis last
    xs = [tl.permute(t, order) if axis != last else t for t in xs]
    fn = getattr(combine_fn, "fn", combine_fn)
    while n > 1:
        halves = [tl.split(tl.reshape(t, [*t.shape[:-1], n // 2, 2])) for t in xs]
        r = fn(*(h[0] for h in halves), *(h[1] for h in halves))
        xs = list(r) if isinstance(r, tuple) else [r]
        n //= 2
    rest = [shape[i] for i in order[:-1]]
    xs = [tl.reshape(t, rest) for t in xs]
    if keep_dims:
        xs = [tl.expand_dims(t, axis) for t in xs]
    return tuple(xs) if isinstance(x, tuple) else xs[0]


_ASM = {"ex2.approx.ftz.f32": lambda x: tl.exp2(x), "rcp.approx.ftz.f32": lambda x: 1.0 / x}


def _inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
    """The one-instruction PTX the kernels use, by its opcode (`_ASM`); anything else is not emulated."""
    op = asm.split()[0]
    if op not in _ASM or len(args) != 1:
        raise NotImplementedError(f"gluon_shim: no emulation of the inline PTX {asm!r}")
    return _ASM[op](args[0])


def _allocate_shared_memory(element_ty, shape, layout, value=None):
    return _Smem(element_ty, [int(s) for s in shape], value)


def _load(ptr, mask=None, other=None, cache_modifier="", eviction_policy="", volatile=False, **kwargs):
    return tl.load(ptr, mask=mask, other=other, cache_modifier=cache_modifier, volatile=volatile)


def _store(ptr, value, mask=None, cache_modifier="", eviction_policy="", **kwargs):
    return tl.store(ptr, value, mask=mask, cache_modifier=cache_modifier)


def _async_copy(smem, pointer, mask=None, cache_modifier="", eviction_policy="", volatile=False):
    """cp.async global -> shared: here a load and a store, done at once (commit and wait are no-ops)."""
    smem.store(tl.load(pointer, mask=mask))


_GL = types.SimpleNamespace(
    constexpr=tl.constexpr, float32=tl.float32, float16=tl.float16, bfloat16=tl.bfloat16, int32=tl.int32,
    int64=tl.int64, int1=tl.int1,
    BlockedLayout=_Layout, SliceLayout=_Layout, NVMMADistributedLayout=_Layout, DotOperandLayout=_Layout,
    NVMMASharedLayout=_Layout, SwizzledSharedLayout=_Layout, PaddedSharedLayout=_Layout, AutoLayout=_Layout,
    program_id=_program_id, num_programs=_num_programs,
    arange=lambda start, end, layout=None: tl.arange(start, end),
    full=lambda shape, value, dtype, layout=None: tl.full(shape, value, dtype),
    zeros=lambda shape, dtype=tl.float32, layout=None: tl.zeros(shape, dtype),
    convert_layout=lambda value, layout, assert_trivial=False: value,
    set_auto_layout=lambda value, layout: value,
    load=_load, store=_store,
    sum=lambda x, axis=None, keep_dims=False: tl.sum(x, axis=axis, keep_dims=keep_dims),
    reduce=lambda x, axis, combine_fn, keep_dims=False: _reduce(x, axis, combine_fn, keep_dims),
    max=lambda x, axis=None, keep_dims=False: tl.max(x, axis=axis, keep_dims=keep_dims),
    where=lambda c, x, y: tl.where(c, x, y), maximum=lambda a, b: tl.maximum(a, b),
    minimum=lambda a, b: tl.minimum(a, b), exp=lambda x: tl.exp(x), sqrt=lambda x: tl.sqrt(x),
    rsqrt=lambda x: tl.rsqrt(x), abs=lambda x: tl.abs(x), permute=lambda x, dims: tl.permute(x, dims),
    expand_dims=lambda x, axis: tl.expand_dims(x, axis), reshape=lambda x, shape: tl.reshape(x, shape),
    static_range=lambda *a, **k: tl.static_range(*a, **k), static_assert=lambda *a, **k: tl.static_assert(*a, **k),
    static_print=lambda *a, **k: tl.static_print(*a, **k),
    allocate_shared_memory=_allocate_shared_memory, thread_barrier=_noop, dot_fma=_dot_fma,
    inline_asm_elementwise=_inline_asm_elementwise,
    atomic_add=lambda ptr, val, mask=None, sem=None, scope=None: _atomic_add(ptr, val, mask, sem, scope),
)


def _atomic_add(ptr, val, mask, sem, scope):
    if getattr(_tls, "failed", None) is not None and _tls.failed.is_set():
        raise RuntimeError("gluon_shim: stopped, another program of the launch failed")
    out = tl.atomic_add(ptr, val, mask=mask, sem=sem, scope=scope)
    # a program polling a counter (adding 0) steps aside, so that the others (one Python thread each) run
    time.sleep(1e-4 if isinstance(val, int) and val == 0 else 0)
    return out
_REPLACE = {id(gl): _GL, id(ampere.mma_v2): _warpgroup_mma, id(hopper.warpgroup_mma): _warpgroup_mma,
            id(hopper.warpgroup_mma_wait): _warpgroup_mma_wait,
            id(hopper.fence_async_shared): _noop, id(ampere.async_copy.async_copy_global_to_shared): _async_copy,
            id(getattr(ampere.async_copy, "async_load", _async_copy)): _async_copy,
            id(ampere.async_copy.commit_group): _noop, id(ampere.async_copy.wait_group): _noop,
            **{id(getattr(gl, name)): _noop for name in ("thread_barrier", "barrier") if hasattr(gl, name)}}


def _rebuild(fn, done):
    """fn's Python function with its globals rebound (gl -> the emulation, gluon.jit helpers -> interpretable)."""
    if id(fn) in done:
        return done[id(fn)]
    py = fn.fn
    glb = dict(py.__globals__)
    glb["_shim_tl"] = tl  # the interpreter patches the triton.language modules visible to a function
    for name in py.__code__.co_names:
        val = glb.get(name)
        if val is None:
            continue
        if id(val) in _REPLACE:
            glb[name] = _REPLACE[id(val)]
        elif isinstance(val, gluon._runtime.GluonJITFunction):
            glb[name] = _rebuild(val, done)
        elif isinstance(val, triton.runtime.jit.ConstexprFunction):
            glb[name] = val.fn
    new = types.FunctionType(py.__code__, glb, py.__name__, py.__defaults__, py.__closure__)
    new.__module__ = py.__module__
    jitted = triton.jit(new)
    done[id(fn)] = jitted
    return jitted


class _Threaded(_interp.InterpretedFunction):
    """An interpreted kernel whose programs run concurrently, one Python thread each."""

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return
        body = self.rewrite()
        threads, errors, failed = [], [], threading.Event()

        def one(pid, dims, call_kwargs):
            _tls.pid, _tls.grid, _tls.failed = pid, dims, failed
            try:
                body(**call_kwargs)
            except BaseException as e:  # reported by the launching thread; the others stop polling
                errors.append(e)
                failed.set()

        def launch_one(**call_kwargs):
            b = _interp.interpreter_builder
            t = threading.Thread(target=one, args=(b.grid_idx, b.grid_dim, call_kwargs), daemon=True)
            t.start()
            threads.append(t)
            if tuple(i + 1 for i in b.grid_idx) == tuple(b.grid_dim):  # the last program: wait for all
                deadline = time.monotonic() + 900
                for t in threads:
                    while t.is_alive() and not failed.is_set() and time.monotonic() < deadline:
                        t.join(timeout=0.2)
                if failed.is_set():  # a program raised: the ones waiting on it were told to stop
                    for t in threads:
                        t.join(timeout=10)
                    raise errors[0]
                if any(t.is_alive() for t in threads):
                    raise RuntimeError("gluon_shim: a program did not finish (a missed exchange?)")

        launch_one.__signature__ = inspect.signature(body)
        launch_one.__annotations__ = {  # which arguments are constexpr ("gl.constexpr" read as "constexpr")
            k: "constexpr" if str(v).endswith("constexpr") else v for k, v in body.__annotations__.items()}
        return _interp.GridExecutor(launch_one, self.arg_names, grid, self.pre_run_hooks)(*args, **kwargs)


def interpretable(kernel):
    """A launchable stand-in for the @gluon.jit `kernel` that runs in Triton's interpreter (see the docstring)."""
    done = {}
    jitted = _rebuild(kernel, done)
    for helper in done.values():  # parse every helper's source here, once: ast.parse is not thread-safe (CPython
        helper.rewrite()          # 3.11: "AST constructor recursion depth mismatch" when two programs raced to it)
    return _Threaded(jitted.fn)
