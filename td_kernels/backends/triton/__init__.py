"""The Triton backend (``backend="triton"``): fused Triton kernels for CUDA tensors, and for
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before td_kernels is
imported; slow, meant for tests).  Raises ImportError when Triton is not installed; the
package's __init__ records that as the reason the backend is unavailable.
"""
from __future__ import annotations

import triton  # noqa: F401  (ImportError here means "no Triton backend")
import torch

from ..._registry import Backend, register
from ._common import INTERPRETED
# The launchers stay in their modules (td_kernels.backends.triton.weight_dropout.weight_dropout, ...):
# re-exporting them here would shadow the submodules of the same name.
from . import nm_dropout as _nm, unit_dropout as _unit, weight_dropout as _weight


def _gate(device_type: str):
    if device_type == "cpu" and not INTERPRETED:
        return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "before importing td_kernels")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda is not available"
    return None


register(Backend(
    name="triton",
    priority={"cuda": 20, "cpu": 0},
    weight_dropout=_weight.weight_dropout,
    weight_dropout_backward=_weight.weight_dropout_backward,
    nm_dropout=_nm.nm_dropout,
    nm_dropout_backward=_nm.nm_dropout_backward,
    unit_dropout=_unit.unit_dropout,
    unit_dropout_backward=_unit.unit_dropout_backward,
    gate=_gate,
    variants={"weight": _weight.SELECTS},
))
