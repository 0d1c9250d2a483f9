"""The public functions: argument checks, SPEC sections 3, 6, 8, 9, then one op call.

A DTensor weight (SPEC section 12) goes to ``td_kernels.distributed``, which runs the same ops
on each rank's shard with a window into the global weight; a tensor on the ``meta`` device
goes through the ops' fake impls (shapes only, for deferred initialisation)."""
from __future__ import annotations

from torch import Tensor

from . import ops
from ._params import _check_weight, _fan_in, _is_dtensor, _rate, call_seed, nm_params, unit_params, weight_params
from ._registry import check_name, resolve
from .reference import check_nm

__all__ = ["targeted_weight_dropout", "targeted_unit_dropout", "targeted_nm_dropout",
           "prune_weights", "prune_units", "prune_nm", "DEFAULT_MASK"]

# What the backward of weight and N:M targeting reads (td_kernels.ops): "bits", a 1-bit keep
# mask the forward writes in the same pass, or "recompute", the mask rebuilt from W and the seed.
DEFAULT_MASK = "bits"

Rate = "float | Tensor"


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
    seed, dseed = call_seed(seed, w)
    if _is_dtensor(w):
        return _sharded("weight", w, drop_rate=drop_rate, targ_rate=targ_rate, seed=seed, backend=backend, mask=mask)
    out, _limit, _bits = ops.weight_dropout(w, weight_params(seed, drop_rate, targ_rate, _fan_in(w)), backend, mask,
                                            dseed=dseed)
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
    seed, dseed = call_seed(seed, w)
    if _is_dtensor(w):
        return _sharded("nm", w, drop_rate=drop_rate, n=n, m=m, seed=seed, backend=backend, mask=mask)
    out, _bits = ops.nm_dropout(w, nm_params(seed, drop_rate, _fan_in(w)), n, m, backend, mask, dseed=dseed)
    return out


def targeted_unit_dropout(w: Tensor, drop_rate: Rate, targ_rate: Rate, *, training: bool = True,
                          seed: int | None = None, backend: str = "auto") -> Tensor:
    """Drop each of the ``targ_rate`` lowest-L2-norm units (rows) with probability ``drop_rate``,
    one coin per unit (the whole row set to +0.0). Identity when not training."""
    drop_rate, targ_rate = _check_common(w, drop_rate, targ_rate, training, backend)
    if not training:
        return w
    seed, dseed = call_seed(seed, w)
    if _is_dtensor(w):
        return _sharded("unit", w, drop_rate=drop_rate, targ_rate=targ_rate, seed=seed, backend=backend)
    out, _keep = ops.unit_dropout(w, unit_params(seed, drop_rate, targ_rate, w.shape[0]), backend, dseed=dseed)
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
