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
"""
from __future__ import annotations

import math
import numbers
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


def _targets(model_or_modules) -> list[TargetedDropout]:
    if isinstance(model_or_modules, TargetedDropout):
        mods = [model_or_modules]
    elif isinstance(model_or_modules, nn.Module):
        mods = [t for _, _, t in targeted_dropout_modules(model_or_modules)]
    elif isinstance(model_or_modules, Iterable):
        mods = list(model_or_modules)
        for m in mods:
            if not isinstance(m, TargetedDropout):
                raise TypeError(f"model_or_modules must hold TargetedDropout modules, got {type(m).__name__}")
    else:
        raise TypeError("model_or_modules must be an nn.Module or an iterable of TargetedDropout, "
                        f"got {type(model_or_modules).__name__}")
    if not mods:
        raise ValueError("model_or_modules has no targeted dropout: call apply_targeted_dropout(model, ...) first")
    return mods


def _check_steps(total_steps) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral):
        raise TypeError(f"total_steps must be an int, got {type(total_steps).__name__}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return int(total_steps)


class RampSchedule:
    """Ramping targeted dropout (section 5.5) over ``total_steps`` calls of ``step()``.

    ``model_or_modules``: a model (every TargetedDropout in it) or TargetedDropout modules.
    ``drop_rate`` / ``targ_rate``: the final rates; ``None`` keeps each module's own rates
    at construction (like an LR scheduler's base_lrs). ``targ_rate`` does not apply to N:M
    modules (their candidates are fixed by the pattern): they ramp their drop_rate only."""

    def __init__(self, model_or_modules, total_steps: int, *, drop_rate: float | None = None,
                 targ_rate: float | None = None):
        self.modules = _targets(model_or_modules)
        self.total_steps = _check_steps(total_steps)
        n = len(self.modules)
        self.final_drop = [m.drop_rate for m in self.modules] if drop_rate is None \
            else [_check_rate("drop_rate", drop_rate)] * n
        if targ_rate is not None:
            targ_rate = _check_rate("targ_rate", targ_rate)
        self.final_targ = [None if m.mode == "nm" else m.targ_rate if targ_rate is None else targ_rate
                           for m in self.modules]
        self.step_count = 0
        self._apply()

    def rates(self, step: int | None = None) -> list[tuple[float, float]]:
        """``(drop_rate, targ_rate)`` of every module at ``step`` (default: the current one)."""
        fd, ft = ramp_fraction(self.step_count if step is None else step, self.total_steps)
        return [(d if fd == 1.0 else d * fd, t if ft == 1.0 or t is None else t * ft)
                for d, t in zip(self.final_drop, self.final_targ)]

    def _apply(self) -> None:
        for m, (d, t) in zip(self.modules, self.rates()):
            m.drop_rate = d
            if t is not None:
                m.targ_rate = t

    def step(self) -> None:
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
        super().__init__([t for _, _, t in found], total_steps, drop_rate=drop_rate)
        self.final_targ = targ
        self._apply()
