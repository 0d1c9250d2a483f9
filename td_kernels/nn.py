"""Training integration: targeted dropout as a parametrization of a layer's weight.

``apply_targeted_dropout(model, drop_rate, targ_rate)`` registers a :class:`TargetedDropout`
parametrization (``torch.nn.utils.parametrize``) on the ``weight`` of every ``nn.Linear`` and
``nn.Conv1d/2d/3d`` except the logits layer, so ``layer.weight`` is the targeted weight in
training mode (a fresh seed every forward) and the plain weight in eval mode. The parameter
itself lives on as ``layer.parametrizations.weight.original`` and receives the masked gradient
(SPEC section 7). ``remove_targeted_dropout(model)`` undoes it and leaves plain weights.

Unit mode can instead act on the layer's *output* (``apply_to="output"``): a forward hook
replaces the output channels of dropped units by the bias, ``out = where(keep, x W^T + b, b)``,
which equals ``x (W * keep)^T + b`` (a dropped unit keeps its bias: the paper prunes weights,
not biases, section 2.1) without ever writing a masked copy of W.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import reference
from ._registry import check_name
from .api import _check_rate

__all__ = ["TargetedDropout", "apply_targeted_dropout", "remove_targeted_dropout",
           "targeted_dropout_modules", "prunable_layers", "LAST_LINEAR"]

MODES = ("weight", "unit")
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the default for `exclude`: the last nn.Linear of the model (its logits layer), which the
# paper neither regularises nor prunes (section 5: "all weight matrices except those leading
# to the logits")
LAST_LINEAR = "last_linear"
_HOOK_ATTR = "targeted_dropout"  # submodule name of the output-side variant's settings
_HANDLE_ATTR = "_targeted_dropout_hook"


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be 'weight' or 'unit', got {mode!r}")
    return mode


class TargetedDropout(nn.Module):
    """Targeted dropout of a weight, for ``parametrize.register_parametrization``.

    ``forward(w)`` returns ``td.targeted_weight_dropout(w, drop_rate, targ_rate)`` (``mode=
    "weight"``) or ``td.targeted_unit_dropout(...)`` (``mode="unit"``) with a fresh seed drawn
    from torch's default generator, in training mode; ``w`` itself in eval mode. ``drop_rate``
    and ``targ_rate`` may be reassigned at any time (schedules do).
    """

    def __init__(self, drop_rate: float, targ_rate: float, mode: str = "weight", backend: str = "auto"):
        super().__init__()
        # the rates also live in a CPU float64 tensor (a plain attribute, so .to(device) leaves it
        # on the CPU): a compiled model reads them from there and a schedule changing them every
        # step never recompiles it
        self._rates = torch.zeros(2, dtype=torch.float64)
        self.drop_rate = drop_rate
        self.targ_rate = targ_rate
        self.mode = _check_mode(mode)
        check_name(backend)  # now, not at the first training forward
        self.backend = backend

    # validated on every assignment, so a schedule cannot set a rate outside [0, 1]
    @property
    def drop_rate(self) -> float:
        return self._drop_rate

    @drop_rate.setter
    def drop_rate(self, value) -> None:
        self._drop_rate = _check_rate("drop_rate", value)
        self._rates[0] = self._drop_rate

    @property
    def targ_rate(self) -> float:
        return self._targ_rate

    @targ_rate.setter
    def targ_rate(self, value) -> None:
        self._targ_rate = _check_rate("targ_rate", value)
        self._rates[1] = self._targ_rate

    def _active(self) -> bool:
        # rate 0 means no candidate or no drop: the op would return W unchanged, so skip it
        return self.training and self.drop_rate > 0.0 and self.targ_rate > 0.0

    def forward(self, w: Tensor) -> Tensor:
        import td_kernels as td  # at call time: td_kernels imports this module

        fn = td.targeted_weight_dropout if self.mode == "weight" else td.targeted_unit_dropout
        if torch.compiler.is_compiling():
            # read no Python float here: each would be a guard, and each new value a recompile
            if not self.training:
                return w
            return fn(w, self._rates[0], self._rates[1], training=True, backend=self.backend)
        if not self._active():
            return w
        return fn(w, self.drop_rate, self.targ_rate, training=True, backend=self.backend)

    def unit_keep(self, w: Tensor, seed: int | None = None) -> Tensor:
        """Bool ``[U]``: the units unit targeting keeps for this seed (SPEC section 4, 6).

        Costs one read of W (the row norms), a selection over U norms and U random words; no
        masked copy of W."""
        import td_kernels as td
        from .api import _seed_tensor  # the library's one way to draw a seed (SPEC section 9)

        s = int(_seed_tensor(seed))
        w2d = w.detach().reshape(w.shape[0], -1)
        U = w2d.shape[0]
        k = reference.count(self.targ_rate, U)
        if k in (0, U):
            candidate = torch.full((U,), k == U, dtype=torch.bool, device=w.device)
        else:  # the reference's candidates (SPEC section 4): norm strictly below the k-th
            keys = reference._norm_keys(reference.unit_norms(w2d))
            candidate = keys < reference._kth_smallest(keys[None, :], k)
        # Unit u's coin is word(u) < D. Weight targeting of a 1 x U row of ones with targ_rate 1
        # (all candidates) draws the same words (flat index j = u) and zeroes exactly those
        # positions: one backend call, where Philox in torch ops costs ~0.7 ms at any U.
        ones = torch.ones(1, U, dtype=torch.float32, device=w.device)
        coin = td.targeted_weight_dropout(ones, self.drop_rate, 1.0, seed=s, backend=self.backend)[0] == 0
        return ~(candidate & coin)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, targ_rate={self.targ_rate}, mode={self.mode!r}, backend={self.backend!r}"


# ---- the output-side unit variant --------------------------------------------------------
def _output_hook(layer: nn.Module, inputs, out: Tensor):
    """out = where(keep, x W^T + b, b) along the channel dim: equals x (W*keep)^T + b."""
    tdm: TargetedDropout = getattr(layer, _HOOK_ATTR)
    if not tdm._active():
        return None
    keep = tdm.unit_keep(layer.weight)
    # channel dim: last for Linear; for ConvNd, before the N spatial dims (input may be unbatched)
    ch = out.ndim - 1 if isinstance(layer, nn.Linear) else out.ndim - 1 - (layer.weight.ndim - 2)
    shape = [1] * out.ndim
    shape[ch] = -1
    keep = keep.view(shape)
    if layer.bias is None:
        return out * keep.to(out.dtype)  # dropped units output exactly 0 = x . 0
    return torch.where(keep, out, layer.bias.view(shape).to(out.dtype))


# ---- applying and removing ---------------------------------------------------------------
def prunable_layers(model: nn.Module, exclude=LAST_LINEAR) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every nn.Linear / nn.ConvNd of ``model`` except the excluded ones.

    ``exclude``: ``LAST_LINEAR`` (default: the last nn.Linear in ``model.named_modules()``
    order, normally the logits layer), or an iterable of module names and/or modules
    (``()`` excludes nothing)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if isinstance(exclude, str) and exclude == LAST_LINEAR:
        linears = [n for n, m in layers if isinstance(m, nn.Linear)]
        names, mods = set(linears[-1:]), set()
    elif isinstance(exclude, (str, nn.Module)) or not isinstance(exclude, Iterable):
        raise TypeError(f"exclude must be {LAST_LINEAR!r} or an iterable of module names / modules, "
                        f"got {exclude!r}")
    else:
        names, mods = set(), set()
        known = {n for n, _ in model.named_modules()}
        for e in exclude:
            if isinstance(e, nn.Module):
                mods.add(id(e))
            elif isinstance(e, str):
                if e not in known:
                    raise ValueError(f"exclude names {e!r}, which is not a module of the model")
                names.add(e)
            else:
                raise TypeError(f"exclude must hold module names or modules, got {type(e).__name__}")
    return [(n, m) for n, m in layers if n not in names and id(m) not in mods]


def _has_ours(layer: nn.Module) -> bool:
    if hasattr(layer, _HANDLE_ATTR):
        return True
    if parametrize.is_parametrized(layer, "weight"):
        return any(isinstance(p, TargetedDropout) for p in layer.parametrizations.weight)
    return False


def apply_targeted_dropout(model: nn.Module, drop_rate: float, targ_rate: float, mode: str = "weight",
                           exclude=LAST_LINEAR, *, backend: str = "auto", apply_to: str = "weight") -> list[str]:
    """Add targeted dropout to the weight of every nn.Linear / nn.ConvNd of ``model`` except
    ``exclude`` (see :func:`prunable_layers`); returns the names of the layers it changed.

    ``apply_to="weight"`` (default) parametrizes ``layer.weight``; ``apply_to="output"`` (unit
    mode only) masks the layer's output channels instead, keeping their bias."""
    _check_rate("drop_rate", drop_rate)
    _check_rate("targ_rate", targ_rate)
    _check_mode(mode)
    if apply_to not in ("weight", "output"):
        raise ValueError(f"apply_to must be 'weight' or 'output', got {apply_to!r}")
    if apply_to == "output" and mode != "unit":
        raise ValueError("apply_to='output' needs mode='unit': a weight mask is per element of W, not per output")
    layers = prunable_layers(model, exclude)
    for name, layer in layers:
        if _has_ours(layer):
            raise ValueError(f"layer {name!r} already has targeted dropout; remove_targeted_dropout(model) first")
    for _, layer in layers:
        tdm = TargetedDropout(drop_rate, targ_rate, mode, backend)
        tdm.train(layer.training)
        if apply_to == "weight":
            # unsafe=True skips the registration-time trial forward, which would draw a seed
            # and so shift torch's RNG stream; TargetedDropout keeps shape and dtype anyway
            parametrize.register_parametrization(layer, "weight", tdm, unsafe=True)
        else:
            layer.add_module(_HOOK_ATTR, tdm)  # a submodule, so model.train()/eval() reach it
            setattr(layer, _HANDLE_ATTR, layer.register_forward_hook(_output_hook))
    return [n for n, _ in layers]


def remove_targeted_dropout(model: nn.Module) -> list[str]:
    """Undo :func:`apply_targeted_dropout`: every layer gets back a plain ``weight`` Parameter
    holding the raw (untargeted) values; returns the names of the layers it changed.
    Other parametrizations of a weight stay in place."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    done = []
    for name, layer in list(model.named_modules()):
        if hasattr(layer, _HANDLE_ATTR):
            getattr(layer, _HANDLE_ATTR).remove()
            delattr(layer, _HANDLE_ATTR)
            delattr(layer, _HOOK_ATTR)
            done.append(name)
        elif parametrize.is_parametrized(layer, "weight"):
            plist = layer.parametrizations.weight
            ours = [i for i, p in enumerate(plist) if isinstance(p, TargetedDropout)]
            if not ours:
                continue
            if len(ours) == len(plist):
                # leave_parametrized=False: the raw weight stays, not one random targeted draw
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            else:
                for i in reversed(ours):
                    del plist[i]
            done.append(name)
    return done


def targeted_dropout_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, TargetedDropout]]:
    """``(layer_name, layer, TargetedDropout)`` for every targeted layer of ``model``."""
    for name, layer in model.named_modules():
        if hasattr(layer, _HANDLE_ATTR):
            yield name, layer, getattr(layer, _HOOK_ATTR)
        elif parametrize.is_parametrized(layer, "weight"):
            for p in layer.parametrizations.weight:
                if isinstance(p, TargetedDropout):
                    yield name, layer, p
