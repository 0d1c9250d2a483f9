"""The backend registry: the one place where a public op learns which kernels to run.

A backend is a set of launchers that compute the functions of SPEC.md on 2-D views
``w2d = w.reshape(U, F)`` (contiguous, float16/bfloat16/float32, float64 where the backend
says so). Backends register themselves when their module imports; the public functions never
branch on backend names. One launcher per targeting kind and direction; what varies inside a
kind (where the block sits in a global weight, whether the forward writes a mask) is an
argument, never another launcher. Every launcher takes plain tensors and Python ints:

``weight_dropout(w2d, seed, k, D, *, window=None, limit=None, bits=False, variant=None) -> (out2d, limit, bits)``
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
``variant`` None (the backend's default, a module knob) or one of ``Backend.variants["weight"]``:
    another algorithm for the same bits (how the threshold is selected). ``backend="auto"``
    passes the one measured fastest on this device (``choose``); a backend without variants
    takes None only.

``backend="auto"``: on a device listed in ``td_kernels._measured.CARDS`` (a GPU whose benchmark
was tuned in by ``td-kernels tune``), each targeting kind takes the backend and variant measured
fastest there, when that backend serves the call; everywhere else, and as the fallback, the
usable backend of highest ``priority`` for the device type.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import _measured

__all__ = ["Backend", "register", "unavailable", "available_backends", "check_name", "resolve", "choose",
           "known_backends", "card_name", "card_slug", "device_name", "measured_choice", "check_variant", "KINDS"]

KINDS = ("weight", "nm", "unit")


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
    # targeting kind -> the names of its launcher's ``variant`` values, the default first
    variants: dict = field(default_factory=dict)

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


def card_name(device) -> str:
    """The name ``_measured.CARDS`` knows ``device`` by: ``device_name`` lower-cased with every run
    of other characters one ``-`` (``"nvidia-h200"``), as bench/gpu.sh names its results folder."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None or dev.type != "cuda" else torch.cuda.current_device()
    return _card_name(dev.type, index)


@functools.lru_cache(maxsize=None)
def _card_name(device_type: str, index) -> str:
    return card_slug(device_name(torch.device(device_type, index)))


def device_name(device) -> str:
    """torch's name for a GPU (``"NVIDIA H200"``), else the CPU's model from /proc/cpuinfo (the
    platform's processor name where there is none): the benchmarks' ``device_name`` column."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "cpu"


def card_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: lower case, each run of other characters one ``-``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def measured_choice(device, kind: str) -> Optional[dict]:
    """``_measured.CARDS``' choice for ``kind`` on ``device``'s card (``{"backend", "variant", ...}``),
    or None when that card was not measured."""
    dev = torch.device(device)
    if not any(c.get("device_type") == dev.type for c in _measured.CARDS.values()):
        return None  # the common case: no name lookup at all
    card = _measured.CARDS.get(card_name(dev))
    return None if card is None else card.get("choices", {}).get(kind)


_WARNED: set = set()


def _measured_pick(device: torch.device, dtype: torch.dtype, kind: str):
    """``(backend, variant)`` of the measured choice when it can serve this call, else None. An
    entry this library cannot use (an unknown backend or variant: a table from another version)
    falls back to the priority order with one warning, never an error in a user's call."""
    pick = measured_choice(device, kind)
    if pick is None:
        return None
    name, variant = pick.get("backend"), pick.get("variant")
    b = _BACKENDS.get(name)
    if name not in KNOWN or (b is not None and variant is not None and variant not in b.variants.get(kind, ())):
        key = (card_name(device), kind)
        if key not in _WARNED:
            _WARNED.add(key)
            import warnings
            warnings.warn(f"td_kernels._measured.CARDS[{key[0]!r}] names backend {name!r} variant {variant!r} for "
                          f"{kind} targeting, which this td_kernels does not have: backend='auto' uses the "
                          "priority order there (re-run `td-kernels tune --write`)", RuntimeWarning, stacklevel=4)
        return None
    return (b, variant) if b is not None and _serves(b, device.type, dtype) else None


def check_variant(backend: str, kind: str, variant, variants: tuple) -> Optional[str]:
    """``variant`` is None or one of ``variants`` (a ValueError naming both otherwise)."""
    if variant is not None and variant not in variants:
        have = f"one of {variants}" if variants else "None (it has one algorithm)"
        raise ValueError(f"variant of backend {backend!r}'s {kind} forward must be {have}; got {variant!r}")
    return variant


def _serves(b: Backend, dev: str, dtype: torch.dtype) -> bool:
    return b.why_not(dev) is None and dtype in b.dtypes


def choose(name: str, device: torch.device, dtype: torch.dtype, kind: Optional[str] = None):
    """``(backend, variant)`` for a call of targeting ``kind`` on a ``device``/``dtype`` tensor:
    ``resolve``'s backend and, where ``backend="auto"`` took a measured choice, its variant
    (else None: the backend's default)."""
    check_name(name)
    pick = _measured_pick(device, dtype, kind) if name == "auto" and kind is not None else None
    return pick if pick is not None else (resolve(name, device, dtype), None)


def resolve(name: str, device: torch.device, dtype: torch.dtype, kind: Optional[str] = None) -> Backend:
    """The backend that serves a tensor of ``device``/``dtype``; clear errors otherwise. With
    ``kind``, ``backend="auto"`` takes the measured choice for that targeting kind (``choose``)."""
    if kind is not None:
        return choose(name, device, dtype, kind)[0]
    check_name(name)
    dev = device.type
    if name == "auto":
        for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority.get(dev, -1)):
            if _serves(b, dev, dtype):
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
