"""The pure-PyTorch reference: SPEC.md written out in tensor code.

Clarity beats speed here: every kernel in the library is tested bit for bit against these
functions. They run on any device torch supports and handle a 4096x4096 float32 weight in a
few seconds on a 2-core CPU (3.5-6 s measured; Philox on int64 tensors is most of it).
Section numbers refer to docs/SPEC.md.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ._registry import check_variant

__all__ = [
    "philox4x32_10", "philox_words", "window_words", "rank_keys", "count", "drop_threshold",
    "Window", "check_window", "pack_bits", "unpack_bits", "bits_words",
    "weight_limits", "weight_keep", "weight_dropout", "weight_dropout_backward",
    "nm_keep", "nm_dropout", "nm_dropout_backward", "check_nm",
    "unit_sumsq", "unit_norms", "unit_keep", "unit_dropout", "unit_dropout_backward",
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


# ---- section 12: a window of a global weight ----------------------------------------------
class Window(NamedTuple):
    """Where a local ``[U, F]`` block sits in the global weight's stream (SPEC section 12).

    Local element ``(u, j)`` has the global flat index ``origin + u * row_stride + j``: for a
    shard holding global rows ``r0..`` and columns ``c0..c0+F`` of a weight with global fan-in
    ``Fg``, ``origin = r0 * Fg + c0`` and ``row_stride = Fg``. A whole weight is
    ``Window(0, F)``; every launcher takes ``window=None`` to mean that."""
    origin: int
    row_stride: int


def check_window(window, U: int, F: int) -> Window:
    """``window`` (None, or an (origin, row_stride) pair of ints) as a checked Window.

    The local row must fit in a global row (``origin % row_stride + F <= row_stride``) and
    every position must be below 2**62, so that int64 index arithmetic never overflows."""
    if window is None:
        return Window(0, F)
    if not isinstance(window, tuple) or len(window) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) for v in window):
        raise TypeError(f"window must be None or a pair of ints (origin, row_stride), got {window!r}")
    origin, row_stride = window
    if origin < 0 or row_stride < F or (row_stride > 0 and origin % row_stride + F > row_stride):
        raise ValueError(f"window (origin={origin}, row_stride={row_stride}) cannot hold rows of F={F} "
                         "elements: origin % row_stride + F must be <= row_stride")
    if origin + max(U, 1) * max(row_stride, 1) >= 2**62:
        raise ValueError(f"window (origin={origin}, row_stride={row_stride}) reaches past 2**62 positions")
    return Window(origin, row_stride)


def window_words(seed: int, U: int, F: int, window=None, device=None) -> torch.Tensor:
    """``word(origin + u * row_stride + j)`` for the ``[U, F]`` block of ``window``: int64 [U, F].

    Each row is a run of consecutive stream positions, so it costs one Philox evaluation per 4
    positions (plus at most 2 per row at its ends) like :func:`philox_words`."""
    origin, row_stride = check_window(window, U, F)
    if (origin, row_stride) == (0, F):
        return philox_words(seed, U * F, device).view(U, F)
    if U * F == 0:
        return torch.empty(U, F, dtype=torch.int64, device=device)
    start = origin + torch.arange(U, dtype=torch.int64, device=device) * row_stride  # [U]
    nq = (F + 3) // 4 + 1                             # blocks a row of F positions can touch
    q = (start // 4)[:, None] + torch.arange(nq, dtype=torch.int64, device=device)[None, :]
    zero = torch.zeros_like(q)
    lanes = philox4x32_10(q & MASK32, q >> 32, zero, zero, seed & MASK32, seed >> 32)
    words = torch.stack(lanes, dim=2).reshape(U, 4 * nq)  # positions 4 * (start // 4) + c
    cols = (start % 4)[:, None] + torch.arange(F, dtype=torch.int64, device=device)[None, :]
    return torch.gather(words, 1, cols)


# ---- section 7: the bit-packed keep mask -------------------------------------------------
def bits_words(F: int) -> int:
    """int32 words per unit of a bit-packed keep mask: ``ceil(F / 32)``."""
    return (F + 31) // 32


def pack_bits(keep2d: torch.Tensor) -> torch.Tensor:
    """Bool ``[U, F]`` -> int32 ``[U, ceil(F/32)]``: bit ``j % 32`` of word ``[u, j // 32]`` is
    ``keep[u, j]`` (1 = kept), padding bits 0. Every backend writes exactly this layout."""
    U, F = keep2d.shape
    W = bits_words(F)
    padded = torch.zeros(U, 32 * W, dtype=torch.int64, device=keep2d.device)
    padded[:, :F] = keep2d.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=keep2d.device),
                                       torch.arange(32, device=keep2d.device))
    words = (padded.view(U, W, 32) * weights).sum(dim=2, dtype=torch.int64)  # in [0, 2**32)
    return (words - ((words >> 31) << 32)).to(torch.int32)        # two's complement int32


def unpack_bits(bits: torch.Tensor, F: int) -> torch.Tensor:
    """int32 ``[U, ceil(F/32)]`` -> bool ``[U, F]`` (the inverse of :func:`pack_bits`)."""
    U = bits.shape[0]
    shifts = torch.arange(32, dtype=torch.int64, device=bits.device)
    return ((bits.to(torch.int64)[:, :, None] >> shifts) & 1).reshape(U, 32 * bits.shape[1])[:, :F].bool()


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


def _float64_nan_keys(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """float64 NaNs' keys spelled out as x86 and ARM convert a NaN to float32: quiet bit set, the
    top 23 payload bits kept (csrc/td_core.h key_f64 does the same). torch's CUDA conversion
    returns the canonical NaN instead, so the reference must not rely on ``.to`` for NaNs: then
    it gives the same keys on every device."""
    payload = (x.view(torch.int64) >> 29) & 0x7FFFFF  # float64's 52-bit payload, top 23 bits
    return torch.where(keys > 0x7F800000, 0x7FC00000 | payload, keys)


def rank_keys(x: torch.Tensor) -> torch.Tensor:
    """``key(x)``: the bit pattern of |float32(x)| as an int64 in [0, 2**31)."""
    if x.dtype == torch.float16:
        return _float16_abs_bits_as_float32(x)
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64)  # bfloat16: an exact 16-bit shift
    keys = bits & KEY_MAX  # clearing the sign bit is |x| for every float, NaN included
    return _float64_nan_keys(x, keys) if x.dtype == torch.float64 else keys


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


def weight_keep(w2d, limit, seed: int, drop_threshold: int, window=None) -> torch.Tensor:
    """Bool mask of the kept elements: not (candidate and word(position) < D)."""
    U, F = w2d.shape
    candidate = rank_keys(w2d) <= limit.to(torch.int64)[:, None]
    dropped = window_words(seed, U, F, window, w2d.device) < drop_threshold
    return ~(candidate & dropped)


def _zero_where_dropped(x, keep):
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _bits_or_none(keep, bits: bool):
    return pack_bits(keep) if bits else None


def weight_dropout(w2d, seed: int, k: int, drop_threshold: int, *, window=None, limit=None, bits: bool = False,
                   variant=None):
    """``(out, limit, bits)``: ``limit`` given (int32 [U]) skips the selection (k is then unused);
    ``bits`` asks for the packed keep mask (else None). ``variant``: None, the one algorithm."""
    check_variant("reference", "weight", variant, ())
    if limit is None:
        limit = weight_limits(w2d, k)
    keep = weight_keep(w2d, limit, seed, drop_threshold, window)
    return _zero_where_dropped(w2d, keep), limit, _bits_or_none(keep, bits)


def weight_dropout_backward(grad2d, w2d, limit, seed: int, drop_threshold: int, *, window=None, bits=None):
    """``where(keep, grad, +0.0)``: keep read from ``bits`` when given, else recomputed from W."""
    if bits is not None:
        return _zero_where_dropped(grad2d, unpack_bits(bits, grad2d.shape[1]))
    return _zero_where_dropped(grad2d, weight_keep(w2d, limit, seed, drop_threshold, window))


# ---- section 11: N:M targeting -----------------------------------------------------------
def check_nm(n, m, F: Optional[int] = None) -> tuple[int, int]:
    """``1 <= n < m <= 16`` ints, and ``m`` divides the fan-in ``F`` when given."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 1 <= n < m <= 16:
        raise ValueError(f"N:M targeting needs 1 <= n < m <= 16, got n={n}, m={m}")
    if F is not None and F % m:
        raise ValueError(f"m={m} must divide the fan-in F={F} (N:M groups are m consecutive weights of a unit)")
    return n, m


def nm_keep(w2d, seed: int, n: int, m: int, drop_threshold: int, window=None) -> torch.Tensor:
    """Bool keep mask: in each group of m consecutive elements of a row, the m - n first in
    ``(key, j)`` order are candidates (a tie goes to the lower j), dropped iff word < D."""
    U, F = w2d.shape
    check_nm(n, m, F)
    keys = rank_keys(w2d).view(U, F // m, m)
    order = torch.argsort(keys, dim=2, stable=True)    # stable: equal keys keep j order
    rank = torch.empty_like(order).scatter_(2, order, torch.arange(m, device=w2d.device).expand_as(order))
    candidate = (rank < m - n).view(U, F)
    dropped = window_words(seed, U, F, window, w2d.device) < drop_threshold
    return ~(candidate & dropped)


def nm_dropout(w2d, seed: int, n: int, m: int, drop_threshold: int, *, window=None, bits: bool = False):
    """``(out, bits)`` of N:M targeting (``bits`` None unless asked for)."""
    keep = nm_keep(w2d, seed, n, m, drop_threshold, window)
    return _zero_where_dropped(w2d, keep), _bits_or_none(keep, bits)


def nm_dropout_backward(grad2d, w2d, seed: int, n: int, m: int, drop_threshold: int, *, window=None, bits=None):
    if bits is not None:
        return _zero_where_dropped(grad2d, unpack_bits(bits, grad2d.shape[1]))
    return _zero_where_dropped(grad2d, nm_keep(w2d, seed, n, m, drop_threshold, window))


# ---- section 4: unit targeting -----------------------------------------------------------
def unit_sumsq(w2d: torch.Tensor) -> torch.Tensor:
    """float64 sum of squares of each row: what shards of a row add up (SPEC section 12)."""
    return w2d.to(torch.float64).square().sum(dim=1)


def norms_from_sumsq(sumsq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sqrt in float64, rounded once to float32 (float64 kept for float64 weights), NaN canonical."""
    norms = sumsq.sqrt()
    norms = norms.masked_fill(norms.isnan(), float("nan"))
    return norms if dtype == torch.float64 else norms.to(torch.float32)


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
    return unit_keep_from_norms(unit_norms(w2d), seed, k, drop_threshold)


def unit_keep_from_norms(norms, seed: int, k: int, drop_threshold: int) -> torch.Tensor:
    """Bool [U] from the units' norms: candidates strictly below the norm at position k."""
    U, dev = norms.shape[0], norms.device
    keys = _norm_keys(norms)
    if k == 0:
        candidate = torch.zeros(U, dtype=torch.bool, device=dev)
    elif k == U:
        candidate = torch.ones(U, dtype=torch.bool, device=dev)
    else:
        candidate = keys < _kth_smallest(keys[None, :], k)
    dropped = philox_words(seed, U, dev) < drop_threshold  # one coin per unit, p = u
    return ~(candidate & dropped)


def unit_dropout(w2d, seed: int, k: int, drop_threshold: int):
    keep = unit_keep(w2d, seed, k, drop_threshold)
    return _zero_where_dropped(w2d, keep[:, None]), keep


def unit_dropout_backward(grad2d, keep):
    return _zero_where_dropped(grad2d, keep[:, None])
