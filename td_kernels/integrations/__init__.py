"""Trainer integrations: ``td_kernels.integrations.hf`` (a transformers ``TrainerCallback``) and
``td_kernels.integrations.lightning`` (a Lightning ``Callback``).

Import the one you use; ``import td_kernels`` imports neither, and this package imports nothing
heavy, so that td_kernels never needs transformers or Lightning installed."""
