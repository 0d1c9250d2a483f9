"""Targeted dropout in a Hugging Face ``transformers.Trainer``: one callback.

    from td_kernels.integrations.hf import TargetedDropoutCallback

    trainer = Trainer(model, args, train_dataset=ds)
    TargetedDropoutCallback(drop_rate=0.5, targ_rate=0.5, prune_at_end=True).attach(trainer)
    trainer.train()                                    # or .train(resume_from_checkpoint=...)
    trainer.save_model()                               # plain keys, the pruned zeros in `weight`

(``Trainer(..., callbacks=[cb])`` works too; ``attach`` also puts the callback ahead of the
``report_to`` loggers, which the Trainer otherwise calls first, so that they see its values.)

What the Trainer's hooks do:

- ``on_train_begin``: adds targeted dropout to the model unless it has it already (the random
  base seeds come from torch's default generator, as ``td.apply_targeted_dropout`` does), starts
  the schedule over ``total_steps`` (default: the Trainer's ``max_steps``), and when the Trainer
  resumes from a checkpoint restores the random state of every targeted layer and the schedule's
  position saved in it, so that the resumed run draws exactly the masks the uninterrupted run
  draws. The model is loaded and the optimizer built before this hook; targeting keeps the same
  Parameter objects, so both stay valid.
- ``on_step_begin`` / ``on_step_end``: once per optimizer step (gradient accumulation included)
  the rates of the step are noted, then the schedule steps.
- ``on_log``: adds ``td/drop_rate`` and ``td/targ_rate`` (the rates of the last step, mean over
  the targeted layers) and ``td/sparsity`` (zero weights in the targeted layers' ``weight``) to
  the logs and to ``state.log_history``.
- the state: the callback is an ``ExportableState``: the Trainer writes ``state()`` (the random
  state ``td.get_rng_state`` as a list and the schedule's ``state_dict()``) into every checkpoint
  folder's ``trainer_state.json``, and loads that file back on resume, which is where
  ``on_train_begin`` reads it (whatever the checkpoint folder is called or wherever it moved).
- ``on_train_end`` with ``prune_at_end=True``: prunes the targeted layers at their final rates
  (``td.prune_model``, zeros kept in the plain weights), logs ``td/sparsity`` and keeps the
  report in ``callback.report``.
"""
from __future__ import annotations

import logging
from typing import Optional

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("td_kernels.integrations.hf needs transformers (and accelerate for its Trainer): "
                      "pip install transformers accelerate") from e

from ._common import PREFIX, CallbackBase

__all__ = ["TargetedDropoutCallback"]

logger = logging.getLogger(__name__)


class TargetedDropoutCallback(CallbackBase, TrainerCallback, ExportableState):
    """A ``transformers.TrainerCallback`` that trains the Trainer's model under targeted dropout.

    ``drop_rate``, ``targ_rate``, ``mode``, ``exclude``, ``n``, ``m``, ``backend``, ``mask``: as
    :func:`td.apply_targeted_dropout` (``exclude``: ``"last_linear"`` or module names), applied at
    train begin when the model has no targeted dropout yet; leave ``drop_rate`` None to train a
    model targeted beforehand. ``schedule``: ``"ramp"`` (paper section 5.5), ``"xtreme"`` (keep
    ``keep`` weights per unit, section 5.6) or None; over ``total_steps`` optimizer steps (None:
    the Trainer's ``max_steps``). ``prune_at_end``: prune at the final rates when training ends.
    One such callback per Trainer."""

    trainer = None  # set by attach()

    def attach(self, trainer) -> "TargetedDropoutCallback":
        """Add this callback to ``trainer`` as its first callback: the Trainer calls callbacks in
        order and puts the ``report_to`` loggers before those given in ``callbacks=``, so only a
        callback ahead of them adds values that they log."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self.trainer = trainer
        return self

    # ExportableState: what the Trainer keeps in each checkpoint's trainer_state.json
    def state(self) -> dict:
        return {"args": self.run.settings(), "attributes": {"checkpoint": self.run.state()}}

    def _saved(self, state) -> Optional[dict]:
        entry = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(entry, list):
            raise ValueError("the checkpoint holds the state of several TargetedDropoutCallbacks: use one per Trainer")
        return (entry or {}).get("attributes", {}).get("checkpoint")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = None
        if state.global_step > 0:  # resuming: the Trainer has loaded the checkpoint's trainer_state.json
            saved = self._saved(state)
            # the Trainer's next save updates the entry it expects there (a KeyError without it)
            state.stateful_callbacks.setdefault(type(self).__name__, {})
            if saved is None:
                logger.warning("resuming from a checkpoint without targeted dropout state (saved without "
                               "TargetedDropoutCallback?): the masks and the schedule start afresh at step %d",
                               state.global_step)
        self.run.begin(model, state.max_steps, saved)
        if args.report_to and self.trainer is None:
            logger.warning("TargetedDropoutCallback: the Trainer calls the report_to loggers %s before callbacks "
                           "given in callbacks=[...], so they will not see td/* values; use "
                           "callback.attach(trainer) instead", args.report_to)

    def on_step_begin(self, args, state, control, **kwargs):
        self.run.step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.run.step_end()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run.model is None or logs is None:
            return
        values = self.run.logs()
        logs.update(values)
        # Trainer.log stored a copy of the logs before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.run.prune_at_end or self.run.model is None:
            return
        report = self.run.prune()
        logger.info("targeted dropout: pruned the targeted layers at their final rates\n%s", report)
        values = {PREFIX + "sparsity": report.sparsity}
        if self.trainer is not None:
            self.trainer.log(values)  # through every logger (and on_log above)
        else:
            state.log_history.append({**values, "step": state.global_step})
