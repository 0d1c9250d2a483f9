"""Argument checks and the ops' int64 parameter tensors, shared by the public functions
(``api``), the sharded path (``distributed``) and the modules (``training``): the layer below
all of them, so that none has to import another for these."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .reference import count, drop_threshold

SEED_LIMIT = 2**63


def _is_dtensor(w) -> bool:
    dt = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None) if torch.distributed.is_available() \
        else None
    return dt is not None and isinstance(w, dt)


def _check_weight(w) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.is_nested:
        raise TypeError("w must be a dense (strided) tensor, got a nested tensor")
    if w.layout != torch.strided:
        raise TypeError(f"w must be a dense (strided) tensor, got layout {w.layout}")
    if w.is_complex() or not w.is_floating_point():
        raise TypeError(f"w must be a real floating-point tensor (float16, bfloat16, float32, float64); got {w.dtype}")
    if w.ndim < 2:
        raise ValueError(
            f"w must have at least 2 dimensions (units x fan-in), got shape {tuple(w.shape)}; "
            "a 1-D tensor such as a bias has no fan-in to rank")


def _check_rate(name: str, rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(rate).__name__}")
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:  # NaN fails this too
        raise ValueError(f"{name} must be in [0, 1], got {rate}")
    return rate


def _rate(name: str, rate):
    """A Python real in [0, 1], or a 0-dim floating-point CPU tensor holding one: under
    torch.compile a tensor rate can change every step without a recompile (td.nn does this)."""
    if not isinstance(rate, Tensor):
        return _check_rate(name, rate)
    if rate.ndim != 0 or not rate.is_floating_point() or rate.device.type != "cpu":
        raise TypeError(f"{name} given as a tensor must be a 0-dim floating-point CPU tensor, got "
                        f"{rate.dtype} of shape {tuple(rate.shape)} on {rate.device}")
    if not torch.compiler.is_compiling():  # a graph cannot check a value; eager can, without a sync
        _check_rate(name, rate.item())
    return rate


def _seed_tensor(seed) -> Tensor:
    """SPEC section 9: None draws from torch's default CPU generator (no device sync)."""
    if seed is None:  # device="cpu": a default-device context must not move the draw
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, device="cpu")
    if isinstance(seed, Tensor):
        # a 0-dim int64 CPU tensor: td.nn passes its per-layer seed this way, so that a compiled
        # model gets a new seed every step as data, never as a new graph (as rates, see _rate)
        if seed.ndim != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise TypeError(f"seed given as a tensor must be a 0-dim int64 CPU tensor, got {seed.dtype} of shape "
                            f"{tuple(seed.shape)} on {seed.device}")
        if not torch.compiler.is_compiling() and not 0 <= int(seed) < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {int(seed)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int in [0, 2**63) or None, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(int(seed), dtype=torch.int64, device="cpu")


# ---- SPEC section 9: the graph-safe seed --------------------------------------------------
# With seed=None, a CUDA weight's s may come from torch's CUDA generator on the device
# (device_seed), so that a captured CUDA graph draws a fresh s at each replay; the CPU draw
# above happens once, at capture, and a replay would repeat its mask. The device path is built
# and tested here (the kernels read the seed from a device tensor: checked bit for bit on the
# CPU, through the Triton interpreter and the native CPU kernels) but has never run on a GPU,
# so it stays off: seed=None on CUDA draws on the CPU as before, and a call during CUDA graph
# capture raises (CAPTURE_ERROR). The GPU session sets this to True once the `cuda`-marked
# tests of tests/test_graph_seed.py pass.
GRAPH_SAFE_VERIFIED = False

CAPTURE_ERROR = (
    "td_kernels: seed=None during CUDA graph capture would draw one seed at capture time and every replay would "
    "repeat that one mask. The graph-safe seed (SPEC section 9: s derived on the device from torch's CUDA "
    "generator) is not enabled yet (td_kernels._params.GRAPH_SAFE_VERIFIED is False until it has run on a GPU). "
    "Pass an explicit seed (one fixed mask, by design) or run this call outside CUDA graph capture.")


def device_seed(device) -> Tensor:
    """The graph-safe seed: a 0-dim int64 tensor on CUDA ``device`` holding
    ``s = torch.randint(2**63 - 1, (), dtype=torch.int64, device=device)``.

    torch's CUDA generator draws it: its kernel reads the generator's Philox seed and offset on
    the device (``at::cuda::philox::unpack`` of ``philox_cuda_state``, as ``F.dropout`` does)
    and the host advances the offset per call, so under CUDA graph capture every replay draws
    a new s, and ``torch.manual_seed`` reproduces the sequence. (The same draw seeds Triton's
    random ops in torch.compile's generated code, ``inductor_seeds``. Under torch.compile
    inductor draws this randint with its own generator, as it does the CPU draw of seed=None:
    reproducible, other values than eager.) The kernels read s from this tensor, never a host
    copy."""
    return torch.randint(SEED_LIMIT - 1, (), dtype=torch.int64, device=device)


def capturing(w: Tensor) -> bool:
    """Whether a call on ``w`` runs during CUDA graph capture (read eagerly, not traced)."""
    return (w.device.type == "cuda" and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


def call_seed(seed, w: Tensor):
    """``(seed, dseed)`` of a public call: ``dseed`` the graph-safe seed (then ``seed`` 0 only
    fills params) for ``seed=None`` on a plain CUDA tensor once GRAPH_SAFE_VERIFIED, else None.
    ``seed=None`` during CUDA graph capture without it raises CAPTURE_ERROR."""
    if seed is not None:
        return seed, None
    if GRAPH_SAFE_VERIFIED and w.device.type == "cuda" and not _is_dtensor(w):
        return 0, device_seed(w.device)
    if capturing(w):
        raise RuntimeError(CAPTURE_ERROR)
    return None, None


def _int64_cpu(parts) -> Tensor:
    if torch.compiler.is_compiling():  # the parts may be graph values (tensor rates, seeds)
        return torch.stack([torch.as_tensor(p, dtype=torch.int64, device="cpu") for p in parts])
    return torch.tensor([int(p) for p in parts], dtype=torch.int64, device="cpu")  # CPU values: no sync


def weight_params(seed, drop_rate, targ_rate, F: int, window=None) -> Tensor:
    """``ops.weight_dropout``'s params: int64 CPU ``(seed, k = count(targ_rate, F), D, origin,
    row_stride)``; ``window`` (origin, row_stride) defaults to the whole weight ``(0, F)``."""
    origin, row_stride = window if window is not None else (0, F)
    return _int64_cpu((_seed_tensor(seed), count(targ_rate, F), drop_threshold(drop_rate), origin, row_stride))


def nm_params(seed, drop_rate, F: int, window=None) -> Tensor:
    """``ops.nm_dropout``'s params: int64 CPU ``(seed, D, origin, row_stride)``."""
    origin, row_stride = window if window is not None else (0, F)
    return _int64_cpu((_seed_tensor(seed), drop_threshold(drop_rate), origin, row_stride))


def unit_params(seed, drop_rate, targ_rate, U: int) -> Tensor:
    """``ops.unit_dropout``'s params: int64 CPU ``(seed, k = count(targ_rate, U), D)``."""
    return _int64_cpu((_seed_tensor(seed), count(targ_rate, U), drop_threshold(drop_rate)))


def _fan_in(w: Tensor) -> int:
    return w.numel() // w.shape[0] if w.shape[0] else 0
