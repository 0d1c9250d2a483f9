"""Backend "native": the C++ (CPU) and CUDA kernels of csrc/, compiled into ``td_kernels._C``.

Importing this module loads the extension, whose library registers the ops
``torch.ops.td_kernels_native.{weight_dropout, weight_dropout_backward, unit_dropout,
unit_dropout_backward}`` (CPU always, CUDA when built with nvcc), then registers the backend.
If the extension was not built (or was built against another torch), the import raises and
``td_kernels/__init__.py`` records the reason: ``backend="native"`` then says how to build it.

The launchers follow the registry's convention exactly (``td_kernels/_registry.py``):
``weight_dropout -> (out2d, limit int32[U])`` with candidates ``key <= limit``, and
``unit_dropout -> (out2d, keep bool[U])``. Seeds, k and D pass as Python ints (int64 in the
op schemas; D reaches 2**32).
"""
from __future__ import annotations

import importlib.util

import torch

from ._registry import Backend, device_present, register

if importlib.util.find_spec(__package__ + "._C") is None:  # say "not built", not "circular import"
    raise ImportError("td_kernels._C is not built")
from . import _C  # noqa: E402  (loading it registers the td_kernels_native ops)

__all__ = ["weight_dropout", "weight_dropout_backward", "unit_dropout", "unit_dropout_backward",
           "WITH_CUDA"]

WITH_CUDA = bool(_C.WITH_CUDA)
_ops = torch.ops.td_kernels_native


def _not_yet(what):
    raise NotImplementedError(f"backend 'native' does not implement {what} yet")


def weight_dropout(w2d, seed: int, k: int, drop_threshold: int, *, window=None, limit=None, bits=False):
    if window is not None or limit is not None or bits:
        _not_yet("windows, given limits or bit masks")
    out, lim = _ops.weight_dropout(w2d, seed, k, drop_threshold)
    return out, lim, None


def weight_dropout_backward(grad2d, w2d, limit, seed: int, drop_threshold: int, *, window=None, bits=None):
    if window is not None or bits is not None:
        _not_yet("windows or bit masks")
    return _ops.weight_dropout_backward(grad2d, w2d, limit, seed, drop_threshold)


def nm_dropout(*args, **kwargs):
    _not_yet("N:M targeting")


nm_dropout_backward = nm_dropout


def unit_dropout(w2d, seed: int, k: int, drop_threshold: int):
    return _ops.unit_dropout(w2d, seed, k, drop_threshold)


def unit_dropout_backward(grad2d, keep):
    return _ops.unit_dropout_backward(grad2d, keep)


# Fake (meta) kernels, as in pytorch/extension-cpp: shapes only, so the ops trace under
# torch.compile and run on meta tensors. Autograd lives in the public ops (td_kernels/ops.py).
@torch.library.register_fake("td_kernels_native::weight_dropout")
def _(w, seed, k, drop_threshold):
    return torch.empty_like(w), w.new_empty((w.shape[0],), dtype=torch.int32)


@torch.library.register_fake("td_kernels_native::weight_dropout_backward")
def _(grad, w, limit, seed, drop_threshold):
    return torch.empty_like(grad)


@torch.library.register_fake("td_kernels_native::unit_dropout")
def _(w, seed, k, drop_threshold):
    return torch.empty_like(w), w.new_empty((w.shape[0],), dtype=torch.bool)


@torch.library.register_fake("td_kernels_native::unit_dropout_backward")
def _(grad, keep):
    return torch.empty_like(grad)


register(Backend(
    name="native",
    priority={"cpu": 10, **({"cuda": 10} if WITH_CUDA else {})},
    weight_dropout=weight_dropout,
    weight_dropout_backward=weight_dropout_backward,
    nm_dropout=nm_dropout,
    nm_dropout_backward=nm_dropout_backward,
    unit_dropout=unit_dropout,
    unit_dropout_backward=unit_dropout_backward,
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    gate=device_present,  # built with CUDA kernels is not a GPU being here
))
