"""The backend registry: the one place where a public op learns which kernels to run.

A backend is a set of launchers that compute the functions of SPEC.md on 2-D views
``w2d = w.reshape(U, F)`` (contiguous, float16/bfloat16/float32, float64 where the backend
says so). Backends register themselves when their module imports; the public functions never
branch on backend names. One launcher per targeting kind and direction; what varies inside a
kind (where the block sits in a global weight, whether the forward writes a mask) is an
argument, never another launcher. Every launcher takes plain tensors and Python ints:

``weight_dropout(w2d, seed, k, D, *, window=None, limit=None, bits=False) -> (out2d, limit, bits)``
    ``k = count(targ_rate, F)``, ``D = floor(drop_rate * 2**32)`` (0..2**32), ``seed`` a Python
    int in [0, 2**63), or the graph-safe seed (SPEC section 9): a 0-dim int64 tensor on w2d's
    device holding it, which the kernels read on the device (no host copy; every launcher
    taking a seed accepts both). ``out2d`` has w2d's shape and dtype, contiguous. ``limit`` is int32
    ``[U]``: element (u, j) is a candidate iff ``key(w[u, j]) <= limit[u]``, i.e. ``limit[u] =
    t_u - 1`` with ``-1`` when k == 0 and ``0x7FFFFFFF`` when k == F. A ``limit`` passed in is
    used as is and returned (no selection; k unused): the sharded path finds thresholds of rows
    split across ranks with a collective and then runs the same fused kernel.
``weight_dropout_backward(grad2d, w2d, limit, seed, D, *, window=None, bits=None) -> grad_w2d``
    ``grad_w = where(keep, grad, +0.0)``: keep read from ``bits`` when given (``w2d`` and
    ``limit`` may then be None), else recomputed from W's keys, ``limit`` and the seed.
``nm_dropout(w2d, seed, n, m, D, *, window=None, bits=False) -> (out2d, bits)``
    SPEC section 11; ``m`` divides F. The groups are the local block's, so a window must start
    on a group boundary of the global row (td_kernels.distributed checks that for shards).
``nm_dropout_backward(grad2d, w2d, seed, n, m, D, *, window=None, bits=None) -> grad_w2d``
``unit_dropout(w2d, seed, k, D) -> (out2d, keep)``
    ``k = count(targ_rate, U)``; ``keep`` is bool ``[U]`` (True = row kept).
``unit_dropout_backward(grad2d, keep) -> grad_w2d``
    ``grad_w = where(keep[:, None], grad, +0.0)``.

The shared arguments:

``window``  None (the whole weight) or ``reference.Window(origin, row_stride)``: local element
    (u, j) sits at global stream position ``origin + u * row_stride + j`` (SPEC section 12).
    Keys, thresholds and N:M groups are those of the local block; only the Philox positions
    move. A backend passes ``reference.check_window`` on it.
``bits``    the mask format. ``bits=True`` asks the forward to also write the keep mask packed
    1 bit per element, int32 ``[U, ceil(F / 32)]``, bit ``j % 32`` of word ``[u, j // 32]``
    (1 = kept, padding bits 0: ``reference.pack_bits``), and ``bits=False`` returns None in its
    place. The backward given that tensor reads only grad and the bits (4 bytes per 32
    elements); without it, it recomputes the mask from W (SPEC section 7 allows both, and
    every backend must give the same bits either way).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["Backend", "register", "unavailable", "available_backends", "check_name", "resolve", "known_backends"]


@dataclass(frozen=True)
class Backend:
    name: str
    # device types served -> priority for backend="auto" (higher wins)
    priority: dict
    weight_dropout: Callable
    weight_dropout_backward: Callable
    nm_dropout: Callable
    nm_dropout_backward: Callable
    unit_dropout: Callable
    unit_dropout_backward: Callable
    dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32)
    # optional extra gate per device type, e.g. Triton on CPU only under TRITON_INTERPRET=1;
    # returns None when usable, else the reason it is not
    gate: Optional[Callable[[str], Optional[str]]] = field(default=None)

    def why_not(self, device_type: str) -> Optional[str]:
        if device_type not in self.priority:
            served = ", ".join(sorted(self.priority)) or "no device"
            return f"backend {self.name!r} serves {served} tensors, not {device_type}"
        return self.gate(device_type) if self.gate is not None else None


_BACKENDS: dict[str, Backend] = {}
# backends that exist in the library but could not load here: name -> how to get them
_UNAVAILABLE: dict[str, str] = {}
KNOWN = ("reference", "triton", "native")


def register(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _UNAVAILABLE.pop(backend.name, None)


def unavailable(name: str, reason: str) -> None:
    """Record why a backend could not load, for the error a user sees when naming it."""
    if name not in _BACKENDS:
        _UNAVAILABLE[name] = reason


def known_backends() -> tuple:
    return KNOWN


def available_backends(device="cpu") -> list:
    """Names of the backends usable for tensors on ``device`` here, best first."""
    dtype = torch.device(device).type
    ok = [b for b in _BACKENDS.values() if b.why_not(dtype) is None]
    return [b.name for b in sorted(ok, key=lambda b: -b.priority[dtype])]


def device_present(device_type: str) -> Optional[str]:
    """A gate for backends that run on any device torch has: None when one is present here."""
    if device_type == "cpu":
        return None
    mod = getattr(torch, device_type, None)  # torch.cuda, torch.xpu, torch.mps, ...
    if device_type == "mps":
        present = torch.backends.mps.is_available()
    else:
        present = mod is not None and hasattr(mod, "is_available") and mod.is_available()
    return None if present else f"no {device_type} device is available here"


def check_name(name) -> None:
    """``name`` is "auto" or a backend that loaded here (whatever device it will serve)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto" and name not in KNOWN:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, KNOWN))}; got {name!r}")
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not available: {_UNAVAILABLE.get(name, 'it did not register')}")


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that serves a tensor of ``device``/``dtype``; clear errors otherwise."""
    check_name(name)
    dev = device.type
    if name == "auto":
        for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority.get(dev, -1)):
            if b.why_not(dev) is None and dtype in b.dtypes:
                return b
        raise ValueError(f"backend='auto': no backend serves {dtype} tensors on {dev}")
    b = _BACKENDS[name]
    why = b.why_not(dev)
    if why is not None:
        raise ValueError(f"backend {name!r} cannot run here: {why}")
    if dtype not in b.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in b.dtypes)
        raise TypeError(f"backend {name!r} takes w of dtype {names}; got {str(dtype).replace('torch.', '')}")
    return b
