"""The public functions: argument checks, SPEC sections 3, 6, 8, 9, then one op call."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import ops
from ._registry import resolve
from .reference import count, drop_threshold

__all__ = ["targeted_weight_dropout", "targeted_unit_dropout", "prune_weights", "prune_units"]

SEED_LIMIT = 2**63
Rate = "float | Tensor"


def _check_weight(w) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
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
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int in [0, 2**63) or None, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(int(seed), dtype=torch.int64, device="cpu")


def _params(seed, drop_rate, targ_rate, n: int) -> Tensor:
    """The ops' ``params``: int64 CPU ``(seed, k = count(targ_rate, n), D = drop_threshold(drop_rate))``."""
    parts = (_seed_tensor(seed), count(targ_rate, n), drop_threshold(drop_rate))
    return torch.stack([torch.as_tensor(p, dtype=torch.int64, device="cpu") for p in parts])


def _check_common(w, drop_rate, targ_rate, training, backend):
    _check_weight(w)
    drop_rate = _rate("drop_rate", drop_rate)
    targ_rate = _rate("targ_rate", targ_rate)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    resolve(backend, w.device, w.dtype)  # fail early, in eval mode too
    return drop_rate, targ_rate


def targeted_weight_dropout(w: Tensor, drop_rate: Rate, targ_rate: Rate, *, training: bool = True,
                            seed: int | None = None, backend: str = "auto") -> Tensor:
    """Per unit (row of ``w.reshape(w.shape[0], -1)``), drop each of the ``targ_rate`` lowest-|w|
    weights with probability ``drop_rate`` (set to +0.0; no rescaling). Identity when not training."""
    drop_rate, targ_rate = _check_common(w, drop_rate, targ_rate, training, backend)
    if not training:
        return w
    fan_in = w.numel() // w.shape[0] if w.shape[0] else 0
    out, _limit = ops.weight_dropout(w, _params(seed, drop_rate, targ_rate, fan_in), backend)
    return out


def targeted_unit_dropout(w: Tensor, drop_rate: Rate, targ_rate: Rate, *, training: bool = True,
                          seed: int | None = None, backend: str = "auto") -> Tensor:
    """Drop each of the ``targ_rate`` lowest-L2-norm units (rows) with probability ``drop_rate``,
    one coin per unit (the whole row set to +0.0). Identity when not training."""
    drop_rate, targ_rate = _check_common(w, drop_rate, targ_rate, training, backend)
    if not training:
        return w
    out, _keep = ops.unit_dropout(w, _params(seed, drop_rate, targ_rate, w.shape[0]), backend)
    return out


def prune_weights(w: Tensor, rate: Rate, *, backend: str = "auto") -> Tensor:
    """Magnitude-prune the ``rate`` smallest-|w| weights of every unit (SPEC section 8)."""
    _rate("rate", rate)
    return targeted_weight_dropout(w, 1.0, rate, seed=0, backend=backend)


def prune_units(w: Tensor, rate: Rate, *, backend: str = "auto") -> Tensor:
    """Prune the ``rate`` lowest-L2-norm units (rows) of ``w`` (SPEC section 8)."""
    _rate("rate", rate)
    return targeted_unit_dropout(w, 1.0, rate, seed=0, backend=backend)
