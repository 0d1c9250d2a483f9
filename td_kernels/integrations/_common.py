"""What both trainer callbacks do, with no trainer imported: target the model, run a schedule,
report the rates and the sparsity, save and restore the random state and the schedule, prune.

The trainer-specific callbacks (``hf.py``, ``lightning.py``) only map their framework's hooks onto
:class:`TargetedDropoutRun`. Everything here goes through td_kernels' public API, and the state
it saves is plain JSON data (ints, floats, lists, None), so that transformers can keep it in a
checkpoint's ``trainer_state.json`` and Lightning in its checkpoint dict.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

import td_kernels as td

SCHEDULES = ("ramp", "xtreme", None)
PREFIX = "td/"  # the prefix of every value the callbacks log


def _check_optional_rate(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1] or None, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_optional_int(name: str, value, low: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


class TargetedDropoutRun:
    """The settings and the state of targeted dropout over one training run.

    ``drop_rate``, ``targ_rate``, ``mode``, ``exclude``, ``n``, ``m``, ``backend``, ``mask``: as
    :func:`td.apply_targeted_dropout`, used when the model has no targeted dropout yet at train
    begin (``drop_rate=None``: the model must be targeted already). ``exclude`` is
    ``"last_linear"`` or module names (names, not modules, so that the settings stay JSON).
    ``schedule``: ``"ramp"`` (:class:`td.RampSchedule`, paper section 5.5), ``"xtreme"``
    (:class:`td.XtremeSchedule` keeping ``keep`` weights per unit, section 5.6) or None
    (constant rates), over ``total_steps`` optimizer steps (None: the trainer's total).
    ``prune_at_end``: prune the targeted layers at their final targeting rates when training ends
    (:func:`td.prune_model`, the zeros kept in the plain ``weight``)."""

    def __init__(self, drop_rate: Optional[float] = None, targ_rate: Optional[float] = None, mode: str = "weight",
                 exclude=td.nn.LAST_LINEAR, *, n: Optional[int] = None, m: Optional[int] = None,
                 backend: str = "auto", mask: Optional[str] = None, schedule: Optional[str] = "ramp",
                 total_steps: Optional[int] = None, keep: Optional[int] = None, prune_at_end: bool = False):
        if mode not in ("weight", "unit", "nm"):
            raise ValueError(f"mode must be 'weight', 'unit' or 'nm', got {mode!r}")
        self.drop_rate = _check_optional_rate("drop_rate", drop_rate)
        self.targ_rate = _check_optional_rate("targ_rate", targ_rate)
        if self.drop_rate is None and self.targ_rate is not None:
            raise ValueError("targ_rate without drop_rate: give both (or neither, for a model targeted already)")
        if isinstance(exclude, str):
            if exclude != td.nn.LAST_LINEAR:
                raise ValueError(f"exclude must be {td.nn.LAST_LINEAR!r} or a list of module names, got {exclude!r}")
        elif isinstance(exclude, (list, tuple)) and all(isinstance(e, str) for e in exclude):
            exclude = list(exclude)
        else:
            raise TypeError(f"exclude must be {td.nn.LAST_LINEAR!r} or a list of module names (str), got {exclude!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'ramp', 'xtreme' or None, got {schedule!r}")
        self.keep = _check_optional_int("keep", keep, 0)
        if (schedule == "xtreme") != (self.keep is not None):
            raise ValueError(f"keep (the weights each unit keeps) goes with schedule='xtreme' and only with it; got "
                             f"schedule={schedule!r}, keep={keep!r}")
        if not isinstance(prune_at_end, bool):
            raise TypeError(f"prune_at_end must be a bool, got {type(prune_at_end).__name__}")
        self.mode, self.exclude, self.n, self.m = mode, exclude, n, m
        self.backend, self.mask, self.schedule_name = backend, mask, schedule
        self.total_steps = _check_optional_int("total_steps", total_steps, 1)
        self.prune_at_end = prune_at_end
        self.model: Optional[nn.Module] = None
        self.schedule = None
        self.step_rates: dict = {}  # the rates of the step running now (what the log reports)
        self.report = None          # the sparsity report of prune_at_end

    def settings(self) -> dict:
        """The constructor's arguments (JSON data)."""
        return dict(drop_rate=self.drop_rate, targ_rate=self.targ_rate, mode=self.mode, exclude=self.exclude,
                    n=self.n, m=self.m, backend=self.backend, mask=self.mask, schedule=self.schedule_name,
                    total_steps=self.total_steps, keep=self.keep, prune_at_end=self.prune_at_end)

    # ---- train begin -----------------------------------------------------------------------
    def target(self, model: nn.Module) -> None:
        """Add targeted dropout to ``model`` unless it has it already (then ``drop_rate`` must be
        None, or this run must be the one that added it: a second ``train()`` of the same model)."""
        has = any(True for _ in td.nn.targeted_dropout_modules(model))
        if has:
            if self.drop_rate is not None and model is not self.model:
                raise ValueError("the model has targeted dropout already: construct the callback without drop_rate "
                                 "(and targ_rate, mode, ...) to train it as it is, or remove_targeted_dropout first")
        else:
            if self.drop_rate is None:
                raise ValueError("the model has no targeted dropout: give the callback a drop_rate (and targ_rate, "
                                 "mode, ...) or call td.apply_targeted_dropout(model, ...) first")
            td.apply_targeted_dropout(model, self.drop_rate, self.targ_rate, self.mode, self.exclude, n=self.n,
                                      m=self.m, backend=self.backend, mask=self.mask)
        self.model = model

    def begin(self, model: nn.Module, total_steps: int, saved: Optional[dict] = None) -> None:
        """Target ``model`` (if needed), start the schedule over ``total_steps`` (unless this run
        was given its own), and restore ``saved`` (what :meth:`state` returned) when resuming."""
        self.target(model)
        steps = self.total_steps or total_steps
        if self.schedule_name == "ramp":
            self.schedule = td.RampSchedule(model, steps)
        elif self.schedule_name == "xtreme":
            self.schedule = td.XtremeSchedule(model, self.keep, steps)
        if saved is not None:
            self.load(saved)

    # ---- state ---------------------------------------------------------------------------------
    def state(self) -> Optional[dict]:
        """The random state of every targeted layer and the schedule's position (JSON data), or
        None before train begin."""
        if self.model is None:
            return None
        return {"rng": td.get_rng_state(self.model).tolist(),
                "schedule": None if self.schedule is None else self.schedule.state_dict()}

    def load(self, saved: dict) -> None:
        if not isinstance(saved, dict) or "rng" not in saved:
            raise ValueError(f"not a targeted dropout state (from TargetedDropoutRun.state()): {saved!r:.200}")
        td.set_rng_state(self.model, torch.tensor(saved["rng"], dtype=torch.int64))
        if (saved.get("schedule") is None) != (self.schedule is None):
            had = "no" if saved.get("schedule") is None else "a"
            raise ValueError(f"the checkpoint was saved with {had} schedule, this callback has "
                             f"schedule={self.schedule_name!r}")
        if self.schedule is not None:
            self.schedule.load_state_dict(saved["schedule"])

    # ---- steps and logs ------------------------------------------------------------------------
    def rates(self) -> dict:
        """The mean drop and targeting rates over the targeted layers, as they are now (N:M layers
        have no targeting rate)."""
        mods = [t for _, _, t in td.nn.targeted_dropout_modules(self.model)]
        out = {PREFIX + "drop_rate": sum(t.drop_rate for t in mods) / len(mods)}
        targ = [t.targ_rate for t in mods if t.targ_rate is not None]
        if targ:
            out[PREFIX + "targ_rate"] = sum(targ) / len(targ)
        return out

    def step_begin(self) -> None:
        self.step_rates = self.rates()

    def step_end(self) -> None:
        if self.schedule is not None:
            self.schedule.step()

    def sparsity(self) -> float:
        """The fraction of zero weights in the targeted layers' ``weight`` (after any pruning:
        targeted dropout itself never writes zeros into it)."""
        names = {name for name, _, _ in td.nn.targeted_dropout_modules(self.model)}
        layers = [s for s in td.sparsity_report(self.model, nm=None).layers if s.name in names]
        return sum(s.zeros for s in layers) / sum(s.numel for s in layers)

    def logs(self) -> dict:
        """What the callbacks add to the trainer's logs: the rates of the last step (the current
        ones before the first) and the sparsity."""
        return {**(self.step_rates or self.rates()), PREFIX + "sparsity": self.sparsity()}

    # ---- train end -----------------------------------------------------------------------------
    def prune(self):
        """Prune every targeted layer at its final targeting rate (the schedule's end, else the
        layer's rate; N:M: the n:m pattern) and return the sparsity report of the targeted layers."""
        found = list(td.nn.targeted_dropout_modules(self.model))
        final = self.schedule.rates(self.schedule.total_steps) if self.schedule is not None else \
            [(t.drop_rate, t.targ_rate) for _, _, t in found]
        for (_, layer, t), (_, targ) in zip(found, final):
            if t.mode == "nm":
                td.prune_model(layer, mode="nm", n=t.n, m=t.m, exclude=(), backend=t.backend)
            else:
                td.prune_model(layer, targ, mode=t.mode, exclude=(), backend=t.backend)
        names = {name for name, _, _ in found}
        nm = next(((t.n, t.m) for _, _, t in found if t.mode == "nm"), None)
        report = td.sparsity_report(self.model, nm=nm)
        report.layers = [s for s in report.layers if s.name in names]
        self.report = report
        return report


class CallbackBase:
    """The arguments (those of :class:`TargetedDropoutRun`) and the run both callbacks hold."""

    def __init__(self, drop_rate: Optional[float] = None, targ_rate: Optional[float] = None, mode: str = "weight",
                 exclude=td.nn.LAST_LINEAR, *, n: Optional[int] = None, m: Optional[int] = None,
                 backend: str = "auto", mask: Optional[str] = None, schedule: Optional[str] = "ramp",
                 total_steps: Optional[int] = None, keep: Optional[int] = None, prune_at_end: bool = False):
        self.run = TargetedDropoutRun(drop_rate, targ_rate, mode, exclude, n=n, m=m, backend=backend, mask=mask,
                                      schedule=schedule, total_steps=total_steps, keep=keep,
                                      prune_at_end=prune_at_end)

    @property
    def report(self):
        """The sparsity report of ``prune_at_end`` (None before)."""
        return self.run.report
