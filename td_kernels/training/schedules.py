"""Schedules for the targeting rates (paper section 5.5 ramping, section 5.6 Xtreme).

Both work like an LR scheduler: construct one after ``apply_targeted_dropout`` (it sets the
step-0 rates at once), call ``step()`` once per training step (or epoch), and checkpoint it
with ``state_dict()`` / ``load_state_dict()``.

Ramp (section 5.5), over ``total_steps`` steps, for each targeted layer with final rates
(alpha, gamma):
    targ_rate: 0 -> 0.95*gamma linearly over the first half, 0.95*gamma -> gamma over the second;
    drop_rate: 0 -> alpha linearly over the whole ramp;
then constant at exactly (alpha, gamma). N:M layers (``mode="nm"``) have no targ_rate: only their
drop_rate ramps.

Base rates. By default the final rates are each layer's base rates (``base_drop_rate``,
``base_targ_rate`` on its TargetedDropout): the rates given to ``apply_targeted_dropout`` or
assigned by hand since. A schedule sets only the current rates and never the base ones (as an LR
scheduler keeps ``initial_lr`` beside ``lr``), so a second schedule on the same model, or a
schedule on a ``deepcopy`` of a scheduled model, ramps to the rates the model was given, not to
the ramp's current 0. ``state_dict()`` holds the final rates and the position.

Two drivers. ``step()`` warns when a layer's rates are not the ones this schedule set at its
last step: they were set by hand, or another schedule steps the same layer. The step overwrites
them either way; to change where a ramp ends, assign the rates by hand and create a new schedule.
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import Iterable

from torch import nn

from .nn import TargetedDropout, _check_rate, targeted_dropout_modules, unit_view
from ..reference import count

__all__ = ["RampSchedule", "XtremeSchedule", "xtreme_targ_rate", "ramp_fraction"]

KNEE = 0.95  # the fraction of gamma reached half way through the ramp (the paper's 95%)


def ramp_fraction(step: int, total_steps: int, knee: float = KNEE) -> tuple[float, float]:
    """``(drop_fraction, targ_fraction)`` of the final rates at ``step`` of a ramp."""
    if step >= total_steps:
        return 1.0, 1.0  # exactly the final rates, so Xtreme's exact counts hold at the end
    half = total_steps / 2
    if step <= half:
        targ = knee * step / half
    else:
        targ = knee + (1.0 - knee) * (step - half) / (total_steps - half)
    return step / total_steps, targ


def xtreme_targ_rate(fan_in: int, keep: int) -> float:
    """The targ_rate whose count over ``fan_in`` is exactly ``fan_in - keep`` (SPEC section 3):
    with it a unit keeps ``keep`` weights out of the reach of targeting."""
    for name, v in (("fan_in", fan_in), ("keep", keep)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if fan_in < 1:
        raise ValueError(f"fan_in must be >= 1, got {fan_in}")
    if not 0 <= keep <= fan_in:
        raise ValueError(f"keep must be in [0, fan_in] = [0, {fan_in}], got {keep}")
    want = fan_in - keep
    # (F - keep) / F in float64 is off from the true ratio by ~1e-16 relative, far inside
    # count's 1e-6 slack; the loop only guards that reasoning (it never runs in the tests).
    rate = want / fan_in
    while count(rate, fan_in) > want:
        rate = math.nextafter(rate, 0.0)
    while count(rate, fan_in) < want:
        rate = math.nextafter(rate, 1.0)
    return rate


def _targets(model_or_modules) -> tuple[list[TargetedDropout], list[str]]:
    """The TargetedDropout modules and names for messages (layer names where there is a model)."""
    if isinstance(model_or_modules, TargetedDropout):
        mods = [model_or_modules]
        names = ["the TargetedDropout"]
    elif isinstance(model_or_modules, nn.Module):
        found = list(targeted_dropout_modules(model_or_modules))
        mods, names = [t for _, _, t in found], [n for n, _, _ in found]
    elif isinstance(model_or_modules, Iterable):
        mods = list(model_or_modules)
        for m in mods:
            if not isinstance(m, TargetedDropout):
                raise TypeError(f"model_or_modules must hold TargetedDropout modules, got {type(m).__name__}")
        names = [f"module {i}" for i in range(len(mods))]
    else:
        raise TypeError("model_or_modules must be an nn.Module or an iterable of TargetedDropout, "
                        f"got {type(model_or_modules).__name__}")
    if not mods:
        raise ValueError("model_or_modules has no targeted dropout: call apply_targeted_dropout(model, ...) first")
    return mods, names


# TargetedDropout -> weakref to the schedule that set its rates last: tells "by another schedule"
# from "by hand" in step()'s warning; outside the module, so pickling a model never meets it
_LAST_SETTER = weakref.WeakKeyDictionary()


def _check_steps(total_steps) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral):
        raise TypeError(f"total_steps must be an int, got {type(total_steps).__name__}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return int(total_steps)


class RampSchedule:
    """Ramping targeted dropout (section 5.5) over ``total_steps`` calls of ``step()``.

    ``model_or_modules``: a model (every TargetedDropout in it) or TargetedDropout modules.
    ``drop_rate`` / ``targ_rate``: the final rates; ``None`` takes each module's base rates
    (``base_drop_rate`` / ``base_targ_rate``: the rates it was given, like an LR scheduler's
    ``initial_lr``), never the current ones another schedule may have lowered. ``targ_rate``
    does not apply to N:M modules (their candidates are fixed by the pattern): they ramp their
    drop_rate only. Constructing it sets the step-0 rates at once (the current rates only)."""

    def __init__(self, model_or_modules, total_steps: int, *, drop_rate: float | None = None,
                 targ_rate: float | None = None):
        self.modules, self._names = _targets(model_or_modules)
        self.total_steps = _check_steps(total_steps)
        n = len(self.modules)
        self.final_drop = [m.base_drop_rate for m in self.modules] if drop_rate is None \
            else [_check_rate("drop_rate", drop_rate)] * n
        if targ_rate is not None:
            targ_rate = _check_rate("targ_rate", targ_rate)
        self.final_targ = [None if m.mode == "nm" else m.base_targ_rate if targ_rate is None else targ_rate
                           for m in self.modules]
        self.step_count = 0
        self._apply()

    def rates(self, step: int | None = None) -> list[tuple[float, float]]:
        """``(drop_rate, targ_rate)`` of every module at ``step`` (default: the current one)."""
        fd, ft = ramp_fraction(self.step_count if step is None else step, self.total_steps)
        return [(d if fd == 1.0 else d * fd, t if ft == 1.0 or t is None else t * ft)
                for d, t in zip(self.final_drop, self.final_targ)]

    def _apply(self) -> None:
        self._set = self.rates()
        me = weakref.ref(self)
        for m, (d, t) in zip(self.modules, self._set):
            m._set_scheduled(d, t)
            _LAST_SETTER[m] = me

    def _check_undisturbed(self) -> None:
        """Warn if a layer's rates are not the ones this schedule set last."""
        by_hand, by_other = [], []
        for name, m, (d, t) in zip(self._names, self.modules, self._set):
            if m.drop_rate != d or (t is not None and m.targ_rate != t):
                setter = _LAST_SETTER.get(m)
                (by_other if setter is not None and setter() not in (None, self) else by_hand).append(name)
        for names, how in ((by_other, "another schedule steps them too"), (by_hand, "they were set by hand, or by a schedule since deleted")):
            if names:
                shown = ", ".join(map(repr, names[:3])) + (", ..." if len(names) > 3 else "")
                warnings.warn(f"{type(self).__name__}.step(): the rates of {shown} are not the ones this schedule "
                              f"set ({how}); this step overwrites them. To ramp to other rates, assign them by hand "
                              "and create a new schedule (it ramps to the base rates), or pass drop_rate=/targ_rate=",
                              stacklevel=3)

    def step(self) -> None:
        self._check_undisturbed()
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps,
                "final_drop": list(self.final_drop), "final_targ": list(self.final_targ)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["final_drop"]) != len(self.modules) or len(state["final_targ"]) != len(self.modules):
            raise ValueError(f"state is for {len(state['final_drop'])} targeted modules, this schedule has "
                             f"{len(self.modules)}")
        self.total_steps = _check_steps(state["total_steps"])
        self.final_drop = [_check_rate("drop_rate", r) for r in state["final_drop"]]
        self.final_targ = [None if m.mode == "nm" else _check_rate("targ_rate", r)
                           for m, r in zip(self.modules, state["final_targ"])]
        self.step_count = int(state["step_count"])
        self._apply()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step {self.step_count}/{self.total_steps}, {len(self.modules)} modules)"


class XtremeSchedule(RampSchedule):
    """Xtreme targeted dropout (section 5.6): each unit ends with targeting every weight but
    its ``keep`` largest, i.e. per layer ``targ_rate = xtreme_targ_rate(fan_in, keep)`` so that
    exactly ``fan_in - keep`` weights per unit are candidates; ramped like :class:`RampSchedule`.
    ``model`` must hold weight-mode targeted dropout (the fan-in is read from each layer)."""

    def __init__(self, model: nn.Module, keep: int, total_steps: int, *, drop_rate: float | None = None):
        if not isinstance(model, nn.Module) or isinstance(model, TargetedDropout):
            raise TypeError(f"model must be the targeted model (an nn.Module), got {type(model).__name__}")
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral):
            raise TypeError(f"keep must be an int, got {type(keep).__name__}")
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        found = list(targeted_dropout_modules(model))
        targ = []
        for name, layer, tdm in found:
            if tdm.mode != "weight":
                raise ValueError(f"layer {name!r} has unit-mode targeted dropout; Xtreme keeps weights per unit, "
                                 "so it needs mode='weight'")
            w = unit_view(layer)
            fan_in = w.numel() // w.shape[0]
            if keep > fan_in:
                raise ValueError(f"keep={keep} exceeds the fan-in {fan_in} of layer {name!r}")
            targ.append(xtreme_targ_rate(fan_in, int(keep)))
        self.keep = int(keep)
        super().__init__(model, total_steps, drop_rate=drop_rate)  # the layers of `found`, in order
        self.final_targ = targ
        self._apply()
