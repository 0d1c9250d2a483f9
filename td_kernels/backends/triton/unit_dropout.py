"""Unit targeting in Triton (SPEC sections 4-7): three launches, no torch ops between them.

  1. ``_row_norms_kernel``: one program per unit reads the row once in chunks, summing the
     squares in float64 (exact squares, BLOCK lane sums, then a tree sum), then an IEEE
     float64 sqrt rounded once to float32, as ``reference.unit_norms``.  The summation order
     differs from the reference's, but float64 sums agree to ~F * 2**-53 relative, far below
     a float32 ulp: the float32 norms are the reference's bit for bit unless a sum lies that
     close to a float32 rounding boundary (so backends rank the same units; float32 sums
     used to differ by up to 1e-5 relative at F = 2**22).
  2. ``_unit_keep_kernel``: ONE program selects over the U norm keys (float32 bits with the
     sign cleared: NaN above +inf, as ``reference.unit_keep``) with the weight kernels' radix
     select (``weight_dropout._select``: four passes over the 4U bytes of norms, from
     L2), then draws ``word(u)`` (one Philox call per 4 units) and writes ``keep[u]``.  One
     small launch instead of the sort and the handful of torch ops that preceded it (fixed
     cost that dominated small weights).
  3. ``_rows_where_kernel``: ``out = where(keep[u], w, +0.0)``; reads only the kept rows,
     writes every row once.
Memory traffic per element (e = element bytes): forward reads W at most twice (norms, then
the kept rows) and writes out once: <= 3e; plus O(U) bytes for norms and flags.  The backward
is step 3 on grad: <= 2e.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (KEY_MAX, MAX_GRID_1, _cols, _key, _load_seed, _tile_dropped, _to_f32, check_count,
                      check_drop_threshold, check_w2d, device_guard, num_warps, seed_args)
from .weight_dropout import _select

__all__ = ["unit_dropout", "unit_dropout_backward"]

NORM_BLOCK = 2048      # elements per iteration of the norm kernel (4096: float64 sums spilled on sm_80)
ROWS_BLOCK = 4096      # elements per iteration of the row-select kernel
KEEP_GROUPS = 1024     # 4-unit groups per iteration of the (single-program) keep kernel


@triton.jit
def _row_norms_kernel(w_ptr, norm_ptr, F, BLOCK: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    start = u * F
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for c in range(0, F, BLOCK):
        j = c + tl.arange(0, BLOCK)
        x = _to_f32(tl.load(w_ptr + start + j, mask=j < F, other=0)).to(tl.float64)
        acc += x * x  # exact: a float32's square fits float64's 53 bits
    s = tl.sum(acc, 0)
    # float64 tl.sqrt is IEEE (PTX sqrt.rn.f64; only float32 tl.sqrt is approximate), then one
    # rounding to float32. A NaN sum's payload depends on the summation order: every NaN norm
    # becomes the canonical quiet NaN 0x7FC00000, as td_core.h's norm_from_sum.
    nan = tl.full([], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    tl.store(norm_ptr + u, tl.where(s != s, nan, tl.sqrt(s).to(tl.float32)))


@triton.jit(do_not_specialize=["seed", "D", "k", "fixed_limit"])
def _unit_keep_kernel(norm_ptr, keep_ptr, U, k, fixed_limit, seed: tl.int64, seed_ptr, D: tl.int64,
                      SELECT: tl.constexpr, BLOCK_G: tl.constexpr, SEED_PTR: tl.constexpr):
    """One program: the limit key over all U norms (or ``fixed_limit`` when k is 0 or U),
    then ``keep[u] = not (key(norm_u) <= limit and word(u) < D)``."""
    seed = _load_seed(seed, seed_ptr, SEED_PTR)
    if SELECT:
        limit = _select(norm_ptr, 0, U, k, BLOCK_G, False)
    else:
        limit = fixed_limit
    for c0 in range(0, U, 4 * BLOCK_G):
        u = c0 + _cols(BLOCK_G)
        valid = u < U
        keys = _key(tl.load(norm_ptr + u, mask=valid, other=0))
        drop = (keys <= limit) & _tile_dropped(seed, c0, D, True, BLOCK_G)   # stream position p = u
        tl.store(keep_ptr + u, (~drop).to(tl.uint8), mask=valid)


@triton.jit
def _rows_where_kernel(x_ptr, keep_ptr, out_ptr, F, BLOCK: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    n_read = F * tl.load(keep_ptr + u).to(tl.int64)  # keep is 0 or 1: a dropped row reads nothing
    for c in range(tl.program_id(1) * BLOCK, F, tl.num_programs(1) * BLOCK):
        j = c + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + u * F + j, mask=j < n_read, other=0)  # other=0 is +0.0
        tl.store(out_ptr + u * F + j, x, mask=j < F)


def _rows_where(x2d: torch.Tensor, keep_u8: torch.Tensor) -> torch.Tensor:
    U, F = x2d.shape
    out = torch.empty_like(x2d)
    if out.numel() == 0:
        return out
    block = min(ROWS_BLOCK, triton.next_power_of_2(F))
    grid = (U, min(MAX_GRID_1, triton.cdiv(F, block)))
    with device_guard(x2d):
        _rows_where_kernel[grid](x2d, keep_u8, out, F, BLOCK=block, num_warps=num_warps(block))
    return out


def unit_norms(w2d: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row as ``reference.unit_norms``: squares summed in float64, sqrt in
    float64, rounded once to float32."""
    U, F = w2d.shape
    norms = torch.empty(U, dtype=torch.float32, device=w2d.device)
    if U == 0:
        return norms
    block = min(NORM_BLOCK, triton.next_power_of_2(max(F, 1)))
    with device_guard(w2d):
        _row_norms_kernel[(U,)](w2d, norms, F, BLOCK=block, num_warps=num_warps(block))
    return norms


def unit_dropout(w2d: torch.Tensor, seed: int, k: int, drop_threshold: int):
    """SPEC unit targeting on ``w2d = w.reshape(U, F)``; returns ``(out2d, keep bool[U])``."""
    check_w2d(w2d)
    (seed, seed_ptr, from_ptr), D = seed_args(seed, w2d.device), check_drop_threshold(drop_threshold)
    U, F = w2d.shape
    check_count(k, U, "U")
    keep = torch.empty(U, dtype=torch.uint8, device=w2d.device)
    if U == 0:
        return w2d.clone(), keep.view(torch.bool)
    norms = unit_norms(w2d)
    block_g = min(KEEP_GROUPS, triton.next_power_of_2(triton.cdiv(U, 4)))
    with device_guard(w2d):
        _unit_keep_kernel[(1,)](norms, keep, U, k if 0 < k < U else 0, -1 if k == 0 else KEY_MAX,
                                seed, seed_ptr, D, SELECT=0 < k < U, BLOCK_G=block_g, SEED_PTR=from_ptr,
                                num_warps=num_warps(4 * block_g))
    return _rows_where(w2d, keep), keep.view(torch.bool)


def unit_dropout_backward(grad2d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``where(keep[:, None], grad, +0.0)``."""
    check_w2d(grad2d, "grad2d")
    U = grad2d.shape[0]
    if keep.dtype != torch.bool or keep.shape != (U,) or keep.device != grad2d.device:
        raise ValueError(f"keep must be bool [{U}] on {grad2d.device}, got "
                         f"{keep.dtype} {tuple(keep.shape)} on {keep.device}")
    return _rows_where(grad2d, keep.contiguous().view(torch.uint8))
