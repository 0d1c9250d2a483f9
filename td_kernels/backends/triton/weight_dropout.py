"""Weight targeting in Triton (SPEC sections 2-7, 12): fused forward, two backwards.

Tiles are anchored on a row's local columns (``_common``): a ``[BLOCK_G, 4]`` tile holds
columns ``c0 .. c0 + 4 * BLOCK_G``, its words come from ``_tile_words`` at the row's global
start ``s_u = origin + u * row_stride`` (one Philox per 4 elements when every row starts
4-aligned, two otherwise), and its keep bits pack into whole int32 words that no other program
touches.

Forward, one program per unit ``u``:
  1. the row's threshold key ``t_u`` (0-based position k in ascending key order) by an 8-bit
     RADIX SELECT, not a sort: four rounds over the key digits (bits 30..24, 23..16, 15..8,
     7..0); each round takes a 256-bin ``tl.histogram`` of the digit over the keys matching
     the prefix fixed so far, a ``tl.cumsum`` over the bins, and picks the bin holding rank k.
     O(4 F) work per row whatever the keys.  ``limit[u] = t_u - 1`` (strict ``key < t_u``).
     A ``limit`` passed in (the sharded path, k == 0 or k == F) skips this step;
  2. ``drop = key <= limit[u] and word(s_u + j) < D``; ``out = where(drop, +0.0, w)``;
  3. with ``BITS``, the keep mask packed 1 bit per element into ``bits[u, j // 32]``.
Memory traffic per element (e = element bytes): rows of at most ``4 * MAX_ONE_PASS_GROUPS``
columns stay in registers: read W once, write out once: 2e, plus 1/8 byte with bits and 4
bytes of limit per row.  Longer rows stream in chunks of ``4 * CHUNK_GROUPS`` columns: one
read pass per radix round (none with a given limit) and one apply pass: 5e reads + e write
(the later passes mostly hit L2 for rows of a few MB).  Both paths select the same exact k-th
key and draw the same words, hence give the same bits.

Backward, grid (U, column chunks):
  * from ``bits`` (``_common._bits_backward_kernel``): reads grad and the bits only, e + 1/8
    byte read, e written;
  * by recompute: W's keys, ``limit`` and the seed give keep again; reads W and grad, writes
    grad_w: 3e per element.  grad is loaded plainly (a non-data-dependent mask, so the load
    vectorises) and the select comes after.

The seed, D, origin and row_stride are runtime int64 arguments that Triton does not
specialise on: a new seed, rate or shard reuses the compiled kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import check_variant
from ...reference import check_window
from ._common import (KEY_MAX, _cols, _key, _load_seed, _store_bits, aligned, _tile_dropped, bits_backward,
                      check_count, check_drop_threshold, check_limit, check_grad, check_w2d, device_guard,
                      launch_chunks, new_bits, num_warps, seed_args)

__all__ = ["weight_dropout", "weight_dropout_backward"]

# Tuning knobs, read at each launch (tests lower them to reach the streamed path on small
# shapes). A group is 4 consecutive columns, the unit of one Philox call; every block holds at
# least 8 groups so that its columns are whole 32-bit mask words.
MAX_ONE_PASS_GROUPS = 2048   # rows of up to 8192 columns are selected from registers
CHUNK_GROUPS = 1024          # columns per chunk of the streamed path: 4 * this
BACKWARD_GROUPS = 1024       # columns per recompute-backward iteration: 4 * this
MIN_GROUPS = 8
# How a row resident in registers is selected: the launcher's ``variant``, else this default
# (read at each launch; the benchmark's provider "triton:sampled" sets it): "radix" = _select,
# "sampled" = _select_sampled. Same bits either way; streamed rows always take the radix select.
SELECTS = ("radix", "sampled")
SELECT = "radix"
SAMPLE = tl.constexpr(64)  # values in _select_sampled's sample


# Key bits fixed per radix round: 4 rounds of 256 bins (bit 31 of a key is always 0).  The
# rounds are a runtime loop (the shift a register), so the histogram code is emitted once:
# unrolled rounds made ptxas spill 8192-column register tiles and compiled 2-4x slower.
# (16-bin rounds were tried: no fewer registers once unrolling was gone, twice the rounds, and
# no clear gain in PTX instructions per key; see docs/triton.md.)
RADIX_BITS = tl.constexpr(8)
RADIX_BINS = tl.constexpr(256)


@triton.jit
def _rank_value(x):
    """What the selection sorts: a value that orders like ``_key(x)`` and maps to it one to one.
    float32: the key (31 bits); float16/bfloat16: the 15 magnitude bits (their keys are
    strictly increasing in them, td_core.h's rank values), so a select needs 2 rounds, not 4."""
    if x.dtype == tl.float32:
        rv = _key(x)
    else:
        rv = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return rv


@triton.jit
def _radix_hist(keys, valid, prefix, shift, N: tl.constexpr):
    """Histogram of the digit ``(key >> shift) % RADIX_BINS`` over the valid keys (rank values)
    whose bits above the digit equal prefix's (none are fixed in the first round)."""
    above = (tl.full([], -1, tl.int64) << (shift + RADIX_BITS)).to(tl.int32)  # 0 in the first round
    match = valid & (((keys ^ prefix) & above) == 0)
    digit = (keys >> shift) & (RADIX_BINS - 1)
    return tl.histogram(tl.reshape(digit, [N]), RADIX_BINS, mask=tl.reshape(match, [N]))


@triton.jit
def _radix_pick(hist, prefix, rank, shift):
    """Fix the digit whose bin holds 0-based ``rank``; return the new prefix and the rank
    within that bin."""
    cum = tl.cumsum(hist, 0)
    b = tl.sum((cum <= rank).to(tl.int32), 0)  # first bin with cum > rank
    below = tl.sum(tl.where(tl.arange(0, RADIX_BINS) < b, hist, 0), 0)
    return prefix | (b << shift), rank - below


@triton.jit
def _streamed_hist(row, F, prefix, shift, BLOCK_G: tl.constexpr):
    """``_radix_hist`` over the rank values of the ``F`` values at ``row``, read chunk by chunk
    (one pass)."""
    hist = tl.zeros([RADIX_BINS], dtype=tl.int32)
    for c0 in range(0, F, 4 * BLOCK_G):
        j = c0 + _cols(BLOCK_G)
        valid = j < F
        keys = _rank_value(tl.load(row + j, mask=valid, other=0))
        hist += _radix_hist(keys, valid, prefix, shift, 4 * BLOCK_G)
    return hist


@triton.jit
def _select(src, valid, F, k, BLOCK_G: tl.constexpr, RESIDENT: tl.constexpr):
    """``t - 1`` for the key ``t`` at 0-based position k: a radix select over the rank values
    (``_rank_value``), one histogram per 8-bit digit from the top: 4 rounds for float32 (31
    bits), 2 for float16/bfloat16 (15 bits).  RESIDENT: ``src`` is a ``[BLOCK_G, 4]`` tile of
    the row's values (``valid`` its mask); else ``src`` points at ``F`` values read once per
    round in chunks of ``4 * BLOCK_G``."""
    if RESIDENT:
        dt = src.dtype
        rv = _rank_value(src)
    else:
        dt = src.dtype.element_ty
    if dt == tl.float32:
        top = 24       # the shift of the first digit: bits 30..24 (bit 31 of a key is 0)
    else:
        top = 8        # bits 14..8, then 7..0
    rank = k + tl.zeros([], tl.int32)
    prefix = tl.zeros([], tl.int32)
    for r in range(top // RADIX_BITS + 1):
        shift = top - RADIX_BITS * r
        if RESIDENT:
            hist = _radix_hist(rv, valid, prefix, shift, 4 * BLOCK_G)
        else:
            hist = _streamed_hist(src, F, prefix, shift, BLOCK_G)
        prefix, rank = _radix_pick(hist, prefix, rank, shift)
    if dt == tl.float32:  # the threshold's key
        t = prefix
    elif dt == tl.bfloat16:
        t = prefix << 16
    else:  # float16: widen the half with these magnitude bits
        t = _key(prefix.to(tl.int16).to(tl.float16, bitcast=True))
    return t - 1


@triton.jit
def _count(mask, N: tl.constexpr):
    """How many elements of a ``[BLOCK_G, 4]`` mask are set."""
    return tl.sum(tl.reshape(mask.to(tl.int32), [N]), 0)


@triton.jit
def _select_sampled(x, valid, row, F, k, BLOCK_G: tl.constexpr):
    """``_select`` for a row resident in registers (``x``, ``valid``), modelled on the native
    CPU's sample-bracketed selection (csrc/cpu/td_select.h): a sorted strided sample of SAMPLE
    rank values gives two values ``lo <= hi`` bracketing rank k; ONE counting pass over the row
    (4 counts, no histogram) says where rank k lies.  At ``lo`` or ``hi`` (ties): done.  Strictly
    between: the radix rounds run only over the open band (lo, hi), starting at the top 8-bit
    digit where lo and hi differ (their common high bits are the band's), with rank
    ``k - #(rv <= lo)``.  Outside (the sample misjudged): the full radix rounds over the row.
    Exact for every input; the sample only decides how many rounds run.  Memory traffic: the
    row's registers plus SAMPLE loads (cache hits); work: the sample's sort (SAMPLE log^2
    SAMPLE), 4 compares per element, and 0 to (rounds) histograms."""
    rv = _rank_value(x)
    N: tl.constexpr = 4 * BLOCK_G
    if x.dtype == tl.float32:
        top = 24
    else:
        top = 8
    i = tl.arange(0, SAMPLE)
    pos = ((2 * i + 1).to(tl.int64) * F) // (2 * SAMPLE)
    sample = tl.sort(_rank_value(tl.load(row + pos)))
    p = k.to(tl.float32) / F
    r = (p * SAMPLE).to(tl.int32)
    # ~2 sigma (+2) of the sample rank around r (a [1] vector: the interpreter's sqrt takes no scalar)
    d = tl.sum((2.0 * tl.sqrt(tl.full([1], SAMPLE, tl.float32) * p * (1.0 - p))).to(tl.int32), 0) + 2
    lo = tl.sum(tl.where(i == tl.maximum(r - d, 0), sample, 0), 0)
    hi = tl.sum(tl.where(i == tl.minimum(r + d, SAMPLE - 1), sample, 0), 0)
    lt_lo = _count(valid & (rv < lo), N)  # the one counting pass
    le_lo = _count(valid & (rv <= lo), N)
    lt_hi = _count(valid & (rv < hi), N)
    le_hi = _count(valid & (rv <= hi), N)
    at_lo = (k >= lt_lo) & (k < le_lo)
    at_hi = (k >= lt_hi) & (k < le_hi)
    between = (k >= le_lo) & (k < lt_hi)
    diff = lo ^ hi  # the band's top differing digit, or the whole key when the sample misjudged
    start = tl.where(between, tl.where(diff >= 1 << 24, 24, tl.where(diff >= 1 << 16, 16,
                                                                     tl.where(diff >= 1 << 8, 8, 0))), top)
    start = tl.minimum(start, top)
    prefix = (lo.to(tl.int64) & (tl.full([], -1, tl.int64) << (start + RADIX_BITS))).to(tl.int32)
    prefix = tl.where(between, prefix, 0)
    match = tl.where(between, valid & (rv > lo) & (rv < hi), valid)
    rank = tl.where(between, k - le_lo, k)
    rounds = tl.where(at_lo | at_hi, 0, start // RADIX_BITS + 1)
    for r in range(rounds):
        shift = start - RADIX_BITS * r
        hist = _radix_hist(rv, match, prefix, shift, N)
        prefix, rank = _radix_pick(hist, prefix, rank, shift)
    t = tl.where(at_lo, lo, tl.where(at_hi, hi, prefix))
    if x.dtype == tl.float32:  # the threshold's key
        key = t
    elif x.dtype == tl.bfloat16:
        key = t << 16
    else:
        key = _key(t.to(tl.int16).to(tl.float16, bitcast=True))
    return key - 1


@triton.jit(do_not_specialize=["seed", "D", "origin", "row_stride", "k"])
def _weight_dropout_kernel(w_ptr, out_ptr, limit_ptr, bits_ptr, seed: tl.int64, seed_ptr, D: tl.int64,
                           origin: tl.int64, row_stride: tl.int64, F, NW, k,
                           SELECT: tl.constexpr, ONE_PASS: tl.constexpr, BITS: tl.constexpr,
                           ALIGNED: tl.constexpr, BLOCK_G: tl.constexpr, SEED_PTR: tl.constexpr,
                           SAMPLED: tl.constexpr = False):
    """One program per row; ``limit_ptr`` is written (SELECT) or read (a given limit);
    SAMPLED: a resident row is selected by ``_select_sampled``."""
    seed = _load_seed(seed, seed_ptr, SEED_PTR)
    u = tl.program_id(0).to(tl.int64)
    row = w_ptr + u * F
    out_row = out_ptr + u * F
    bits_row = bits_ptr + u * NW
    s = origin + u * row_stride               # the row's global stream start
    if ONE_PASS:
        j = _cols(BLOCK_G)
        valid = j < F
        x = tl.load(row + j, mask=valid, other=0)
        if SELECT:
            if SAMPLED:
                limit = _select_sampled(x, valid, row, F, k, BLOCK_G)
            else:
                limit = _select(x, valid, F, k, BLOCK_G, True)
            tl.store(limit_ptr + u, limit)
        else:
            limit = tl.load(limit_ptr + u)
        keep = ~((_key(x) <= limit) & _tile_dropped(seed, s, D, ALIGNED, BLOCK_G))
        tl.store(out_row + j, tl.where(keep, x, tl.zeros_like(x)), mask=valid)
        if BITS:
            _store_bits(bits_row, 0, keep & valid, NW, BLOCK_G)
    else:
        if SELECT:
            limit = _select(row, 0, F, k, BLOCK_G, False)
            tl.store(limit_ptr + u, limit)
        else:
            limit = tl.load(limit_ptr + u)
        for c0 in range(0, F, 4 * BLOCK_G):
            j = c0 + _cols(BLOCK_G)
            valid = j < F
            x = tl.load(row + j, mask=valid, other=0)
            keep = ~((_key(x) <= limit) & _tile_dropped(seed, s + c0, D, ALIGNED, BLOCK_G))
            tl.store(out_row + j, tl.where(keep, x, tl.zeros_like(x)), mask=valid)
            if BITS:
                _store_bits(bits_row, c0, keep & valid, NW, BLOCK_G)


@triton.jit(do_not_specialize=["seed", "D", "origin", "row_stride"])
def _weight_dropout_backward_kernel(g_ptr, w_ptr, limit_ptr, out_ptr, seed: tl.int64, seed_ptr,
                                    D: tl.int64, origin: tl.int64, row_stride: tl.int64, F,
                                    ALIGNED: tl.constexpr, BLOCK_G: tl.constexpr, SEED_PTR: tl.constexpr):
    """Recompute backward, grid (U, chunks): keep from W's keys, limit[u] and the seed."""
    seed = _load_seed(seed, seed_ptr, SEED_PTR)
    u = tl.program_id(0).to(tl.int64)
    s = origin + u * row_stride
    limit = tl.load(limit_ptr + u)
    for c0 in range(tl.program_id(1) * 4 * BLOCK_G, F, tl.num_programs(1) * 4 * BLOCK_G):
        j = c0 + _cols(BLOCK_G)
        valid = j < F
        x = tl.load(w_ptr + u * F + j, mask=valid, other=0)
        g = tl.load(g_ptr + u * F + j, mask=valid, other=0)
        keep = ~((_key(x) <= limit) & _tile_dropped(seed, s + c0, D, ALIGNED, BLOCK_G))
        tl.store(out_ptr + u * F + j, tl.where(keep, g, tl.zeros_like(g)), mask=valid)


def check_select(v) -> str:
    if v not in SELECTS:
        raise ValueError(f"weight_dropout.SELECT must be one of {SELECTS}, got {v!r}")
    return v


def forward_warps(one_pass: bool, block_g: int) -> int:
    """Warps of the forward: one per 512 columns of a one-pass tile (16 at 8192 columns; 8
    warps there spilled), one per 256 of a streamed chunk (16 at 4096: with 8, ptxas kept 64
    registers and reloaded a spilled value in the apply loop)."""
    return num_warps(4 * block_g, 512 if one_pass else 256, 16)


def _block_groups(groups: int, cap: int) -> int:
    """A power-of-two tile of at least MIN_GROUPS groups, at most ``cap`` (>= MIN_GROUPS)."""
    return max(MIN_GROUPS, min(max(cap, MIN_GROUPS), triton.next_power_of_2(groups)))


def weight_dropout(w2d: torch.Tensor, seed: int, k: int, drop_threshold: int, *, window=None,
                   limit=None, bits: bool = False, variant=None):
    """SPEC weight targeting on ``w2d = w.reshape(U, F)``: ``(out2d, limit, bits or None)``
    (the launcher contract of ``td_kernels._registry``); ``variant`` one of SELECTS, else SELECT."""
    check_w2d(w2d)
    how = check_select(SELECT) if variant is None else check_variant("triton", "weight", variant, SELECTS)
    (seed, seed_ptr, from_ptr), D = seed_args(seed, w2d.device), check_drop_threshold(drop_threshold)
    U, F = w2d.shape
    origin, row_stride = check_window(window, U, F)
    dev = w2d.device
    if limit is None:
        check_count(k, F, "F")
        select = 0 < k < F
        lim = torch.empty(U, dtype=torch.int32, device=dev) if select else \
            torch.full((U,), -1 if k == 0 else KEY_MAX, dtype=torch.int32, device=dev)
    else:
        lim, select = check_limit(limit, U, dev), False
    out = torch.empty_like(w2d)
    packed = new_bits(U, F, dev) if bits else None
    if U * F == 0:  # no rows, or rows of no columns (and no mask words)
        return out, lim, packed
    groups = triton.cdiv(F, 4)  # local columns: F / 4 groups whatever the row's alignment
    one_pass = groups <= max(MAX_ONE_PASS_GROUPS, MIN_GROUPS)
    block_g = _block_groups(groups, MAX_ONE_PASS_GROUPS if one_pass else CHUNK_GROUPS)
    with device_guard(w2d):
        _weight_dropout_kernel[(U,)](
            w2d, out, lim, packed if bits else out, seed, seed_ptr, D, origin, row_stride, F,
            packed.shape[1] if bits else 0, k if select else 0, SELECT=select, ONE_PASS=one_pass, BITS=bits,
            SAMPLED=select and one_pass and how == "sampled",
            ALIGNED=aligned(origin, row_stride), BLOCK_G=block_g, SEED_PTR=from_ptr,
            num_warps=forward_warps(one_pass, block_g))
    return out, lim, packed


def weight_dropout_backward(grad2d: torch.Tensor, w2d, limit, seed: int, drop_threshold: int, *,
                            window=None, bits=None) -> torch.Tensor:
    """``where(keep, grad, +0.0)``: keep read from ``bits`` when given (``w2d``/``limit`` unused),
    else recomputed from W's keys, ``limit`` and the seed."""
    check_w2d(grad2d, "grad2d")
    if bits is not None:
        return bits_backward(grad2d, bits)
    check_w2d(w2d)
    (seed, seed_ptr, from_ptr), D = seed_args(seed, w2d.device), check_drop_threshold(drop_threshold)
    U, F = w2d.shape
    check_grad(grad2d, w2d)
    limit = check_limit(limit, U, w2d.device)
    origin, row_stride = check_window(window, U, F)
    out = torch.empty_like(grad2d)
    if out.numel() == 0:
        return out
    block_g = _block_groups(triton.cdiv(F, 4), BACKWARD_GROUPS)
    with device_guard(w2d):
        launch_chunks(_weight_dropout_backward_kernel, U, F, 4 * block_g)(
            grad2d, w2d, limit, out, seed, seed_ptr, D, origin, row_stride, F,
            ALIGNED=aligned(origin, row_stride), BLOCK_G=block_g, SEED_PTR=from_ptr, num_warps=num_warps(4 * block_g))
    return out
