"""Backend "native": the C++ (CPU) and CUDA kernels of csrc/, compiled into ``td_kernels._C``.

Importing this module loads the extension, whose library registers the ops
``torch.ops.td_kernels_native.{weight_dropout, nm_dropout, unit_dropout}`` and their
``*_backward`` (CPU always, CUDA when built with nvcc), then registers the backend.
If the extension was not built (or was built against another torch), the import raises and
``td_kernels/__init__.py`` records the reason: ``backend="native"`` then says how to build it.

The launchers follow the registry's convention exactly (``td_kernels/_registry.py``): windows,
given limits, bit-packed masks and N:M targeting. Seeds, k, n, m and D pass as Python ints
(int64 in the op schemas; D reaches 2**32); a window passes as (origin, row_stride), checked by
``reference.check_window`` here (the same errors as every backend) and again in C++.
"""
from __future__ import annotations

import importlib.util

import torch

from .._registry import Backend, check_variant, device_present, register
from ..reference import bits_words, check_nm, check_window

if importlib.util.find_spec("td_kernels._C") is None:  # say "not built", not "circular import"
    raise ImportError("td_kernels._C is not built")
from .. import _C  # noqa: E402  (loading it registers the td_kernels_native ops)

__all__ = ["weight_dropout", "weight_dropout_backward", "nm_dropout", "nm_dropout_backward", "unit_dropout",
           "unit_dropout_backward", "WITH_CUDA", "BUILD_INFO"]

WITH_CUDA = bool(_C.WITH_CUDA)
BUILD_INFO: str = _C.BUILD_INFO  # e.g. "cpu: x86-64 (gcc 12.2), AVX2 ...; cuda: not built"
_ops = torch.ops.td_kernels_native


# How the CUDA weight forward selects: the launcher's ``variant``, else this default (read at
# each launch; the benchmark's provider "native:fused" sets it): "two-pass" = a select kernel
# then the apply kernel (W read twice, the second mostly from L2); "fused" = one kernel with the
# row in shared memory (W read once; rows of up to 32 KB, longer ones take "two-pass"). Same
# bits either way; the CPU ignores it.
WEIGHT_FORWARDS = ("two-pass", "fused")
WEIGHT_FORWARD = "two-pass"


def check_weight_forward(v) -> str:
    if v not in WEIGHT_FORWARDS:
        raise ValueError(f"native.WEIGHT_FORWARD must be one of {WEIGHT_FORWARDS}, got {v!r}")
    return v


def _window_args(window, U: int, F: int) -> tuple[int, int]:
    """(origin, row_stride) of a checked window (reference.check_window's errors)."""
    return tuple(check_window(window, U, F))


def _seed(seed):
    """``(seed, dseed)`` op arguments: an int, or the graph-safe seed tensor, which the kernels
    read on its device (the registry's launcher contract)."""
    return (0, seed) if isinstance(seed, torch.Tensor) else (seed, None)


def _bits_or_none(bits):
    return bits if bits.dim() == 2 else None  # the ops return an empty 1-D tensor for "no bits"


def weight_dropout(w2d, seed: int, k: int, drop_threshold: int, *, window=None, limit=None, bits=False,
                   variant=None):
    U, F = w2d.shape
    s, dseed = _seed(seed)
    how = check_weight_forward(WEIGHT_FORWARD) if variant is None else \
        check_variant("native", "weight", variant, WEIGHT_FORWARDS)
    out, lim, b = _ops.weight_dropout(w2d, s, k, drop_threshold, *_window_args(window, U, F), limit, bool(bits), dseed,
                                      how == "fused")
    return out, lim, _bits_or_none(b)


def weight_dropout_backward(grad2d, w2d, limit, seed: int, drop_threshold: int, *, window=None, bits=None):
    U, F = grad2d.shape
    s, dseed = _seed(seed)
    return _ops.weight_dropout_backward(grad2d, w2d, limit, s, drop_threshold, *_window_args(window, U, F), bits, dseed)


def nm_dropout(w2d, seed: int, n: int, m: int, drop_threshold: int, *, window=None, bits=False):
    U, F = w2d.shape
    check_nm(n, m, F)
    s, dseed = _seed(seed)
    out, b = _ops.nm_dropout(w2d, s, n, m, drop_threshold, *_window_args(window, U, F), bool(bits), dseed)
    return out, _bits_or_none(b)


def nm_dropout_backward(grad2d, w2d, seed: int, n: int, m: int, drop_threshold: int, *, window=None, bits=None):
    U, F = grad2d.shape
    check_nm(n, m, F)
    s, dseed = _seed(seed)
    return _ops.nm_dropout_backward(grad2d, w2d, s, n, m, drop_threshold, *_window_args(window, U, F), bits, dseed)


def unit_dropout(w2d, seed: int, k: int, drop_threshold: int):
    s, dseed = _seed(seed)
    return _ops.unit_dropout(w2d, s, k, drop_threshold, dseed)


def unit_dropout_backward(grad2d, keep):
    return _ops.unit_dropout_backward(grad2d, keep)


# Fake (meta) kernels, as in pytorch/extension-cpp: shapes only, so the ops trace under
# torch.compile and run on meta tensors. Autograd lives in the public ops (td_kernels/ops.py).
def _fake_bits(w, bits: bool):
    return w.new_empty((w.shape[0], bits_words(w.shape[1])) if bits else (0,), dtype=torch.int32)


@torch.library.register_fake("td_kernels_native::weight_dropout")
def _(w, seed, k, drop_threshold, origin, row_stride, limit, bits, dseed=None, fused=False):
    return torch.empty_like(w), w.new_empty((w.shape[0],), dtype=torch.int32), _fake_bits(w, bits)


@torch.library.register_fake("td_kernels_native::weight_dropout_backward")
def _(grad, w, limit, seed, drop_threshold, origin, row_stride, bits, dseed=None):
    return torch.empty_like(grad)


@torch.library.register_fake("td_kernels_native::nm_dropout")
def _(w, seed, n, m, drop_threshold, origin, row_stride, bits, dseed=None):
    return torch.empty_like(w), _fake_bits(w, bits)


@torch.library.register_fake("td_kernels_native::nm_dropout_backward")
def _(grad, w, seed, n, m, drop_threshold, origin, row_stride, bits, dseed=None):
    return torch.empty_like(grad)


@torch.library.register_fake("td_kernels_native::unit_dropout")
def _(w, seed, k, drop_threshold, dseed=None):
    return torch.empty_like(w), w.new_empty((w.shape[0],), dtype=torch.bool)


@torch.library.register_fake("td_kernels_native::unit_dropout_backward")
def _(grad, keep):
    return torch.empty_like(grad)


def _gate(device_type: str):
    if device_type == "cuda" and not WITH_CUDA:
        return "the native extension was built without CUDA kernels"
    return device_present(device_type)  # built with CUDA kernels is not a GPU being here


register(Backend(
    name="native",
    # the order is declared whatever was built (td-kernels tune ranks other machines' CSVs by it)
    priority={"cpu": 10, "cuda": 10},
    weight_dropout=weight_dropout,
    weight_dropout_backward=weight_dropout_backward,
    nm_dropout=nm_dropout,
    nm_dropout_backward=nm_dropout_backward,
    unit_dropout=unit_dropout,
    unit_dropout_backward=unit_dropout_backward,
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    gate=_gate,
    variants={"weight": WEIGHT_FORWARDS},
))
