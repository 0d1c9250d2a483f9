"""Weight targeting in Triton (SPEC sections 2-7): fused forward and a mask-free backward.

Forward, one program per unit (row ``u``, flat indices ``[u*F, u*F + F)``):
  1. find the row's threshold key ``t_u`` (0-based position k in ascending key order) by an
     8-bit RADIX SELECT, not a sort: four rounds over the key digits (bits 30..24, 23..16,
     15..8, 7..0); each round takes a 256-bin ``tl.histogram`` of the digit over the keys
     that match the prefix fixed so far, a ``tl.cumsum`` over the 256 bins, and picks the
     bin holding rank k.  Cost: 4 histograms of F elements + 4 scans of 256 bins per row,
     i.e. O(4 F) work, independent of the key distribution;
  2. draw ``word(i)`` with one ``tl.randint4x`` call per 4 elements (``_common._dropped``);
  3. ``out = where(key <= t_u - 1 and word < D, +0.0, w)``; store ``limit[u] = t_u - 1``.
Rows of at most ``4 * MAX_ONE_PASS_GROUPS - 3`` elements stay in registers: W is read once
and ``out`` written once (+ 4 bytes of ``limit`` per row).  Longer rows stream through the
row in chunks of ``4 * CHUNK_GROUPS`` elements: one pass per radix round (skipped when
k == F) and one apply pass, so W is read 5 times, ``out`` written once.  Both paths compute
the same keys, histograms and words, hence the same bits.

Backward: the forward saves only ``limit`` (int32, 4 bytes per unit, no mask); the backward
recomputes ``keep`` from W's keys, ``limit`` and the seed: reads W and grad once, writes
grad_w once (grad is not read where the element was dropped).

The seed and D are runtime int64 arguments that Triton does not specialise on, so a new
seed or rate reuses the compiled kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (KEY_MAX, MAX_GRID_1, _dropped, _key, check_count, check_drop_threshold,
                      check_seed, check_w2d, device_guard, num_warps)

__all__ = ["weight_dropout", "weight_dropout_backward"]

# Tuning knobs, read at each launch (tests lower them to reach the streamed path on small
# shapes). A group is 4 consecutive elements, the unit of one Philox call.
MAX_ONE_PASS_GROUPS = 2048   # rows up to 8189 elements are selected from registers
CHUNK_GROUPS = 1024          # elements per chunk of the streamed path: 4 * this
BACKWARD_GROUPS = 1024       # elements per backward program iteration: 4 * this


@triton.jit
def _radix_hist(keys, valid, prefix, SHIFT: tl.constexpr, N: tl.constexpr):
    """256-bin histogram of digit ``(key >> SHIFT) & 255`` over valid keys whose bits above
    SHIFT + 8 equal prefix's."""
    if SHIFT == 24:  # first round: bit 31 is always 0, nothing fixed yet
        match = valid
    else:
        match = valid & ((keys >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    digit = (keys >> SHIFT) & 0xFF
    return tl.histogram(tl.reshape(digit, [N]), 256, mask=tl.reshape(match, [N]))


@triton.jit
def _radix_pick(hist, prefix, rank, SHIFT: tl.constexpr):
    """Fix the digit whose bin holds 0-based ``rank``; return the new prefix and the rank
    within that bin."""
    cum = tl.cumsum(hist, 0)
    b = tl.sum((cum <= rank).to(tl.int32), 0)  # first bin with cum > rank
    below = tl.sum(tl.where(tl.arange(0, 256) < b, hist, 0), 0)
    return prefix | (b << SHIFT), rank - below


@triton.jit
def _streamed_hist(w_ptr, start, end, q0, n_groups, prefix, SHIFT: tl.constexpr,
                   BLOCK_Q: tl.constexpr):
    """``_radix_hist`` over a whole row, read chunk by chunk (one pass over the row)."""
    lane = tl.arange(0, 4)[None, :]
    hist = tl.zeros([256], dtype=tl.int32)
    for c in range(0, n_groups, BLOCK_Q):
        q = q0 + c + tl.arange(0, BLOCK_Q)
        i = q[:, None] * 4 + lane
        valid = (i >= start) & (i < end)
        keys = _key(tl.load(w_ptr + i, mask=valid, other=0))
        hist += _radix_hist(keys, valid, prefix, SHIFT, 4 * BLOCK_Q)
    return hist


@triton.jit(do_not_specialize=["seed", "D"])
def _weight_dropout_kernel(w_ptr, out_ptr, limit_ptr, seed: tl.int64, D: tl.int64, F, k,
                           fixed_limit, SELECT: tl.constexpr, ONE_PASS: tl.constexpr,
                           BLOCK_Q: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    start = u * F
    end = start + F
    q0 = start // 4                    # the row's first 4-element group (Philox counter)
    lane = tl.arange(0, 4)[None, :]
    rank = k + 0 * F                   # 0-based position of t_u, as a tensor
    prefix = rank * 0
    if ONE_PASS:
        q = q0 + tl.arange(0, BLOCK_Q)
        i = q[:, None] * 4 + lane
        valid = (i >= start) & (i < end)
        x = tl.load(w_ptr + i, mask=valid, other=0)
        keys = _key(x)
        if SELECT:
            prefix, rank = _radix_pick(_radix_hist(keys, valid, prefix, 24, 4 * BLOCK_Q), prefix, rank, 24)
            prefix, rank = _radix_pick(_radix_hist(keys, valid, prefix, 16, 4 * BLOCK_Q), prefix, rank, 16)
            prefix, rank = _radix_pick(_radix_hist(keys, valid, prefix, 8, 4 * BLOCK_Q), prefix, rank, 8)
            prefix, rank = _radix_pick(_radix_hist(keys, valid, prefix, 0, 4 * BLOCK_Q), prefix, rank, 0)
            limit = prefix - 1         # strict key < t_u  <=>  key <= t_u - 1
        else:
            limit = fixed_limit
        drop = (keys <= limit) & _dropped(seed, q, D)
        tl.store(out_ptr + i, tl.where(drop, tl.zeros_like(x), x), mask=valid)
    else:
        n_groups = (end + 3) // 4 - q0
        if SELECT:
            h = _streamed_hist(w_ptr, start, end, q0, n_groups, prefix, 24, BLOCK_Q)
            prefix, rank = _radix_pick(h, prefix, rank, 24)
            h = _streamed_hist(w_ptr, start, end, q0, n_groups, prefix, 16, BLOCK_Q)
            prefix, rank = _radix_pick(h, prefix, rank, 16)
            h = _streamed_hist(w_ptr, start, end, q0, n_groups, prefix, 8, BLOCK_Q)
            prefix, rank = _radix_pick(h, prefix, rank, 8)
            h = _streamed_hist(w_ptr, start, end, q0, n_groups, prefix, 0, BLOCK_Q)
            prefix, rank = _radix_pick(h, prefix, rank, 0)
            limit = prefix - 1
        else:
            limit = fixed_limit
        for c in range(0, n_groups, BLOCK_Q):
            q = q0 + c + tl.arange(0, BLOCK_Q)
            i = q[:, None] * 4 + lane
            valid = (i >= start) & (i < end)
            x = tl.load(w_ptr + i, mask=valid, other=0)
            drop = (_key(x) <= limit) & _dropped(seed, q, D)
            tl.store(out_ptr + i, tl.where(drop, tl.zeros_like(x), x), mask=valid)
    tl.store(limit_ptr + u, limit)


@triton.jit(do_not_specialize=["seed", "D"])
def _weight_dropout_backward_kernel(g_ptr, w_ptr, limit_ptr, out_ptr, seed: tl.int64,
                                    D: tl.int64, F, BLOCK_Q: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    start = u * F
    end = start + F
    q0 = start // 4
    n_groups = (end + 3) // 4 - q0
    lane = tl.arange(0, 4)[None, :]
    limit = tl.load(limit_ptr + u)
    for c in range(tl.program_id(1) * BLOCK_Q, n_groups, tl.num_programs(1) * BLOCK_Q):
        q = q0 + c + tl.arange(0, BLOCK_Q)
        i = q[:, None] * 4 + lane
        valid = (i >= start) & (i < end)
        drop = (_key(tl.load(w_ptr + i, mask=valid, other=0)) <= limit) & _dropped(seed, q, D)
        g = tl.load(g_ptr + i, mask=valid & ~drop, other=0)  # other=0 gives +0.0
        tl.store(out_ptr + i, g, mask=valid)


def weight_dropout(w2d: torch.Tensor, seed: int, k: int, drop_threshold: int):
    """SPEC weight targeting on ``w2d = w.reshape(U, F)``; returns ``(out2d, limit)``."""
    check_w2d(w2d)
    seed, D = check_seed(seed), check_drop_threshold(drop_threshold)
    U, F = w2d.shape
    check_count(k, F, "F")
    if k == 0 or U == 0:  # no candidates: W unchanged (checked before k == F so F == 0 lands here)
        return w2d.clone(), torch.full((U,), -1, dtype=torch.int32, device=w2d.device)
    out = torch.empty_like(w2d)
    limit = torch.empty(U, dtype=torch.int32, device=w2d.device)
    groups = triton.cdiv(F + 3, 4)  # most 4-element groups a row of F can touch
    one_pass = groups <= MAX_ONE_PASS_GROUPS
    block_q = triton.next_power_of_2(groups) if one_pass else CHUNK_GROUPS
    with device_guard(w2d):
        _weight_dropout_kernel[(U,)](
            w2d, out, limit, seed, D, F, k, KEY_MAX,
            SELECT=k < F, ONE_PASS=one_pass, BLOCK_Q=block_q, num_warps=num_warps(4 * block_q))
    return out, limit


def weight_dropout_backward(grad2d: torch.Tensor, w2d: torch.Tensor, limit: torch.Tensor,
                            seed: int, drop_threshold: int) -> torch.Tensor:
    """``where(keep, grad, +0.0)`` with keep recomputed from W's keys, ``limit`` and the seed."""
    check_w2d(w2d)
    check_w2d(grad2d, "grad2d")
    seed, D = check_seed(seed), check_drop_threshold(drop_threshold)
    U, F = w2d.shape
    if grad2d.shape != w2d.shape or grad2d.device != w2d.device:
        raise ValueError(f"grad2d must match w2d's shape {tuple(w2d.shape)} and device, "
                         f"got {tuple(grad2d.shape)} on {grad2d.device}")
    if limit.dtype != torch.int32 or limit.shape != (U,) or limit.device != w2d.device:
        raise ValueError(f"limit must be int32 [{U}] on {w2d.device}, got "
                         f"{limit.dtype} {tuple(limit.shape)} on {limit.device}")
    out = torch.empty_like(grad2d)
    if out.numel() == 0:
        return out
    block_q = min(BACKWARD_GROUPS, triton.next_power_of_2(triton.cdiv(F + 3, 4)))
    grid = (U, min(MAX_GRID_1, triton.cdiv(triton.cdiv(F + 3, 4), block_q)))
    with device_guard(w2d):
        _weight_dropout_backward_kernel[grid](
            grad2d, w2d, limit.contiguous(), out, seed, D, F, BLOCK_Q=block_q,
            num_warps=num_warps(4 * block_q))
    return out
