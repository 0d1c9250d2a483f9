"""Re-estimating BatchNorm's running statistics for the network that is evaluated.

Targeted dropout changes the weights a training-mode forward uses, so the running statistics
BatchNorm collects while training describe the *targeted* network, while ``eval()`` runs the
full weights, whose activations have other means and variances; pruning changes them again.
Either way the statistics no longer fit the network that is evaluated, and accuracy can collapse
(the demo's ResNet rows show by how much). :func:`recalibrate_batchnorm` recomputes them over
data with targeted dropout off and every other module in eval mode.

``torch.optim.swa_utils.update_bn`` does a similar job for SWA, but it puts the whole model in
training mode, so targeted dropout (and ``nn.Dropout``) stay on while it collects.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .nn import _check_model, get_rng_state, set_rng_state, targeted_dropout_modules

__all__ = ["recalibrate_batchnorm", "batchnorm_modules"]


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every BatchNorm of ``model`` that keeps running statistics
    (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, a lazy one once initialised)."""
    _check_model(model)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and isinstance(m.running_mean, Tensor) and not isinstance(m.running_mean, nn.parameter.UninitializedBuffer)]


class _Moments:
    """A forward pre-hook collecting the per-channel count, mean and sum of squared deviations
    of a BatchNorm's input, merged batch by batch in float64 (Chan et al.'s pairwise update):
    over all samples, whatever the batch sizes."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def __call__(self, bn, args):
        x = args[0].detach()
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        dims = [d for d in range(x.ndim) if d != 1]  # [N, C, *spatial]: every dim but the channels
        # the batch's moments in the input's dtype (torch's var_mean: one accurate pass), merged in float64
        var, mean = torch.var_mean(x if x.dtype in (torch.float32, torch.float64) else x.float(), dims, correction=0)
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total


def _check_data(data, name: str = "data") -> None:
    if isinstance(data, (Tensor, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(f"{name} must be an iterable of batches (a DataLoader, a list of input tensors or of (inputs, "
                        f"targets) tuples; [x] for one tensor), got {type(data).__name__}")


def _call(model: nn.Module, batch) -> None:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch  # (inputs, targets, ...) or inputs
    if isinstance(x, Mapping):
        model(**x)
    else:
        model(x)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Iterable) -> list[str]:
    """Recompute the running mean and variance of every BatchNorm in ``model`` over ``data`` for
    the network as evaluated: targeted dropout off (the full weights, or the pruned weights after
    ``prune_model``) and every other module in eval mode. Returns the BatchNorms' names.

    ``data``: an iterable of batches (a DataLoader, a list), each ``(inputs, ...)`` (the first
    element is what the model is called with; a dict is passed as keyword arguments) or the
    inputs themselves, on the model's device. One tensor is not taken as one batch (iterating it
    would give single samples): pass ``[x]``.

    The statistics are the mean and the unbiased variance (what BatchNorm keeps) of each
    BatchNorm's input over all of ``data``, a cumulative average weighted by samples, not a
    momentum update: they do not depend on the batching, except that during the pass each
    BatchNorm normalises with its batch statistics (as in training, and as
    ``torch.optim.swa_utils.update_bn`` does), which the BatchNorms after it see.
    ``num_batches_tracked`` becomes the number of batches.

    Afterwards every module's train/eval flag, each BatchNorm's ``momentum`` and targeted
    dropout's random state (``td.get_rng_state``) are as they were, and if ``data`` or the model
    raises, the statistics are too."""
    bns = batchnorm_modules(model)
    if not bns:
        raise ValueError(f"model has no BatchNorm with running statistics ({type(model).__name__}): nothing to "
                         "recalibrate")
    _check_data(data)
    flags = {m: m.training for m in model.modules()}
    rng = get_rng_state(model) if next(targeted_dropout_modules(model), None) is not None else None
    saved = {bn: (bn.momentum, None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone())
             for _, bn in bns}
    moments = {bn: _Moments() for _, bn in bns}
    hooks = [bn.register_forward_pre_hook(moments[bn]) for bn in moments]
    batches = 0
    try:
        model.eval()  # targeted dropout, nn.Dropout, ...: off
        for bn in moments:
            bn.train()        # normalise with the batch's statistics, as in training
            bn.momentum = 0.0  # and leave the running ones alone: the hook collects instead
        for batch in data:
            _call(model, batch)
            batches += 1
    finally:
        for h in hooks:
            h.remove()
        for m, t in flags.items():
            m.training = t
        for bn, (momentum, tracked) in saved.items():
            bn.momentum = momentum
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)
        if rng is not None:  # eval-mode forwards draw nothing; this only makes sure of it
            set_rng_state(model, rng)
    if batches == 0:
        raise ValueError("data yielded no batch: nothing to recalibrate on")
    missed = [name for name, bn in bns if moments[bn].mean is None]
    if missed:
        raise ValueError(f"the model's forward on data did not reach the BatchNorm(s) {', '.join(map(repr, missed))}; "
                         "no statistics were changed")
    for _, bn in bns:
        mo = moments[bn]
        bn.running_mean.copy_(mo.mean)
        bn.running_var.copy_(mo.m2 / max(mo.n - 1, 1))  # unbiased, as BatchNorm's own
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(batches)
    return [name for name, _ in bns]
