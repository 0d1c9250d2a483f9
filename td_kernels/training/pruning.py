"""Post hoc magnitude pruning of a model (paper section 2.3), with plain checkpoints.

``prune_model(model, rate)`` prunes the ``rate`` smallest-|w| weights of every unit
(``mode="weight"``, eq. 2), the ``rate`` lowest-L2-norm units (``mode="unit"``, eq. 1), or all but
the ``n`` largest of every group of ``m`` weights of a unit (``mode="nm"``, SPEC section 11: the
exact N:M pattern) of each registered layer (``td.register_layer``) except the output head,
layer by layer. The masks come from ``td.prune_weights`` / ``td.prune_units`` / ``td.prune_nm``
(SPEC sections 8 and 11) along each layer's units (``td.nn.unit_view``). Biases are not pruned
(section 2.1).

``permanent=True`` (default): the pruned weights are set to +0.0 in place, so the model keeps
plain ``weight`` keys (same Parameter objects, shapes and state_dict) holding the zeros, and a
gradient hook on each pruned Parameter zeroes the gradient of the pruned positions, so that
fine-tuning keeps the zeros with any optimizer created after pruning (the hook lives as long as
the Parameter: a reloaded or deep-copied model gets it back by calling ``prune_model`` again
with the same arguments, which finds the same masks: the zeros are the smallest keys).
``permanent=False`` leaves torch's reparametrization instead (``weight_orig`` Parameter,
``weight_mask`` buffer, ``torch.nn.utils.prune.remove`` makes it permanent): the method is
:class:`TargetedPruning`, a ``torch.nn.utils.prune`` method usable on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils.weak import WeakIdKeyDictionary

from .. import ops, reference
from .._params import _fan_in, nm_params, unit_params, weight_params
from .batchnorm import _check_data, batchnorm_modules, recalibrate_batchnorm
from .nn import (LAST_LINEAR, _check_mode, _check_model, _check_nm_args, _check_rate, _nothing_to, _select,
                 layer_type, prunable_layers)

__all__ = ["TargetedPruning", "prune_model", "sparsity_report", "SparsityReport", "LayerSparsity"]


class TargetedPruning(prune.BasePruningMethod):
    """A torch pruning method whose mask is the keep mask of ``td.prune_weights`` (``mode=
    "weight"``), ``td.prune_units`` (``"unit"``) or ``td.prune_nm`` (``"nm"``, ``rate`` None),
    with units along ``unit_dim``, applied to the weight as already pruned (so pruning twice
    composes: the new mask is ANDed with the old). The rate is the fraction of each unit (or of
    the units) pruned in all, not of what is left: the zeros of an earlier pass have the smallest
    keys, so they are the first candidates of the next."""

    # "global": torch hands compute_mask the whole tensor. "unstructured" would hand it only
    # the still-unpruned entries as a flat vector, which has no rows to rank within.
    PRUNING_TYPE = "global"

    def __init__(self, rate: Optional[float] = None, mode: str = "weight", backend: str = "auto", *,
                 n: Optional[int] = None, m: Optional[int] = None, unit_dim: int = 0):
        self.mode = _check_mode(mode)
        self.n, self.m = _check_nm_args(mode, n, m)
        self.rate = _check_prune_rate(mode, rate)
        self.backend = backend
        self.unit_dim = unit_dim

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        # The ops return what pruning needs: a pruned element reads +0, but so does a kept zero,
        # so the mask is "not a candidate" (every candidate is dropped), read from the op's
        # per-unit limit key, keep flags or keep bits rather than from the output's zeros.
        w = (t * default_mask).detach().movedim(self.unit_dim, 0)  # the weight as currently pruned
        w2d = w.reshape(w.shape[0], -1)
        U, F = w2d.shape
        if self.mode == "weight":
            _, limit, _ = ops.weight_dropout(w2d, weight_params(0, 1.0, self.rate, F), self.backend, "recompute")
            kept = reference.rank_keys(w2d) > limit.to(torch.int64)[:, None]
        elif self.mode == "unit":
            _, keep = ops.unit_dropout(w2d, unit_params(0, 1.0, self.rate, U), self.backend)
            kept = keep[:, None].expand_as(w2d)
        else:
            _, bits = ops.nm_dropout(w2d, nm_params(0, 1.0, F), self.n, self.m, self.backend, "bits")
            kept = reference.unpack_bits(bits, F)
        kept = kept.reshape(w.shape).movedim(0, self.unit_dim)
        return kept.to(default_mask.dtype) * default_mask

    @classmethod
    def apply(cls, module: nn.Module, name: str, rate: Optional[float] = None, mode: str = "weight",
              backend: str = "auto", *, n: Optional[int] = None, m: Optional[int] = None, unit_dim: int = 0):
        return super().apply(module, name, rate=rate, mode=mode, backend=backend, n=n, m=m, unit_dim=unit_dim)


def _check_prune_rate(mode: str, rate) -> Optional[float]:
    if mode == "nm":
        if rate is not None:
            raise ValueError("rate has no meaning for mode='nm' (every group of m keeps its n largest weights); "
                             f"leave it out, got rate={rate!r}")
        return None
    if rate is None:
        raise TypeError(f"mode={mode!r} needs a rate in [0, 1]")
    return _check_rate("rate", rate)


class _KeepGrad:
    """The gradient hook of a permanently pruned Parameter: pruned positions get +0.0."""

    def __init__(self, keep: Tensor):
        self.keep = keep

    def __call__(self, grad: Tensor) -> Tensor:
        if self.keep.device != grad.device:  # the model moved since pruning: follow it once
            self.keep = self.keep.to(grad.device)
        return torch.where(self.keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


_KEEP_HOOKS = WeakIdKeyDictionary()  # Parameter -> (hook handle, _KeepGrad)


def _prune_in_place(p: nn.Parameter, keep: Tensor) -> None:
    with torch.no_grad():
        p.masked_fill_(~keep, 0.0)  # +0.0, as SPEC section 6 sets dropped weights (and never NaN * 0)
    old = _KEEP_HOOKS.pop(p, None)
    if old is not None:
        old[0].remove()
        keep = keep & old[1].keep.to(keep.device)
    hook = _KeepGrad(keep)
    _KEEP_HOOKS[p] = (p.register_hook(hook), hook)


def prune_model(model: nn.Module, rate: Optional[float] = None, mode: str = "weight", exclude=LAST_LINEAR, *,
                n: Optional[int] = None, m: Optional[int] = None, backend: str = "auto",
                permanent: bool = True, recalibrate=None) -> list[str]:
    """Prune every registered layer of ``model`` except ``exclude`` (default: the output head)
    per unit at ``rate`` (``mode="weight"`` / ``"unit"``) or to the exact ``n:m`` pattern
    (``mode="nm"``, default 2:4, no rate); returns the names of the pruned layers.

    ``permanent=True``: plain weights holding the zeros, and gradient hooks that keep them zero
    while fine-tuning (see the module docstring). ``permanent=False``: torch's ``weight_orig`` /
    ``weight_mask`` reparametrization. Tied weights, and for N:M layers whose fan-in ``m`` does
    not divide, are skipped with a warning. Works with targeted dropout on (the layer's weight
    stays a plain Parameter).

    ``recalibrate``: data (an iterable of batches, see :func:`td.recalibrate_batchnorm`) over
    which every BatchNorm's running statistics are recomputed after pruning: pruning changes the
    activations BatchNorm normalises, and the statistics from training no longer fit them."""
    _check_model(model)
    _check_mode(mode)
    n, m = _check_nm_args(mode, n, m)
    rate = _check_prune_rate(mode, rate)
    if not isinstance(permanent, bool):
        raise TypeError(f"permanent must be a bool, got {type(permanent).__name__}")
    layers = _select(model, prunable_layers(model, exclude), "prune_model", m=m)
    if not layers:
        raise _nothing_to("prune_model", model, exclude)
    if recalibrate is not None:  # before pruning, so that bad data leaves the model as it was
        _check_data(recalibrate, "recalibrate")
        if not batchnorm_modules(model):
            raise ValueError("recalibrate: the model has no BatchNorm with running statistics to recalibrate")
    for _, layer in layers:
        entry = layer_type(layer)
        method = dict(rate=rate, mode=mode, backend=backend, n=n, m=m, unit_dim=entry.unit_dim)
        p = layer._parameters.get(entry.param)
        if permanent and isinstance(p, nn.Parameter):
            # in place: the same Parameter (optimizers and tied references keep it), its layout kept
            keep = TargetedPruning(**method).compute_mask(p, torch.ones_like(p, dtype=torch.bool)).bool()
            _prune_in_place(p, keep)
            continue
        TargetedPruning.apply(layer, entry.param, **method)  # composes with an earlier reparametrization
        if permanent:  # the layer had torch's reparametrization already: fold it in, then hook
            keep = getattr(layer, entry.param + "_mask").bool()
            prune.remove(layer, entry.param)
            _prune_in_place(layer._parameters[entry.param], keep)
    if recalibrate is not None:
        recalibrate_batchnorm(model, recalibrate)
    return [name for name, _ in layers]


@dataclass
class LayerSparsity:
    name: str
    shape: tuple
    zeros: int      # zero elements of the effective weight
    numel: int
    zero_units: int  # units whose weights are all zero
    units: int
    nm_ok: Optional[bool] = None  # every group of m has at most n non-zeros (None: m does not divide the fan-in)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    layers: list = field(default_factory=list)
    nm: Optional[tuple] = None  # the (n, m) pattern checked per layer

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __str__(self) -> str:
        nm = [f"{self.nm[0]}:{self.nm[1]}"] if self.nm else []
        rows = [("layer", "shape", "zero weights", "sparsity", "zero units", *nm)]
        for s in self.layers:
            ok = [{True: "ok", False: "no", None: "n/a"}[s.nm_ok]] if self.nm else []
            rows.append((s.name, "x".join(map(str, s.shape)), f"{s.zeros}/{s.numel}", f"{100 * s.sparsity:.1f}%",
                         f"{s.zero_units}/{s.units}", *ok))
        rows.append(("total", "", f"{self.zeros}/{self.numel}", f"{100 * self.sparsity:.1f}%", "", *([""] * len(nm))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@torch.no_grad()
def sparsity_report(model: nn.Module, nm: Optional[tuple] = (2, 4)) -> SparsityReport:
    """Zeros in the effective weight (``layer.weight``: after any pruning, before targeted
    dropout) of every registered layer of ``model``, per layer and in total, per unit along the
    layer's unit dim, and whether each layer satisfies the ``nm = (n, m)`` pattern (``None``:
    no N:M column). Biases are not counted."""
    _check_model(model)
    if nm is not None:
        if not isinstance(nm, tuple) or len(nm) != 2:
            raise TypeError(f"nm must be a tuple (n, m) or None, got {nm!r}")
        reference.check_nm(*nm)
    report = SparsityReport(nm=nm)
    for name, layer in model.named_modules():
        entry = layer_type(layer)
        if entry is None:
            continue
        w = getattr(layer, entry.param)
        v = w.movedim(entry.unit_dim, 0)
        U, F = v.shape[0], _fan_in(v)
        nonzero = (v != 0).reshape(U, F)
        ok = None
        if nm is not None and F % nm[1] == 0:
            ok = bool((nonzero.reshape(U, F // nm[1], nm[1]).sum(dim=2) <= nm[0]).all())
        report.layers.append(LayerSparsity(name, tuple(w.shape), int((~nonzero).sum()), w.numel(),
                                           int((~nonzero).all(dim=1).sum()), U, ok))
    return report
