"""The pure-PyTorch reference: SPEC.md written out in tensor code.

Clarity beats speed here: every kernel in the library is tested bit for bit against these
functions. They run on any device torch supports and handle a 4096x4096 float32 weight in a
few seconds on a 2-core CPU (3.5-6 s measured; Philox on int64 tensors is most of it).
Section numbers refer to docs/SPEC.md.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "philox4x32_10", "philox_words", "rank_keys", "count", "drop_threshold",
    "weight_limits", "weight_keep", "weight_dropout", "weight_dropout_backward",
    "unit_norms", "unit_keep", "unit_dropout", "unit_dropout_backward",
]

MASK32 = 0xFFFFFFFF
KEY_MAX = 0x7FFFFFFF  # |x| has its sign bit clear, so no key exceeds this (NaN with full payload)
# Philox4x32 constants (Salmon et al., SC'11; Random123)
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


# ---- section 5: the random stream --------------------------------------------------------
def _mulhilo32(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of a * m for uint32 values a (held in int64) and constant m.

    Split m into 16-bit halves so that no int64 product overflows (a * m can reach 2**64)."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo = a * m_lo                       # < 2**48
    p_hi = a * m_hi                       # < 2**48, weighs 2**16
    t = p_lo + ((p_hi & 0xFFFF) << 16)    # < 2**49
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 values held in int64 tensors; returns the four output words."""
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for r in range(10):
        if r > 0:  # bump the key between rounds
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_words(seed: int, n: int, device=None) -> torch.Tensor:
    """``word(p)`` for p in [0, n): uint32 values in an int64 tensor."""
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    q = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    zero = torch.zeros_like(q)
    lanes = philox4x32_10(q & MASK32, q >> 32, zero, zero, seed & MASK32, seed >> 32)
    return torch.stack(lanes, dim=1).reshape(-1)[:n]  # word(p) = lane p % 4 of counter p // 4


# ---- sections 2, 3, 6: keys, counts, drop threshold --------------------------------------
def _float16_abs_bits_as_float32(x: torch.Tensor) -> torch.Tensor:
    """Exact float16 -> float32 widening of |x| in integer ops.

    torch's own CPU conversion is not one function: its vector loop keeps a NaN's payload, its
    scalar tail loop returns 0x7FFFFFFF, so a NaN's key would depend on where it sits. We fix the
    rule as the exact field-by-field widening (bfloat16's 16-bit shift is the same rule): exponent
    rebiased, mantissa shifted up 13 bits, a NaN's payload kept and never quieted. Keys are then
    strictly increasing in the 15 magnitude bits, so every backend computes them with integer ops."""
    h = x.view(torch.int16).to(torch.int64) & 0x7FFF
    exp, mant = h >> 10, h & 0x3FF
    normal = ((exp + 112) << 23) | (mant << 13)               # 127 - 15 = 112
    subnormal = (mant.to(torch.float32) * 2.0**-24).view(torch.int32).to(torch.int64)  # exact
    inf_nan = (255 << 23) | (mant << 13)
    return torch.where(exp == 0, subnormal, torch.where(exp == 31, inf_nan, normal))


def rank_keys(x: torch.Tensor) -> torch.Tensor:
    """``key(x)``: the bit pattern of |float32(x)| as an int64 in [0, 2**31)."""
    if x.dtype == torch.float16:
        return _float16_abs_bits_as_float32(x)
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64)  # bfloat16: an exact 16-bit shift
    return bits & KEY_MAX  # clearing the sign bit is |x| for every float, NaN included


def count(rate, n: int):
    """``count(r, n) = min(n, floor(r*n + 1e-6))`` with r*n in float64.

    A 0-dim tensor rate gives a 0-dim int64 tensor by the same float64 arithmetic, so a rate
    held in a tensor can change under torch.compile without a recompile."""
    if isinstance(rate, torch.Tensor):
        return torch.clamp(torch.floor(rate.to(torch.float64) * n + 1e-6), max=n).to(torch.int64)
    return min(n, math.floor(float(rate) * n + 1e-6))


def drop_threshold(drop_rate):
    """``D = floor(drop_rate * 2**32)``: a candidate at position p drops iff word(p) < D
    (a 0-dim int64 tensor for a tensor rate, as in :func:`count`)."""
    if isinstance(drop_rate, torch.Tensor):
        return torch.floor(drop_rate.to(torch.float64) * 2**32).to(torch.int64)
    return math.floor(float(drop_rate) * 2**32)


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The value at 0-based position k of each row in ascending order."""
    return torch.kthvalue(values, k + 1, dim=1).values


# ---- section 4: weight targeting ---------------------------------------------------------
def weight_limits(w2d: torch.Tensor, k: int) -> torch.Tensor:
    """Per-unit int32 ``limit``: (u, j) is a candidate iff key(w[u, j]) <= limit[u]."""
    U, F = w2d.shape
    if k == 0:
        return torch.full((U,), -1, dtype=torch.int32, device=w2d.device)
    if k == F:
        return torch.full((U,), KEY_MAX, dtype=torch.int32, device=w2d.device)
    t = _kth_smallest(rank_keys(w2d), k)  # strict: key < t  <=>  key <= t - 1
    return (t - 1).to(torch.int32)


def weight_keep(w2d, limit, seed: int, drop_threshold: int) -> torch.Tensor:
    """Bool mask of the kept elements: not (candidate and word(u*F + j) < D)."""
    U, F = w2d.shape
    candidate = rank_keys(w2d) <= limit.to(torch.int64)[:, None]
    dropped = philox_words(seed, U * F, w2d.device).view(U, F) < drop_threshold
    return ~(candidate & dropped)


def _zero_where_dropped(x, keep):
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def weight_dropout(w2d, seed: int, k: int, drop_threshold: int):
    limit = weight_limits(w2d, k)
    return _zero_where_dropped(w2d, weight_keep(w2d, limit, seed, drop_threshold)), limit


def weight_dropout_backward(grad2d, w2d, limit, seed: int, drop_threshold: int):
    return _zero_where_dropped(grad2d, weight_keep(w2d, limit, seed, drop_threshold))


# ---- section 4: unit targeting -----------------------------------------------------------
def unit_norms(w2d: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row: squares summed in float64, the norm rounded once to float32
    (float64 weights keep a float64 norm); a NaN norm is the canonical quiet NaN.

    SPEC allows float32 or wider; float32 sums drift apart by summation order (1e-5 relative at
    F = 2**22, past SPEC's 1e-6), float64 sums agree to ~1e-16 and neither overflow nor underflow,
    so every backend does it this way and ranks the same units."""
    norms = torch.linalg.vector_norm(w2d.to(torch.float64), dim=1)
    # a row holding a NaN has a NaN norm whose payload depends on the summation order: make it
    # the canonical quiet NaN, so NaN units tie (above +inf) in every backend
    norms = norms.masked_fill(norms.isnan(), float("nan"))
    return norms if w2d.dtype == torch.float64 else norms.to(torch.float32)


def _norm_keys(norms: torch.Tensor) -> torch.Tensor:
    """Order-preserving integer keys of non-negative norms, NaN above +inf."""
    if norms.dtype == torch.float64:
        return norms.view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    return rank_keys(norms)


def unit_keep(w2d, seed: int, k: int, drop_threshold: int) -> torch.Tensor:
    U = w2d.shape[0]
    keys = _norm_keys(unit_norms(w2d))
    if k == 0:
        candidate = torch.zeros(U, dtype=torch.bool, device=w2d.device)
    elif k == U:
        candidate = torch.ones(U, dtype=torch.bool, device=w2d.device)
    else:
        candidate = keys < _kth_smallest(keys[None, :], k)
    dropped = philox_words(seed, U, w2d.device) < drop_threshold  # one coin per unit, p = u
    return ~(candidate & dropped)


def unit_dropout(w2d, seed: int, k: int, drop_threshold: int):
    keep = unit_keep(w2d, seed, k, drop_threshold)
    return _zero_where_dropped(w2d, keep[:, None]), keep


def unit_dropout_backward(grad2d, keep):
    return _zero_where_dropped(grad2d, keep[:, None])
