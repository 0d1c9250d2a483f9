"""The torch.library ops: one op per targeting kind (weight, N:M, unit) and its backward,
dispatched to a backend through the registry.

Each op is opaque to torch.compile (a custom op with a fake impl), so a model using it traces
with no graph break on any backend. The public functions below (``weight_dropout`` ...) call the
op, or, for eager calls on plain tensors, the same impls through one autograd.Function (see
"the public entry points" at the end of this file). The random, count and window arguments
travel as one int64 CPU tensor ``params``: a new seed or a changed rate is new data, never a new
graph.

``mask`` (a str, part of the graph) picks what the backward reads (SPEC section 7):
  ``"bits"``       the forward also writes the keep mask, 1 bit per element (int32
                   ``[U, ceil(F/32)]``, ``reference.pack_bits``); autograd keeps those bits and
                   ``params``, and the backward reads only grad and the bits.
  ``"recompute"``  autograd keeps the weight (the parameter itself, no copy), ``params`` and 4
                   bytes per unit (weight targeting's int32 limit key); the backward
                   recomputes the mask from W: no per-element state at all.
Unit targeting keeps 1 byte per unit (its keep flags) either way: that already is its mask.

``dseed`` (optional, every op but the unit backward) is the graph-safe seed of SPEC section 9:
a 0-dim int64 tensor on the weight's device, written on the device by torch's generator
(``_params.device_seed``) and read by the kernels; params' seed is then unused. Autograd keeps
it for the recompute backward. Launchers receive it as their ``seed`` (``_registry``). Under
CUDA graph capture ``params`` is read on the host once, at capture: k, D and the window are
constants of the captured graph (a rate changed later needs a new capture), and its seed is
why ``seed=None`` needs ``dseed`` there (``_params.call_seed``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._registry import choose, resolve
from .reference import Window, bits_words

__all__ = ["check_mask", "weight_dropout", "weight_dropout_backward", "nm_dropout", "nm_dropout_backward",
           "unit_dropout", "unit_dropout_backward", "MASKS", "WEIGHT_PARAMS", "NM_PARAMS", "UNIT_PARAMS"]

MASKS = ("bits", "recompute")
WEIGHT_PARAMS = "(seed, k, drop_threshold, origin, row_stride)"
NM_PARAMS = "(seed, drop_threshold, origin, row_stride)"
UNIT_PARAMS = "(seed, k, drop_threshold)"


def _unpack(params: Tensor, layout: str) -> list[int]:
    n = layout.count(",") + 1
    if params.device.type != "cpu" or params.dtype != torch.int64 or params.shape != (n,):
        raise ValueError(f"params must be an int64 CPU tensor {layout} of shape ({n},), got {params.dtype} "
                         f"{tuple(params.shape)} on {params.device}")
    return params.tolist()  # a CPU tensor: no device synchronisation


def _seed(seed: int, dseed: Optional[Tensor], w: Tensor):
    """The launchers' seed: params' int, or ``dseed`` (the graph-safe seed, SPEC section 9): a
    0-dim int64 tensor on w's device that the kernels read themselves, so a captured CUDA graph
    uses the value its replay wrote there (``_params.device_seed``), never a host copy."""
    if dseed is None:
        return seed
    if not isinstance(dseed, Tensor) or dseed.dtype != torch.int64 or dseed.shape != () \
            or dseed.device != w.device:
        got = f"{dseed.dtype} {tuple(dseed.shape)} on {dseed.device}" if isinstance(dseed, Tensor) \
            else type(dseed).__name__
        raise ValueError(f"dseed must be a 0-dim int64 tensor on {w.device}, got {got}")
    return dseed


def check_mask(mask) -> str:
    """``mask`` is one of MASKS (a ValueError naming it otherwise)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    return mask


def _wants_bits(mask: str) -> bool:
    return check_mask(mask) == "bits"


def _as_2d(x: Tensor) -> Tensor:
    U = x.shape[0]
    return x.reshape(U, x.numel() // U if U else 0)


def _fan_in(x: Tensor) -> int:
    return x.numel() // x.shape[0] if x.shape[0] else 0


def _window(origin: int, row_stride: int, F: int) -> Optional[Window]:
    return None if (origin, row_stride) == (0, F) else Window(origin, row_stride)


def _empty_bits(w: Tensor) -> Tensor:
    return w.new_empty((0,), dtype=torch.int32)


def _fake_bits(w: Tensor, mask: str) -> Tensor:
    return w.new_empty((w.shape[0], bits_words(_fan_in(w))), dtype=torch.int32) if mask == "bits" else _empty_bits(w)


def _fake_out(w: Tensor) -> Tensor:
    return torch.empty_like(w, memory_format=torch.contiguous_format)


# ---- weight targeting --------------------------------------------------------------------
def _weight_dropout(w: Tensor, params: Tensor, backend: str, mask: str, limit: Optional[Tensor] = None,
                   dseed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, limit, bits)``; ``limit`` given skips the selection (the sharded path); ``dseed``
    given replaces params' seed (the graph-safe seed, see the module docstring)."""
    seed, k, D, origin, row_stride = _unpack(params, WEIGHT_PARAMS)
    seed = _seed(seed, dseed, w)
    want_bits = _wants_bits(mask)
    U, F = w.shape[0], _fan_in(w)
    if w.numel() == 0:
        lim = limit.clone() if limit is not None else torch.full((U,), -1, dtype=torch.int32, device=w.device)
        bits = torch.zeros((U, bits_words(F)), dtype=torch.int32, device=w.device) if want_bits else _empty_bits(w)
        return w.clone(), lim, bits
    b, variant = choose(backend, w.device, w.dtype, "weight")
    out, lim, bits = b.weight_dropout(_as_2d(w.contiguous()), seed, k, D, window=_window(origin, row_stride, F),
                                      limit=limit, bits=want_bits, variant=variant)
    if limit is not None and lim.data_ptr() == limit.data_ptr():
        lim = lim.clone()  # an op's output may not alias its input
    return out.view(w.shape), lim, bits if want_bits else _empty_bits(w)


_weight_dropout_op = torch.library.custom_op("td_kernels::weight_dropout", _weight_dropout, mutates_args=())


@_weight_dropout_op.register_fake
def _(w, params, backend, mask, limit=None, dseed=None):
    return _fake_out(w), w.new_empty((w.shape[0],), dtype=torch.int32), _fake_bits(w, mask)


def _weight_dropout_backward(grad: Tensor, w: Optional[Tensor], limit: Tensor, bits: Tensor, params: Tensor,
                            backend: str, mask: str, dseed: Optional[Tensor] = None) -> Tensor:
    seed, _k, D, origin, row_stride = _unpack(params, WEIGHT_PARAMS)
    seed = _seed(seed, dseed, grad)
    use_bits = _wants_bits(mask)
    if grad.numel() == 0:
        return grad.clone()
    b = resolve(backend, grad.device, grad.dtype, "weight")
    F = _fan_in(grad)
    out = b.weight_dropout_backward(_as_2d(grad.contiguous()), None if use_bits else _as_2d(w.contiguous()),
                                    limit, seed, D, window=_window(origin, row_stride, F),
                                    bits=bits if use_bits else None)
    return out.view(grad.shape)


_weight_dropout_backward_op = torch.library.custom_op("td_kernels::weight_dropout_backward", _weight_dropout_backward, mutates_args=())


@_weight_dropout_backward_op.register_fake
def _(grad, w, limit, bits, params, backend, mask, dseed=None):
    return _fake_out(grad)


def _weight_setup_context(ctx, inputs, output):
    w, params, backend, mask, _limit, dseed = inputs
    _out, limit, bits = output
    ctx.mask, ctx.backend = mask, backend
    # "bits": the weight is not needed by the backward, so autograd does not keep it
    ctx.save_for_backward(None if mask == "bits" else w, limit, bits, params, dseed)


def _weight_backward(ctx, grad_out, _grad_limit, _grad_bits):
    w, limit, bits, params, dseed = ctx.saved_tensors
    grad = weight_dropout_backward(grad_out, w, limit, bits, params, ctx.backend, ctx.mask, dseed)
    return grad, None, None, None, None, None


_weight_dropout_op.register_autograd(_weight_backward, setup_context=_weight_setup_context)


# ---- N:M targeting -----------------------------------------------------------------------
def _nm_dropout(w: Tensor, params: Tensor, n: int, m: int, backend: str, mask: str,
                dseed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(out, bits)`` of SPEC section 11."""
    seed, D, origin, row_stride = _unpack(params, NM_PARAMS)
    seed = _seed(seed, dseed, w)
    want_bits = _wants_bits(mask)
    F = _fan_in(w)
    if w.numel() == 0:
        bits = torch.zeros((w.shape[0], bits_words(F)), dtype=torch.int32, device=w.device) if want_bits \
            else _empty_bits(w)
        return w.clone(), bits
    b = resolve(backend, w.device, w.dtype, "nm")
    out, bits = b.nm_dropout(_as_2d(w.contiguous()), seed, n, m, D, window=_window(origin, row_stride, F),
                             bits=want_bits)
    return out.view(w.shape), bits if want_bits else _empty_bits(w)


_nm_dropout_op = torch.library.custom_op("td_kernels::nm_dropout", _nm_dropout, mutates_args=())


@_nm_dropout_op.register_fake
def _(w, params, n, m, backend, mask, dseed=None):
    return _fake_out(w), _fake_bits(w, mask)


def _nm_dropout_backward(grad: Tensor, w: Optional[Tensor], bits: Tensor, params: Tensor, n: int, m: int,
                        backend: str, mask: str, dseed: Optional[Tensor] = None) -> Tensor:
    seed, D, origin, row_stride = _unpack(params, NM_PARAMS)
    seed = _seed(seed, dseed, grad)
    use_bits = _wants_bits(mask)
    if grad.numel() == 0:
        return grad.clone()
    b = resolve(backend, grad.device, grad.dtype, "nm")
    out = b.nm_dropout_backward(_as_2d(grad.contiguous()), None if use_bits else _as_2d(w.contiguous()), seed, n,
                                m, D, window=_window(origin, row_stride, _fan_in(grad)),
                                bits=bits if use_bits else None)
    return out.view(grad.shape)


_nm_dropout_backward_op = torch.library.custom_op("td_kernels::nm_dropout_backward", _nm_dropout_backward, mutates_args=())


@_nm_dropout_backward_op.register_fake
def _(grad, w, bits, params, n, m, backend, mask, dseed=None):
    return _fake_out(grad)


def _nm_setup_context(ctx, inputs, output):
    w, params, n, m, backend, mask, dseed = inputs
    ctx.n, ctx.m, ctx.backend, ctx.mask = n, m, backend, mask
    ctx.save_for_backward(None if mask == "bits" else w, output[1], params, dseed)


def _nm_backward(ctx, grad_out, _grad_bits):
    w, bits, params, dseed = ctx.saved_tensors
    grad = nm_dropout_backward(grad_out, w, bits, params, ctx.n, ctx.m, ctx.backend, ctx.mask, dseed)
    return grad, None, None, None, None, None, None


_nm_dropout_op.register_autograd(_nm_backward, setup_context=_nm_setup_context)


# ---- unit targeting ----------------------------------------------------------------------
def _unit_dropout(w: Tensor, params: Tensor, backend: str, dseed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    seed, k, D = _unpack(params, UNIT_PARAMS)
    seed = _seed(seed, dseed, w)
    if w.numel() == 0:
        return w.clone(), torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    b = resolve(backend, w.device, w.dtype, "unit")
    out, keep = b.unit_dropout(_as_2d(w.contiguous()), seed, k, D)
    return out.view(w.shape), keep


_unit_dropout_op = torch.library.custom_op("td_kernels::unit_dropout", _unit_dropout, mutates_args=())


@_unit_dropout_op.register_fake
def _(w, params, backend, dseed=None):
    return _fake_out(w), w.new_empty((w.shape[0],), dtype=torch.bool)


def _unit_dropout_backward(grad: Tensor, keep: Tensor, backend: str) -> Tensor:
    if grad.numel() == 0:
        return grad.clone()
    b = resolve(backend, grad.device, grad.dtype, "unit")
    return b.unit_dropout_backward(_as_2d(grad.contiguous()), keep).view(grad.shape)


_unit_dropout_backward_op = torch.library.custom_op("td_kernels::unit_dropout_backward", _unit_dropout_backward, mutates_args=())


@_unit_dropout_backward_op.register_fake
def _(grad, keep, backend):
    return _fake_out(grad)


def _unit_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.backend = inputs[2]


def _unit_backward(ctx, grad_out, _grad_keep):
    (keep,) = ctx.saved_tensors
    return unit_dropout_backward(grad_out, keep, ctx.backend), None, None, None


_unit_dropout_op.register_autograd(_unit_backward, setup_context=_unit_setup_context)


# ---- the public entry points: an eager fast path, else the custom op ---------------------
# torch.library's Python dispatch of a custom op (schema defaults, autograd wrapper, redispatch)
# costs ~0.2 ms per forward and as much per backward on a CPU: on a small weight, several times
# the kernel. Eager calls on plain tensors therefore run the same impls through one
# autograd.Function, with the same setup_context and backward (so the same bits and the same
# saved state); everything that needs the op itself takes it: torch.compile, fake and meta
# tensors, tensor subclasses (DTensor), functorch transforms, dispatch and function modes.
_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(args) -> bool:
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return False
    return all(type(a) in _PLAIN and a.device.type != "meta" for a in args if isinstance(a, Tensor))


class _Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, *inputs):
        impl, setup, _backward = _KINDS[kind]
        outputs = impl(*inputs)
        setup(ctx, inputs, outputs)
        ctx.kind = kind
        ctx.mark_non_differentiable(*outputs[1:])  # the limit / keep / bits side outputs
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_KINDS[ctx.kind][2](ctx, *grads))


_KINDS = {"weight": (_weight_dropout, _weight_setup_context, _weight_backward),
          "nm": (_nm_dropout, _nm_setup_context, _nm_backward),
          "unit": (_unit_dropout, _unit_setup_context, _unit_backward)}


def weight_dropout(w: Tensor, params: Tensor, backend: str, mask: str, limit: Optional[Tensor] = None,
                   dseed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, limit, bits)`` of weight targeting (op ``td_kernels::weight_dropout``); ``limit``
    given skips the selection (the sharded path); ``dseed`` given is the seed (graph-safe path)."""
    args = (w, params, backend, mask, limit, dseed)
    return _Eager.apply("weight", *args) if _eager(args) else _weight_dropout_op(*args)


def nm_dropout(w: Tensor, params: Tensor, n: int, m: int, backend: str, mask: str,
               dseed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(out, bits)`` of N:M targeting (op ``td_kernels::nm_dropout``)."""
    args = (w, params, n, m, backend, mask, dseed)
    return _Eager.apply("nm", *args) if _eager(args) else _nm_dropout_op(*args)


def unit_dropout(w: Tensor, params: Tensor, backend: str, dseed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(out, keep)`` of unit targeting (op ``td_kernels::unit_dropout``)."""
    args = (w, params, backend, dseed)
    return _Eager.apply("unit", *args) if _eager(args) else _unit_dropout_op(*args)


def weight_dropout_backward(grad: Tensor, w: Optional[Tensor], limit: Tensor, bits: Tensor, params: Tensor,
                            backend: str, mask: str, dseed: Optional[Tensor] = None) -> Tensor:
    args = (grad, w, limit, bits, params, backend, mask, dseed)
    return _weight_dropout_backward(*args) if _eager(args) else _weight_dropout_backward_op(*args)


def nm_dropout_backward(grad: Tensor, w: Optional[Tensor], bits: Tensor, params: Tensor, n: int, m: int,
                        backend: str, mask: str, dseed: Optional[Tensor] = None) -> Tensor:
    args = (grad, w, bits, params, n, m, backend, mask, dseed)
    return _nm_dropout_backward(*args) if _eager(args) else _nm_dropout_backward_op(*args)


def unit_dropout_backward(grad: Tensor, keep: Tensor, backend: str) -> Tensor:
    args = (grad, keep, backend)
    return _unit_dropout_backward(*args) if _eager(args) else _unit_dropout_backward_op(*args)
