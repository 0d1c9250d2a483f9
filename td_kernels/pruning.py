"""Post hoc magnitude pruning of a model (paper section 2.3), through torch.nn.utils.prune.

``prune_model(model, rate)`` prunes the ``rate`` smallest-|w| weights of every unit
(``mode="weight"``, eq. 2) or the ``rate`` lowest-L2-norm units (``mode="unit"``, eq. 1) of each
nn.Linear / nn.ConvNd except the logits layer, layer by layer. Each layer ends up as torch's
pruning leaves it: ``weight_orig`` (Parameter) and ``weight_mask`` (buffer), with
``weight = weight_orig * weight_mask``; ``torch.nn.utils.prune.remove(layer, "weight")`` makes it
permanent. Biases are not pruned (section 2.1). The masks come from ``td.prune_weights`` /
``td.prune_units`` (SPEC section 8).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from . import ops, reference
from .api import unit_params, weight_params
from .nn import LAST_LINEAR, LAYER_TYPES, _check_mode, _check_rate, _has_ours, prunable_layers

__all__ = ["TargetedPruning", "prune_model", "sparsity_report", "SparsityReport", "LayerSparsity"]


class TargetedPruning(prune.BasePruningMethod):
    """A torch pruning method whose mask is the keep mask of ``td.prune_weights`` (``mode=
    "weight"``) or ``td.prune_units`` (``mode="unit"``) at ``rate``, applied to the weight as
    already pruned (so pruning twice composes: the new mask is ANDed with the old). The rate is
    the fraction of each unit (or of the units) pruned in all, not of what is left: the zeros of
    an earlier pass have the smallest keys, so they are the first candidates of the next."""

    # "global": torch hands compute_mask the whole tensor. "unstructured" would hand it only
    # the still-unpruned entries as a flat vector, which has no rows to rank within.
    PRUNING_TYPE = "global"

    def __init__(self, rate: float, mode: str = "weight", backend: str = "auto"):
        self.rate = _check_rate("rate", rate)
        self.mode = _check_mode(mode)
        self.backend = backend

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        # The ops return what pruning needs: a pruned element reads +0, but so does a kept zero,
        # so the mask is "not a candidate" (SPEC section 8: every candidate is dropped), read
        # from the op's per-unit limit key or keep flag rather than from the output's zeros.
        w = (t * default_mask).detach()  # the weight as currently pruned (what `weight` holds)
        w2d = w.reshape(w.shape[0], -1)
        n = w2d.shape[1] if self.mode == "weight" else w2d.shape[0]
        if self.mode == "weight":
            _, limit, _ = ops.weight_dropout(w2d, weight_params(0, 1.0, self.rate, n), self.backend, "recompute")
            kept = reference.rank_keys(w2d) > limit.to(torch.int64)[:, None]
        else:
            _, keep = ops.unit_dropout(w2d, unit_params(0, 1.0, self.rate, n), self.backend)
            kept = keep[:, None].expand_as(w2d)
        return kept.reshape(t.shape).to(default_mask.dtype) * default_mask

    @classmethod
    def apply(cls, module: nn.Module, name: str, rate: float, mode: str = "weight", backend: str = "auto"):
        return super().apply(module, name, rate=rate, mode=mode, backend=backend)


def prune_model(model: nn.Module, rate: float, mode: str = "weight", exclude=LAST_LINEAR, *,
                backend: str = "auto") -> list[str]:
    """Prune every nn.Linear / nn.ConvNd of ``model`` except ``exclude`` (default: the last
    nn.Linear, the logits layer) per unit at ``rate``; returns the names of the pruned layers.
    Remove targeted dropout first (``remove_targeted_dropout``): a parametrized weight is
    not a Parameter torch's pruning can take over."""
    rate = _check_rate("rate", rate)
    _check_mode(mode)
    layers = prunable_layers(model, exclude)
    for name, layer in layers:
        if _has_ours(layer) or parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"layer {name!r} has targeted dropout (or another parametrization) on its weight; "
                             "call remove_targeted_dropout(model) before prune_model")
    for _, layer in layers:
        TargetedPruning.apply(layer, "weight", rate, mode, backend)
    return [n for n, _ in layers]


@dataclass
class LayerSparsity:
    name: str
    shape: tuple
    zeros: int      # zero elements of the effective weight
    numel: int
    zero_units: int  # units (rows) whose weights are all zero
    units: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    layers: list = field(default_factory=list)

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
        rows = [("layer", "shape", "zero weights", "sparsity", "zero units")]
        for s in self.layers:
            rows.append((s.name, "x".join(map(str, s.shape)), f"{s.zeros}/{s.numel}", f"{100 * s.sparsity:.1f}%",
                         f"{s.zero_units}/{s.units}"))
        rows.append(("total", "", f"{self.zeros}/{self.numel}", f"{100 * self.sparsity:.1f}%", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Zeros in the effective weight (``layer.weight``, after any pruning) of every nn.Linear /
    nn.ConvNd of ``model``, per layer and in total (biases are not counted)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = SparsityReport()
    for name, layer in model.named_modules():
        if not isinstance(layer, LAYER_TYPES):
            continue
        # the raw weight if targeted dropout is on (layer.weight would be one random draw)
        w = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight
        zero = (w == 0).reshape(w.shape[0], -1)
        report.layers.append(LayerSparsity(name, tuple(w.shape), int(zero.sum()), w.numel(),
                                           int(zero.all(dim=1).sum()), w.shape[0]))
    return report
