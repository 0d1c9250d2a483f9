"""The torch.library ops: one schema per function, dispatched to a backend through the registry.

Each op is opaque to torch.compile (a custom op with a fake impl), so a model using it traces
with no graph break on any backend. The random and count arguments travel as one int64 CPU
tensor ``params = (seed, k, drop_threshold)``: a new seed or a changed rate is new data, never
a new graph. Backward (SPEC section 7) saves the weight, which is the parameter itself (no copy),
``params`` and 4 bytes per unit (weight targeting: the int32 limit key) or 1 byte per unit (unit
targeting: the keep flag): no per-element mask is ever stored.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._registry import resolve

__all__ = ["weight_dropout", "weight_dropout_backward", "unit_dropout", "unit_dropout_backward", "PARAMS"]

PARAMS = "(seed, k, drop_threshold)"


def _unpack(params: Tensor) -> tuple[int, int, int]:
    if params.device.type != "cpu" or params.dtype != torch.int64 or params.shape != (3,):
        raise ValueError(f"params must be an int64 CPU tensor {PARAMS} of shape (3,), got {params.dtype} "
                         f"{tuple(params.shape)} on {params.device}")
    seed, k, drop_threshold = params.tolist()  # a CPU tensor: no device synchronisation
    return seed, k, drop_threshold


def _as_2d(x: Tensor) -> Tensor:
    U = x.shape[0]
    return x.reshape(U, x.numel() // U if U else 0)


# ---- weight targeting --------------------------------------------------------------------
@torch.library.custom_op("td_kernels::weight_dropout", mutates_args=())
def weight_dropout(w: Tensor, params: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    seed, k, drop_threshold = _unpack(params)
    if w.numel() == 0:
        return w.clone(), torch.full((w.shape[0],), -1, dtype=torch.int32, device=w.device)
    b = resolve(backend, w.device, w.dtype)
    out, limit = b.weight_dropout(_as_2d(w.contiguous()), seed, k, drop_threshold)
    return out.view(w.shape), limit


@weight_dropout.register_fake
def _(w, params, backend):
    return torch.empty_like(w, memory_format=torch.contiguous_format), w.new_empty((w.shape[0],), dtype=torch.int32)


@torch.library.custom_op("td_kernels::weight_dropout_backward", mutates_args=())
def weight_dropout_backward(grad: Tensor, w: Tensor, limit: Tensor, params: Tensor, backend: str) -> Tensor:
    seed, _k, drop_threshold = _unpack(params)
    if grad.numel() == 0:
        return grad.clone()
    b = resolve(backend, w.device, w.dtype)
    out = b.weight_dropout_backward(_as_2d(grad.contiguous()), _as_2d(w.contiguous()), limit, seed, drop_threshold)
    return out.view(grad.shape)


@weight_dropout_backward.register_fake
def _(grad, w, limit, params, backend):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _weight_setup_context(ctx, inputs, output):
    w, params, backend = inputs
    ctx.save_for_backward(w, output[1], params)
    ctx.backend = backend


def _weight_backward(ctx, grad_out, _grad_limit):
    w, limit, params = ctx.saved_tensors
    return weight_dropout_backward(grad_out, w, limit, params, ctx.backend), None, None


weight_dropout.register_autograd(_weight_backward, setup_context=_weight_setup_context)


# ---- unit targeting ----------------------------------------------------------------------
@torch.library.custom_op("td_kernels::unit_dropout", mutates_args=())
def unit_dropout(w: Tensor, params: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    seed, k, drop_threshold = _unpack(params)
    if w.numel() == 0:
        return w.clone(), torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    b = resolve(backend, w.device, w.dtype)
    out, keep = b.unit_dropout(_as_2d(w.contiguous()), seed, k, drop_threshold)
    return out.view(w.shape), keep


@unit_dropout.register_fake
def _(w, params, backend):
    return torch.empty_like(w, memory_format=torch.contiguous_format), w.new_empty((w.shape[0],), dtype=torch.bool)


@torch.library.custom_op("td_kernels::unit_dropout_backward", mutates_args=())
def unit_dropout_backward(grad: Tensor, keep: Tensor, backend: str) -> Tensor:
    if grad.numel() == 0:
        return grad.clone()
    b = resolve(backend, grad.device, grad.dtype)
    return b.unit_dropout_backward(_as_2d(grad.contiguous()), keep).view(grad.shape)


@unit_dropout_backward.register_fake
def _(grad, keep, backend):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _unit_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.backend = inputs[2]


def _unit_backward(ctx, grad_out, _grad_keep):
    (keep,) = ctx.saved_tensors
    return unit_dropout_backward(grad_out, keep, ctx.backend), None, None


unit_dropout.register_autograd(_unit_backward, setup_context=_unit_setup_context)
