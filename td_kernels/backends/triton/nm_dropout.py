"""N:M targeting in Triton (SPEC section 11, windows as section 12).

Each row's columns split into groups of ``m`` consecutive columns; in a group the ``m - n``
first in ``(key, j)`` order are candidates (a tie goes to the lower j), and a candidate drops
iff ``word(s_u + j) < D``.  One kernel does the forward (``out = where(keep, w, +0.0)``, the
keep mask packed into ``bits`` on request) and the recompute backward (``where(keep, grad,
+0.0)``); the backward from bits is ``_common._bits_backward_kernel``.  Grid (U, column
chunks); tiles anchored on local columns as in ``_common`` (Philox words aligned or straddled
per row start, whole 32-bit mask words per program).

The rank of column ``c`` in its group is ``#{t : key_t < key_c or (key_t == key_c and t < c)}``:
  * m a power of two (2, 4, 8, 16, the FAST path): the ``[BLOCK_G, 4]`` tile reshapes to
    ``[4 * BLOCK_G / m, m]`` whole groups (tiles start at multiples of m); a loop over t takes
    key t of every group (a row reduction) and compares it with the group's keys: ~2m
    operations per element, all in registers (an ``[groups, m, m]`` broadcast instead used
    255 registers per thread at m = 16, this 54, ptxas for sm_90);
  * any other m (the GENERAL path): a column's group straddles tile rows and tiles, so each
    element loads the m keys of its group (``j - j % m + t``) itself: m loads per element,
    served by L1/L2 (the tile reads the same lines), m compares per element.
Memory traffic per element (e = element bytes), both paths: forward reads W once from DRAM
and writes out once (2e, + 1/8 byte with bits); recompute backward reads W and grad, writes
grad_w (3e); the backward from bits reads grad and 1/8 byte, writes grad_w (2e + 1/8).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference import check_nm, check_window
from ._common import (_cols, _key, _load_seed, _store_bits, _tile_dropped, aligned, bits_backward,
                      check_drop_threshold, check_grad, check_w2d, device_guard, launch_chunks, new_bits, num_warps,
                      seed_args)

__all__ = ["nm_dropout", "nm_dropout_backward"]

# Columns per program iteration: 4 * NM_GROUPS (1024: 8 per thread at 4 warps; 32-96
# registers per thread for m = 2..16 on sm_80/sm_90, tests/test_triton_aot.py).
NM_GROUPS = 256
MIN_GROUPS = 8  # whole 32-column mask words per block


@triton.jit
def _rank_pow2(keys, M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Ranks within groups of M (a power of two dividing 4 * BLOCK_G) of a [BLOCK_G, 4] tile."""
    G: tl.constexpr = 4 * BLOCK_G // M
    kk = tl.reshape(keys, [G, M])
    c = tl.arange(0, M)[None, :]
    rank = tl.zeros([G, M], tl.int32)
    for t in range(M):
        other = tl.sum(tl.where(c == t, kk, 0), 1)[:, None]   # key t of each group
        rank += ((other < kk) | ((other == kk) & (t < c))).to(tl.int32)
    return tl.reshape(rank, [BLOCK_G, 4])


@triton.jit
def _rank_general(row, j, keys, valid, M: tl.constexpr):
    """Ranks within groups of M columns for any M: each element reads its group's M keys."""
    c = j % M
    g0 = j - c
    rank = tl.zeros_like(j)
    for t in range(M):
        other = _key(tl.load(row + g0 + t, mask=valid, other=0))
        rank += ((other < keys) | ((other == keys) & (t < c))).to(tl.int32)
    return rank


@triton.jit(do_not_specialize=["seed", "D", "origin", "row_stride"])
def _nm_kernel(w_ptr, g_ptr, out_ptr, bits_ptr, seed: tl.int64, seed_ptr, D: tl.int64, origin: tl.int64,
               row_stride: tl.int64, F, NW, N: tl.constexpr, M: tl.constexpr,
               BACKWARD: tl.constexpr, BITS: tl.constexpr, POW2: tl.constexpr,
               ALIGNED: tl.constexpr, BLOCK_G: tl.constexpr, SEED_PTR: tl.constexpr):
    """Forward (``out = where(keep, w, 0)``, BITS: also the packed mask) or recompute
    backward (BACKWARD: ``out = where(keep, grad, 0)``) of N:M targeting."""
    seed = _load_seed(seed, seed_ptr, SEED_PTR)
    u = tl.program_id(0).to(tl.int64)
    row = w_ptr + u * F
    s = origin + u * row_stride
    for c0 in range(tl.program_id(1) * 4 * BLOCK_G, F, tl.num_programs(1) * 4 * BLOCK_G):
        j = c0 + _cols(BLOCK_G)
        valid = j < F                 # m | F: a group is wholly valid or wholly not
        x = tl.load(row + j, mask=valid, other=0)
        keys = _key(x)
        if POW2:
            rank = _rank_pow2(keys, M, BLOCK_G)
        else:
            rank = _rank_general(row, j, keys, valid, M)
        keep = ~((rank < M - N) & _tile_dropped(seed, s + c0, D, ALIGNED, BLOCK_G))
        if BACKWARD:
            src = tl.load(g_ptr + u * F + j, mask=valid, other=0)
        else:
            src = x
        tl.store(out_ptr + u * F + j, tl.where(keep, src, tl.zeros_like(src)), mask=valid)
        if BITS:
            _store_bits(bits_ptr + u * NW, c0, keep & valid, NW, BLOCK_G)


def _launch(w2d, grad2d, seed, n, m, drop_threshold, window, bits):
    check_w2d(w2d)
    (seed, seed_ptr, from_ptr), D = seed_args(seed, w2d.device), check_drop_threshold(drop_threshold)
    U, F = w2d.shape
    n, m = check_nm(n, m, F)
    origin, row_stride = check_window(window, U, F)
    src = w2d if grad2d is None else grad2d
    out = torch.empty_like(src)
    packed = new_bits(U, F, w2d.device) if bits else None
    if U * F == 0:
        return out, packed
    pow2 = m & (m - 1) == 0
    block_g = max(MIN_GROUPS, min(NM_GROUPS, triton.next_power_of_2(triton.cdiv(F, 4))))
    with device_guard(w2d):
        launch_chunks(_nm_kernel, U, F, 4 * block_g)(
            w2d, src, out, packed if bits else out, seed, seed_ptr, D, origin, row_stride, F,
            packed.shape[1] if bits else 0, N=n, M=m, BACKWARD=grad2d is not None, BITS=bits,
            POW2=pow2, ALIGNED=aligned(origin, row_stride), BLOCK_G=block_g, SEED_PTR=from_ptr,
            num_warps=num_warps(4 * block_g))
    return out, packed


def nm_dropout(w2d: torch.Tensor, seed: int, n: int, m: int, drop_threshold: int, *, window=None,
               bits: bool = False):
    """SPEC section 11 on ``w2d = w.reshape(U, F)``: ``(out2d, bits or None)``."""
    return _launch(w2d, None, seed, n, m, drop_threshold, window, bits)


def nm_dropout_backward(grad2d: torch.Tensor, w2d, seed: int, n: int, m: int, drop_threshold: int,
                        *, window=None, bits=None) -> torch.Tensor:
    """``where(keep, grad, +0.0)``: keep from ``bits`` when given (``w2d`` unused), else
    recomputed from W."""
    check_w2d(grad2d, "grad2d")
    if bits is not None:
        return bits_backward(grad2d, bits)
    check_w2d(w2d)
    check_grad(grad2d, w2d)
    return _launch(w2d, grad2d, seed, n, m, drop_threshold, window, False)[0]
