"""Gluon helpers shared by the Gluon kernels (`ttt_mlp/chunk_smem.py`, `ttt_linear/walks_gluon.py`): the barrier
of a program's threads, the asynchronous global -> shared copy, and a row of a `triton_utils.Rows` span (the
Triton kernels' helpers are in `triton_utils.py`)."""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

# a barrier of all the program's threads: Gluon's thread_barrier in Triton 3.6, renamed barrier in later versions
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# cp.async of a pointer tensor into a shared buffer (smem, pointer): async_copy_global_to_shared in Triton 3.6,
# renamed async_load later (the old name then raises); its commit_group / wait_group kept their names
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _row(span_ptr, n):
    """Row n of a `triton_utils.Rows` span: its first token, its length, its first checkpoint slot."""
    start = gl.load(span_ptr + 3 * n)
    return start, gl.load(span_ptr + 3 * n + 1) - start, gl.load(span_ptr + 3 * n + 2)
