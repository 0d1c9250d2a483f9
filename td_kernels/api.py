"""The public functions: argument checks, SPEC sections 3, 6, 8, 9, then one op call."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import ops
from ._registry import resolve
from .reference import count, drop_threshold

__all__ = ["targeted_weight_dropout", "targeted_unit_dropout", "prune_weights", "prune_units"]

SEED_LIMIT = 2**63


def _check_weight(w) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
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
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {rate}")
    return rate


def _seed_tensor(seed) -> Tensor:
    """SPEC section 9: None draws from torch's default CPU generator (no device sync)."""
    if seed is None:
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int in [0, 2**63) or None, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(int(seed), dtype=torch.int64)


def _check_common(w, drop_rate, targ_rate, training, backend):
    _check_weight(w)
    drop_rate = _check_rate("drop_rate", drop_rate)
    targ_rate = _check_rate("targ_rate", targ_rate)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    resolve(backend, w.device, w.dtype)  # fail early, in eval mode too
    return drop_rate, targ_rate


def targeted_weight_dropout(w: Tensor, drop_rate: float, targ_rate: float, *, training: bool = True,
                            seed: int | None = None, backend: str = "auto") -> Tensor:
    """Per unit (row of ``w.reshape(w.shape[0], -1)``), drop each of the ``targ_rate`` lowest-|w|
    weights with probability ``drop_rate`` (set to +0.0; no rescaling). Identity when not training."""
    drop_rate, targ_rate = _check_common(w, drop_rate, targ_rate, training, backend)
    if not training:
        return w
    fan_in = w.numel() // w.shape[0] if w.shape[0] else 0
    out, _limit = ops.weight_dropout(w, _seed_tensor(seed), count(targ_rate, fan_in), drop_threshold(drop_rate),
                                     backend)
    return out


def targeted_unit_dropout(w: Tensor, drop_rate: float, targ_rate: float, *, training: bool = True,
                          seed: int | None = None, backend: str = "auto") -> Tensor:
    """Drop each of the ``targ_rate`` lowest-L2-norm units (rows) with probability ``drop_rate``,
    one coin per unit (the whole row set to +0.0). Identity when not training."""
    drop_rate, targ_rate = _check_common(w, drop_rate, targ_rate, training, backend)
    if not training:
        return w
    out, _keep = ops.unit_dropout(w, _seed_tensor(seed), count(targ_rate, w.shape[0]), drop_threshold(drop_rate),
                                  backend)
    return out


def prune_weights(w: Tensor, rate: float, *, backend: str = "auto") -> Tensor:
    """Magnitude-prune the ``rate`` smallest-|w| weights of every unit (SPEC section 8)."""
    _check_rate("rate", rate)
    return targeted_weight_dropout(w, 1.0, rate, seed=0, backend=backend)


def prune_units(w: Tensor, rate: float, *, backend: str = "auto") -> Tensor:
    """Prune the ``rate`` lowest-L2-norm units (rows) of ``w`` (SPEC section 8)."""
    _check_rate("rate", rate)
    return targeted_unit_dropout(w, 1.0, rate, seed=0, backend=backend)
