"""Targeted dropout in a training loop: ``nn`` (targeting a model's layers in place, per-layer
seeds), ``schedules`` (ramping the rates), ``pruning`` (pruning a trained model). Built on the
public functions of ``td_kernels.api`` and the ops."""
