"""Targeted dropout in a Lightning ``Trainer``: one callback.

    from td_kernels.integrations.lightning import TargetedDropoutCallback

    trainer = L.Trainer(max_steps=10_000, callbacks=[TargetedDropoutCallback(0.5, 0.5, prune_at_end=True)])
    trainer.fit(module)                                # or .fit(module, ckpt_path=...)

What Lightning's hooks do:

- ``on_fit_start``: adds targeted dropout to the LightningModule unless it has it already (the
  base seeds come from torch's default generator, as ``td.apply_targeted_dropout`` does: seed it
  with ``L.seed_everything``), starts the schedule over ``total_steps`` (default: the Trainer's
  ``estimated_stepping_batches``, i.e. its optimizer steps), and on ``fit(ckpt_path=...)``
  restores the random state of every targeted layer and the schedule's position from the
  checkpoint (a checkpoint without it: a warning, and the masks start afresh). Lightning has
  loaded the module's weights and this callback's ``load_state_dict`` before this hook and
  builds the optimizer before it; targeting keeps the same Parameters.
- ``on_train_batch_start`` / ``on_train_batch_end``: the rates of the step are noted; after each
  optimizer step (``trainer.global_step`` advanced: gradient accumulation included) the schedule
  steps and ``td/drop_rate``, ``td/targ_rate`` (mean over the targeted layers) and
  ``td/sparsity`` (zero weights in the targeted layers) go to ``pl_module.log_dict``, i.e. to the
  module's loggers at the Trainer's ``log_every_n_steps``.
- ``state_dict`` / ``load_state_dict``: the random state (``td.get_rng_state`` as a list) and the
  schedule's ``state_dict()``, in every Lightning checkpoint under ``checkpoint["callbacks"]``.
- ``on_train_end`` with ``prune_at_end=True``: prunes the targeted layers at their final rates
  (``td.prune_model``), sends ``td/sparsity`` to every logger and keeps the report in
  ``callback.report``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError("td_kernels.integrations.lightning needs Lightning: pip install lightning") from e

from ._common import PREFIX, CallbackBase

__all__ = ["TargetedDropoutCallback"]


class TargetedDropoutCallback(CallbackBase, Callback):
    """A Lightning ``Callback`` that trains the LightningModule under targeted dropout.

    The arguments are those of ``td_kernels.integrations.hf.TargetedDropoutCallback``:
    ``drop_rate``, ``targ_rate``, ``mode``, ``exclude`` (``"last_linear"`` or module names),
    ``n``, ``m``, ``backend``, ``mask`` as :func:`td.apply_targeted_dropout` (``drop_rate=None``:
    the module is targeted already); ``schedule`` ``"ramp"`` / ``"xtreme"`` (with ``keep``) /
    None over ``total_steps`` optimizer steps (None: the Trainer's); ``prune_at_end``."""

    _saved: Optional[dict] = None  # from load_state_dict, applied at fit start
    _step: Optional[int] = None    # trainer.global_step the schedule has reached

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.run.settings(), "checkpoint": self.run.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict.get("checkpoint")

    def on_fit_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        if self.run.total_steps is None and not math.isfinite(total):
            raise ValueError("the Trainer has no step limit (max_steps=-1, max_epochs=-1): give the callback "
                             "total_steps for its schedule")
        if trainer.ckpt_path is not None and self._saved is None:
            rank_zero_warn("resuming from a checkpoint without targeted dropout state (saved without "
                           "TargetedDropoutCallback?): the masks and the schedule start afresh")
        self.run.begin(pl_module, int(total) if math.isfinite(total) else 1, self._saved)
        self._saved = None
        self._step = None  # the loops' progress (global_step) is restored after this hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._step is None:
            self._step = trainer.global_step
        self.run.step_begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # accumulating gradients: no optimizer step yet
        while self._step < trainer.global_step:
            self.run.step_end()
            self._step += 1
        pl_module.log_dict(self.run.logs(), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.run.prune_at_end or self.run.model is None:
            return
        report = self.run.prune()
        rank_zero_info(f"targeted dropout: pruned the targeted layers at their final rates\n{report}")
        for lg in trainer.loggers:
            lg.log_metrics({PREFIX + "sparsity": report.sparsity}, step=trainer.global_step)
