"""td_kernels: fast targeted dropout (Gomez et al.) for PyTorch.

Backends register themselves with ``td_kernels._registry`` on import: the pure-PyTorch
reference always; the Triton kernels (``td_kernels.backends.triton``) where ``triton`` imports;
the native C++/CUDA kernels (``td_kernels.backends.native``) where the extension was built.
See README.md and SPEC.md for the exact semantics, docs/architecture.md for the layers.
This module loads the library only: the programs behind ``td-kernels`` (``td_kernels.tools``)
and the trainer integrations (``td_kernels.integrations``) are imported by their users.
"""
import torch

from . import _registry, reference
from ._registry import Backend, available_backends

_registry.register(Backend(
    name="reference",
    priority={"cpu": 0, "cuda": 0, "mps": 0, "xpu": 0},
    weight_dropout=reference.weight_dropout,
    weight_dropout_backward=reference.weight_dropout_backward,
    nm_dropout=reference.nm_dropout,
    nm_dropout_backward=reference.nm_dropout_backward,
    unit_dropout=reference.unit_dropout,
    unit_dropout_backward=reference.unit_dropout_backward,
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    gate=_registry.device_present,
))

try:
    from .backends import triton as _triton_backend  # noqa: F401  (registers "triton")
except Exception as e:  # triton not installed, too old, or broken
    _registry.unavailable("triton", f"Triton could not be imported ({e}); install it with `pip install 'triton>=3.6'`")

try:
    from .backends import native as _native_backend  # noqa: F401  (registers "native")
except Exception as e:  # extension not built, or built against another torch
    _registry.unavailable("native", f"the compiled extension td_kernels._C did not load ({e}); build it with "
                          "`pip install --no-build-isolation -e .` after installing torch")

from . import ops  # noqa: E402  (registers the torch.library ops)
from .api import (prune_nm, prune_units, prune_weights, targeted_nm_dropout, targeted_unit_dropout,  # noqa: E402
                  targeted_weight_dropout)
from .training import nn  # noqa: E402
from .training.nn import (TargetedDropout, apply_targeted_dropout, get_rng_state, register_layer,  # noqa: E402
                          remove_targeted_dropout, reseed, set_rng_state)
from .training.schedules import RampSchedule, XtremeSchedule, xtreme_targ_rate  # noqa: E402
from .training.pruning import TargetedPruning, prune_model, sparsity_report  # noqa: E402
from .training.batchnorm import recalibrate_batchnorm  # noqa: E402
from .sparsity.shrink import ShrinkReport, shrink_model  # noqa: E402
from .sparsity.sparse import is_nm_sparse, nm_violations, to_semi_structured  # noqa: E402
from .analysis.second_order import DeltaE, delta_e, hessian_weight_matrix  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "targeted_weight_dropout", "targeted_unit_dropout", "targeted_nm_dropout", "prune_weights", "prune_units",
    "prune_nm",
    "available_backends", "reference", "ops", "Backend",
    "nn", "TargetedDropout", "apply_targeted_dropout", "remove_targeted_dropout", "register_layer",
    "get_rng_state", "set_rng_state", "reseed",
    "RampSchedule", "XtremeSchedule", "xtreme_targ_rate", "TargetedPruning", "prune_model", "sparsity_report",
    "recalibrate_batchnorm",
    "shrink_model", "ShrinkReport", "to_semi_structured", "is_nm_sparse", "nm_violations",
    "delta_e", "DeltaE", "hessian_weight_matrix",
]
