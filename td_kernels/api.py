"""The public functions: argument checks, SPEC sections 3, 6, 8, 9, then one op call.

A DTensor weight (SPEC section 12) goes to ``td_kernels.distributed``, which runs the same ops
on each rank's shard with a window into the global weight; a tensor on the ``meta`` device
goes through the ops' fake impls (shapes only, for deferred initialisation)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import ops
from ._registry import check_name, resolve
from .reference import check_nm, count, drop_threshold

__all__ = ["targeted_weight_dropout", "targeted_unit_dropout", "targeted_nm_dropout",
           "prune_weights", "prune_units", "prune_nm", "DEFAULT_MASK"]

# What the backward of weight and N:M targeting reads (td_kernels.ops): "bits", a 1-bit keep
# mask the forward writes in the same pass, or "recompute", the mask rebuilt from W and the seed.
DEFAULT_MASK = "bits"

SEED_LIMIT = 2**63
Rate = "float | Tensor"


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


def _check_common(w, drop_rate, targ_rate, training, backend, mask=None):
    _check_weight(w)
    drop_rate = _rate("drop_rate", drop_rate)
    targ_rate = _rate("targ_rate", targ_rate) if targ_rate is not None else None
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if mask is not None:
        ops.check_mask(mask)
    if w.device.type == "meta" or _is_dtensor(w):
        check_name(backend)  # a meta tensor runs no kernel; a DTensor's shards are checked on use
    else:
        resolve(backend, w.device, w.dtype)  # fail early, in eval mode too
    return drop_rate, targ_rate


def _fan_in(w: Tensor) -> int:
    return w.numel() // w.shape[0] if w.shape[0] else 0


def _sharded(kind: str, w, **kwargs):
    from . import distributed  # only DTensor users pay for importing torch.distributed.tensor

    return distributed.sharded_targeting(kind, w, **kwargs)


def targeted_weight_dropout(w: Tensor, drop_rate: Rate, targ_rate: Rate, *, training: bool = True,
                            seed: int | None = None, backend: str = "auto", mask: str = DEFAULT_MASK) -> Tensor:
    """Per unit (row of ``w.reshape(w.shape[0], -1)``), drop each of the ``targ_rate`` lowest-|w|
    weights with probability ``drop_rate`` (set to +0.0; no rescaling). Identity when not training.
    ``mask`` picks what the backward reads: ``"bits"`` (a 1-bit mask written by the forward) or
    ``"recompute"`` (the mask rebuilt from W and the seed; nothing per element kept)."""
    drop_rate, targ_rate = _check_common(w, drop_rate, targ_rate, training, backend, mask)
    if not training:
        return w
    if _is_dtensor(w):
        return _sharded("weight", w, drop_rate=drop_rate, targ_rate=targ_rate, seed=seed, backend=backend, mask=mask)
    out, _limit, _bits = ops.weight_dropout(w, weight_params(seed, drop_rate, targ_rate, _fan_in(w)), backend, mask)
    return out


def targeted_nm_dropout(w: Tensor, drop_rate: Rate, *, n: int = 2, m: int = 4, training: bool = True,
                        seed: int | None = None, backend: str = "auto", mask: str = DEFAULT_MASK) -> Tensor:
    """N:M targeted dropout (SPEC section 11): in every group of ``m`` consecutive weights of a
    unit, the ``m - n`` smallest-|w| are candidates, each dropped with probability ``drop_rate``.
    With ``drop_rate=1`` every group keeps at most ``n`` non-zeros (2:4 is what sparse tensor
    cores run). Identity when not training."""
    drop_rate, _ = _check_common(w, drop_rate, None, training, backend, mask)
    check_nm(n, m, _fan_in(w))
    if not training:
        return w
    if _is_dtensor(w):
        return _sharded("nm", w, drop_rate=drop_rate, n=n, m=m, seed=seed, backend=backend, mask=mask)
    out, _bits = ops.nm_dropout(w, nm_params(seed, drop_rate, _fan_in(w)), n, m, backend, mask)
    return out


def targeted_unit_dropout(w: Tensor, drop_rate: Rate, targ_rate: Rate, *, training: bool = True,
                          seed: int | None = None, backend: str = "auto") -> Tensor:
    """Drop each of the ``targ_rate`` lowest-L2-norm units (rows) with probability ``drop_rate``,
    one coin per unit (the whole row set to +0.0). Identity when not training."""
    drop_rate, targ_rate = _check_common(w, drop_rate, targ_rate, training, backend)
    if not training:
        return w
    if _is_dtensor(w):
        return _sharded("unit", w, drop_rate=drop_rate, targ_rate=targ_rate, seed=seed, backend=backend)
    out, _keep = ops.unit_dropout(w, unit_params(seed, drop_rate, targ_rate, w.shape[0]), backend)
    return out


def prune_weights(w: Tensor, rate: Rate, *, backend: str = "auto") -> Tensor:
    """Magnitude-prune the ``rate`` smallest-|w| weights of every unit (SPEC section 8)."""
    _rate("rate", rate)
    return targeted_weight_dropout(w, 1.0, rate, seed=0, backend=backend)


def prune_units(w: Tensor, rate: Rate, *, backend: str = "auto") -> Tensor:
    """Prune the ``rate`` lowest-L2-norm units (rows) of ``w`` (SPEC section 8)."""
    _rate("rate", rate)
    return targeted_unit_dropout(w, 1.0, rate, seed=0, backend=backend)


def prune_nm(w: Tensor, *, n: int = 2, m: int = 4, backend: str = "auto") -> Tensor:
    """N:M magnitude pruning (SPEC section 11): at most ``n`` non-zeros in every group of ``m``."""
    return targeted_nm_dropout(w, 1.0, n=n, m=m, seed=0, backend=backend)
