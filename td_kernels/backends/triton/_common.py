"""Pieces shared by the Triton kernels: the rank key, the Philox stream, the bit-packed
mask, launch helpers and argument checks.

Every kernel lays ``4 * BLOCK_G`` consecutive LOCAL columns of a row out as a ``[BLOCK_G, 4]``
tile: tile row ``r`` holds columns ``c0 + 4r .. c0 + 4r + 3`` (``c0`` a multiple of
``4 * BLOCK_G``).  Anchoring on local columns (not on global stream positions) means:
  * a program owns whole rows' column ranges, so the bit-packed keep mask (bit ``j % 32`` of
    int32 word ``j // 32``) is packed from a ``[BLOCK_G // 8, 32]`` reshape of the tile with
    no cross-program read-modify-write;
  * the global stream position of local ``(u, j)`` is ``s_u + j`` with the row start
    ``s_u = origin + u * row_stride`` (SPEC section 12); when every row starts 4-aligned
    (``origin % 4 == 0 and row_stride % 4 == 0``: F % 4 == 0 without a window, or an aligned
    shard) one ``tl.randint4x(seed, (s_u + c0) // 4 + r)`` (int64 offset) gives the tile
    row's four words ``word(s_u + c0 + 4r + lane)`` (SPEC section 5), one Philox4x32-10 per 4
    elements; otherwise the four positions straddle two Philox blocks, both are drawn and the
    lanes selected (2 Philox per 4 elements).  The launcher picks the variant (``aligned``).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ...reference import bits_words

KEY_MAX = 0x7FFFFFFF
# Triton picks interpreted or compiled kernels when @triton.jit runs (at import), so the
# CPU gate must look at the setting in force then, not at os.environ at call time.
INTERPRETED = bool(triton.knobs.runtime.interpret)


def _interpreter_index_fix() -> None:
    """Let Triton 3.6's interpreter run loops with runtime bounds under NumPy >= 2.4.

    Its scalars are 1-element 1-D arrays and ``tensor.__index__`` (what ``range(0, F, BLOCK)``
    calls) was ``int(data)``, which NumPy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); Triton 3.9 uses ``int(data.squeeze())``.  We re-set it to
    ``int(data.item())``, the same value, after the interpreter patches ``tl.tensor`` for a
    launch.  Interpreter only: compiled kernels never see this."""
    from triton.runtime import interpreter
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_td_kernels", False):
        return

    def patched(tensor, scope, *args, **kwargs):
        patch(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._td_kernels = True
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _interpreter_index_fix()


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
def _cols(BLOCK_G: tl.constexpr):
    """Local column offsets ``4r + l`` of a ``[BLOCK_G, 4]`` tile (int32)."""
    return tl.arange(0, BLOCK_G)[:, None] * 4 + tl.arange(0, 4)[None, :]


@triton.jit
def _tile_words(seed, base, ALIGNED: tl.constexpr, BLOCK_G: tl.constexpr):
    """``word(base + 4r + l)`` as a ``[BLOCK_G, 4]`` uint32 tile for an int64 stream position
    ``base``.  ALIGNED (the launcher knows ``base % 4 == 0`` for every row): one Philox call
    per tile row.  Otherwise the four positions straddle two Philox blocks: both are drawn and
    the lanes selected (2 calls per tile row, right for any ``base``).  A compile-time choice:
    a runtime branch on ``base % 4`` made the compiled tiles hold both paths' registers (250
    instead of 80 per thread at 8 warps x 8192 columns, measured with ptxas for sm_90)."""
    q = base // 4 + tl.arange(0, BLOCK_G).to(tl.int64)
    if ALIGNED:
        words = _lane_words(seed, q)
    else:
        r0, r1, r2, r3 = tl.randint4x(seed, q)
        n0, n1, n2, n3 = tl.randint4x(seed, q + 1)
        t = base % 4 + tl.arange(0, 4)[None, :]  # lane t of block q, or t - 4 of block q + 1
        words = tl.where(t == 0, r0[:, None],
                         tl.where(t == 1, r1[:, None],
                                  tl.where(t == 2, r2[:, None],
                                           tl.where(t == 3, r3[:, None],
                                                    tl.where(t == 4, n0[:, None],
                                                             tl.where(t == 5, n1[:, None], n2[:, None]))))))
    return words


@triton.jit
def _tile_dropped(seed, base, D, ALIGNED: tl.constexpr, BLOCK_G: tl.constexpr):
    """``word(base + 4r + l) < D`` on a ``[BLOCK_G, 4]`` tile (D int64: 2**32 drops all)."""
    return _tile_words(seed, base, ALIGNED, BLOCK_G).to(tl.int64) < D


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _store_bits(bits_row, c0, keep, NW, BLOCK_G: tl.constexpr):
    """Pack a ``[BLOCK_G, 4]`` keep tile of columns ``c0 ..`` (``c0 % 32 == 0``, False past F)
    into int32 words ``c0 // 32 ..`` of a row of ``NW`` words: bit ``j % 32`` of word ``j // 32``."""
    k32 = tl.reshape(keep.to(tl.int32), [BLOCK_G // 8, 32])
    words = tl.reduce(k32 << tl.arange(0, 32)[None, :], 1, _bit_or)
    w = c0 // 32 + tl.arange(0, BLOCK_G // 8)
    tl.store(bits_row + w, words, mask=w < NW)


@triton.jit
def _bits_backward_kernel(g_ptr, bits_ptr, out_ptr, U, F, NW, ROWS: tl.constexpr,
                          BLOCK_W: tl.constexpr):
    """``out = where(bit, grad, +0.0)`` from the packed mask, on ``ROWS`` rows x ``32 * BLOCK_W``
    columns per program.  Traffic per element: grad read once (a plain load, the select comes
    after, so it vectorises), out written once, 1/8 byte of mask read."""
    u = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)[:, None]  # [ROWS, 1]
    for w0 in range(tl.program_id(1) * BLOCK_W, NW, tl.num_programs(1) * BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)[None, :]                                        # [1, BLOCK_W]
        words = tl.load(bits_ptr + u * NW + w, mask=(u < U) & (w < NW), other=0)        # [ROWS, BLOCK_W]
        bit = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
        keep = tl.reshape(bit, [ROWS, 32 * BLOCK_W]) != 0
        j = w0 * 32 + tl.arange(0, 32 * BLOCK_W)[None, :]
        valid = (u < U) & (j < F)
        g = tl.load(g_ptr + u * F + j, mask=valid, other=0)
        tl.store(out_ptr + u * F + j, tl.where(keep, g, tl.zeros_like(g)), mask=valid)


MAX_GRID_1 = 65535  # CUDA's limit on grid axis 1


def num_warps(elements: int, per_warp: int = 256, most: int = 8) -> int:
    """Warps for a program over ``elements`` elements: one per ``per_warp``, 1 to ``most``."""
    return max(1, min(most, elements // per_warp))


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


def seed_args(seed, device):
    """``(seed, seed_ptr, SEED_PTR)`` kernel arguments for a launcher's ``seed``: a Python int
    (``seed_ptr`` then None), or the graph-safe seed, a 0-dim int64 tensor on ``device`` that the
    kernel loads itself (``_load_seed``), so a captured CUDA graph reads each replay's value."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.shape != () or seed.device != device:
            raise ValueError(f"seed given as a tensor must be a 0-dim int64 tensor on {device}, got {seed.dtype} "
                             f"{tuple(seed.shape)} on {seed.device}")
        return 0, seed, True
    return check_seed(seed), None, False


@triton.jit
def _load_seed(seed, seed_ptr, SEED_PTR: tl.constexpr):
    """The seed: the int64 argument, or (SEED_PTR) the value at ``seed_ptr`` on the device."""
    if SEED_PTR:
        seed = tl.load(seed_ptr)
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


def check_grad(grad2d: torch.Tensor, w2d: torch.Tensor) -> None:
    """A recompute backward's grad matches the weight it recomputes the mask from."""
    if grad2d.shape != w2d.shape or grad2d.device != w2d.device or grad2d.dtype != w2d.dtype:
        raise ValueError(f"grad2d must match w2d's shape {tuple(w2d.shape)}, dtype and device, "
                         f"got {tuple(grad2d.shape)} {grad2d.dtype} on {grad2d.device}")


def check_limit(limit, U: int, device) -> torch.Tensor:
    """A given ``limit`` must be int32 ``[U]`` on the weight's device."""
    if not isinstance(limit, torch.Tensor) or limit.dtype != torch.int32 or limit.shape != (U,) \
            or limit.device != device:
        got = f"{limit.dtype} {tuple(limit.shape)} on {limit.device}" if isinstance(limit, torch.Tensor) \
            else type(limit).__name__
        raise ValueError(f"limit must be an int32 tensor of shape ({U},) on {device}, got {got}")
    return limit.contiguous()


def aligned(origin: int, row_stride: int) -> bool:
    """Whether every row's stream start ``origin + u * row_stride`` is a multiple of 4."""
    return origin % 4 == 0 and row_stride % 4 == 0


def new_bits(U: int, F: int, device) -> torch.Tensor:
    """The packed keep mask a forward fills: int32 ``[U, ceil(F / 32)]`` (every word written)."""
    return torch.empty((U, bits_words(F)), dtype=torch.int32, device=device)


def launch_chunks(kernel, U: int, F: int, cols: int):
    """``kernel`` on grid (U, column chunks of ``cols``), axis 1 capped at CUDA's 65535 (the
    kernels loop over the chunks with a stride of ``num_programs(1)``)."""
    return kernel[(U, max(1, min(MAX_GRID_1, triton.cdiv(F, cols))))]


# Bits backward tile: 32 * BITS_BLOCK_W columns x as many rows as fit BITS_TILE elements.
BITS_BLOCK_W = 64
BITS_TILE = 4096


def bits_backward(grad2d: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``where(keep, grad, +0.0)`` with keep read from the packed mask ``bits``."""
    U, F = grad2d.shape
    NW = bits_words(F)
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.int32 or bits.shape != (U, NW) \
            or bits.device != grad2d.device:
        got = f"{bits.dtype} {tuple(bits.shape)} on {bits.device}" if isinstance(bits, torch.Tensor) \
            else type(bits).__name__
        raise ValueError(f"bits must be an int32 tensor of shape ({U}, {NW}) on {grad2d.device} "
                         f"(ceil(F/32) words per row), got {got}")
    out = torch.empty_like(grad2d)
    if out.numel() == 0:
        return out
    block_w = min(BITS_BLOCK_W, triton.next_power_of_2(NW))
    rows = max(1, min(BITS_TILE // (32 * block_w), triton.next_power_of_2(U)))
    grid = (triton.cdiv(U, rows), max(1, min(MAX_GRID_1, triton.cdiv(NW, block_w))))
    with device_guard(grad2d):
        _bits_backward_kernel[grid](grad2d, bits.contiguous(), out, U, F, NW, ROWS=rows,
                                    BLOCK_W=block_w, num_warps=num_warps(32 * block_w * rows))
    return out
