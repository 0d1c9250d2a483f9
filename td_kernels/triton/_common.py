"""Pieces shared by the Triton kernels: the rank key, the Philox stream, launch helpers.

Every kernel lays a stretch of the flat index space out as a ``[BLOCK_Q, 4]`` tile whose
row ``q`` holds the four stream positions ``4q .. 4q+3``: one ``tl.randint4x(seed, q)``
call (int64 ``q``, Triton >= 3.4) then yields the four words ``word(4q + lane)`` of
SPEC section 5, one Philox4x32-10 evaluation per 4 elements.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

KEY_MAX = 0x7FFFFFFF
# Triton picks interpreted or compiled kernels when @triton.jit runs (at import), so the
# CPU gate must look at the setting in force then, not at os.environ at call time.
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _to_f32(x):
    """Exact widening to float32.  bfloat16 is the top half of a float32, so widen it with a
    shift (Triton's interpreter mis-converts bfloat16 subnormals with ``.to``)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _key(x):
    """SPEC section 2: bits of |float32(x)|, computed with integer ops so that every target
    (and the interpreter) gives the same bits, NaN payloads included."""
    if x.dtype == tl.float32:
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    elif x.dtype == tl.bfloat16:
        key = (x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF) << 16
    else:  # float16: 5-bit exponent, 10-bit mantissa, bias 15 (float32: 8, 23, 127)
        h = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        e = h >> 10
        # subnormal m * 2**-24 is a normal float32: the multiply is exact
        sub = ((h & 0x3FF).to(tl.float32) * 5.9604644775390625e-08).to(tl.int32, bitcast=True)
        # normal: rebias the exponent by 127 - 15 = 112; inf/NaN: exponent 31 -> 255, a NaN's
        # payload shifted up and never quieted (the exact widening of README "Where we had to decide")
        big = (h << 13) + tl.where(e == 31, 224 << 23, 112 << 23)
        key = tl.where(e == 0, sub, big)
    return key


@triton.jit
def _lane_words(seed, q):
    """``word(4*q[:, None] + lane)`` as a ``[len(q), 4]`` uint32 tile: one Philox call per row."""
    r0, r1, r2, r3 = tl.randint4x(seed, q)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, r0[:, None],
                    tl.where(lane == 1, r1[:, None],
                             tl.where(lane == 2, r2[:, None], r3[:, None])))


@triton.jit
def _dropped(seed, q, D):
    """``word(p) < D`` on a ``[len(q), 4]`` tile; D is int64 so D == 2**32 drops every word."""
    return _lane_words(seed, q).to(tl.int64) < D  # uint32 -> int64 zero-extends


MAX_GRID_1 = 65535  # CUDA's limit on grid axis 1


def num_warps(elements: int) -> int:
    """Warps for a program over ``elements`` elements: one per 256, 1 to 8."""
    return max(1, min(8, elements // 256))


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def check_drop_threshold(drop_threshold) -> int:
    if isinstance(drop_threshold, bool) or not isinstance(drop_threshold, int):
        raise TypeError(f"drop_threshold must be an int, got {type(drop_threshold).__name__}")
    if not 0 <= drop_threshold <= 2**32:
        raise ValueError(f"drop_threshold must be in [0, 2**32], got {drop_threshold}")
    return drop_threshold


def check_count(k, n: int, name: str) -> int:
    """k (targeted elements per unit, or targeted units) must be an int in [0, n]."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {name}={n}], got {k!r}")
    return k


def check_w2d(w2d: torch.Tensor, name: str = "w2d") -> None:
    if not isinstance(w2d, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w2d).__name__}")
    if w2d.dim() != 2:
        raise ValueError(f"{name} must be 2-D [U, F], got shape {tuple(w2d.shape)}")
    if w2d.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {w2d.dtype}")
    if not w2d.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if w2d.shape[1] >= 2**31:
        raise ValueError(f"{name}: the Triton backend takes rows of fewer than 2**31 elements "
                         f"(int32 counts), got F = {w2d.shape[1]}")
