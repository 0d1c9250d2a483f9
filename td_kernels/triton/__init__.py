"""The Triton backend (``backend="triton"``): fused Triton kernels for CUDA tensors, and for
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before td_kernels is
imported; slow, meant for tests).  Raises ImportError when Triton is not installed; the
package's __init__ records that as the reason the backend is unavailable.
"""
from __future__ import annotations

import triton  # noqa: F401  (ImportError here means "no Triton backend")
import torch

from .._registry import Backend, register
from ._common import INTERPRETED
# The launchers stay in their modules (td_kernels.triton.weight_dropout.weight_dropout, ...):
# re-exporting them here would shadow the submodules of the same name.
from . import unit_dropout as _unit, weight_dropout as _weight


def _gate(device_type: str):
    if device_type == "cpu" and not INTERPRETED:
        return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "before importing td_kernels")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda is not available"
    return None


def _not_yet(what):
    raise NotImplementedError(f"backend 'triton' does not implement {what} yet")


def _weight_dropout(w2d, seed, k, D, *, window=None, limit=None, bits=False):
    if window is not None or limit is not None or bits:
        _not_yet("windows, given limits or bit masks")
    out, lim = _weight.weight_dropout(w2d, seed, k, D)
    return out, lim, None


def _weight_dropout_backward(grad2d, w2d, limit, seed, D, *, window=None, bits=None):
    if window is not None or bits is not None:
        _not_yet("windows or bit masks")
    return _weight.weight_dropout_backward(grad2d, w2d, limit, seed, D)


def _nm(*args, **kwargs):
    _not_yet("N:M targeting")


register(Backend(
    name="triton",
    priority={"cuda": 20, "cpu": 0},
    weight_dropout=_weight_dropout,
    weight_dropout_backward=_weight_dropout_backward,
    nm_dropout=_nm,
    nm_dropout_backward=_nm,
    unit_dropout=_unit.unit_dropout,
    unit_dropout_backward=_unit.unit_dropout_backward,
    gate=_gate,
))
