"""``td-kernels info``: the one block a user pastes into a bug report.

Versions (td_kernels, Python, torch, Triton, CUDA), the devices torch sees, every backend with
whether it serves each device here (and why not, and how to get it), what the native extension
was built with, and the CPU thread counts."""
from __future__ import annotations

import os
import platform
import sys

import torch

__all__ = ["collect", "format_info", "build_record", "why_no_native_cuda", "native_cuda_problems"]

# environment variables that change what td_kernels or its backends do
ENV_VARS = ("TRITON_INTERPRET", "TD_KERNELS_BUILD_EXT", "TD_KERNELS_BUILD_CUDA", "CUDA_VISIBLE_DEVICES",
            "OMP_NUM_THREADS", "CUDA_HOME")


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def _devices() -> list:
    out = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def build_record() -> dict | None:
    """td_kernels/_build.json, which setup.py writes: what it made of the extension and why
    (``extension`` and ``cuda``: "built", "not built" or "failed"; ``why``; ``error``; the torch
    and nvcc it used). None where there is none (a copied extension, or an older setup.py)."""
    import json

    import td_kernels

    try:
        with open(os.path.join(os.path.dirname(td_kernels.__file__), "_build.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def why_no_native_cuda() -> str | None:
    """Why backend "native" has no CUDA kernels in this install (None: it has them), as setup.py
    recorded it: a CPU-only torch or no nvcc at build time, TD_KERNELS_BUILD_CUDA=0, a failed
    build; or an extension that does not load."""
    try:
        from ..backends import native
        load_error = None
    except Exception as e:  # not built, or built against another torch
        native, load_error = None, f"td_kernels._C did not load ({e})"
    if native is not None and native.WITH_CUDA:
        return None
    record = build_record()
    if record is None:
        why = "no build record (td_kernels/_build.json): build it with `pip install --no-build-isolation -e .`"
    elif record.get("cuda") == "built":  # the record and the loaded library disagree
        why = "setup.py built CUDA kernels, but the extension loaded has none (a stale td_kernels/_C*.so?)"
    else:
        why = record.get("why") or f"the extension was {record.get('extension')}"
        if record.get("extension") == "failed" and record.get("error"):
            why += f"; its error: {record['error'].splitlines()[0][:300]}"
    return why if load_error is None else f"{load_error}; {why}"


def native_cuda_problems() -> list:
    """What keeps this install's native CUDA kernels from being complete (empty: nothing).
    ``td-kernels info --require-native-cuda`` prints these and fails; CI and bench/gpu.sh run it.
    Complete: native.WITH_CUDA, BUILD_INFO naming sm_80 and sm_90 (setup.py's architectures),
    and every ``td_kernels_native`` op registered for the CUDA dispatch key."""
    why = why_no_native_cuda()
    if why is not None:
        return [f"no CUDA kernels: {why}"]
    from ..backends import native

    problems = [f"BUILD_INFO names no sm_{sm}: {native.BUILD_INFO}" for sm in (80, 90)
                if f"sm_{sm}" not in native.BUILD_INFO]
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("td_kernels_native::"))
    if not ops:
        problems.append("no td_kernels_native ops are registered")
    problems += [f"{op} has no CUDA kernel" for op in ops
                 if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    return problems


def _native_build() -> str:
    try:
        from .. import _C
    except Exception as e:  # not built, or built against another torch
        return f"not loaded ({type(e).__name__}: {e})"
    info = getattr(_C, "BUILD_INFO", None)
    if info is not None:
        return info if isinstance(info, str) else ", ".join(f"{k}={v}" for k, v in dict(info).items())
    return f"CPU kernels{' + CUDA kernels' if getattr(_C, 'WITH_CUDA', False) else ''} (WITH_CUDA={bool(_C.WITH_CUDA)})"


_HOW = {("triton", "cuda"): " (Triton needs a CUDA build of torch and a GPU)"}


def _backends(device_types) -> list:
    from .. import _registry

    rows = []
    for name in _registry.known_backends():
        b = _registry._BACKENDS.get(name)
        if b is None:
            why = _registry._UNAVAILABLE.get(name, "it did not register")
            rows.append((name, {d: f"unavailable: {why}" for d in device_types}))
            continue
        status = {}
        for d in device_types:
            why = b.why_not(d)
            how = _HOW.get((name, d), "")
            if (name, d) == ("native", "cuda") and why_no_native_cuda() is not None:
                how = (f" ({why_no_native_cuda()}; with a CUDA build of torch and nvcc on PATH or "
                       "CUDA_HOME, `pip install --no-build-isolation -e .` compiles them)")
            status[d] = "available" if why is None else f"no: {why}{how}"
        rows.append((name, status))
    return rows


def _auto_picks(device_type: str, names: list) -> str:
    """What backend="auto" takes on this device type: the priority order's first backend, or,
    on a card that ``td-kernels tune`` measured, the choice per targeting kind."""
    from .._measured import CARDS
    from .._registry import KINDS, card_name, choose, measured_choice

    first = names[0] if names else "none"
    if not names or (device_type == "cuda" and not torch.cuda.is_available()):
        return first
    dev = torch.device(device_type)
    if all(measured_choice(dev, kind) is None for kind in KINDS):
        return f"{first} (by priority: {card_name(dev)} was not measured)"
    picks = []
    for kind in KINDS:
        b, variant = choose("auto", dev, torch.float32, kind)
        m = measured_choice(dev, kind)
        how = "measured" if m and m["backend"] == b.name else "by priority"
        picks.append(f"{kind}: {b.name}{'' if variant is None else ':' + variant} ({how})")
    card = CARDS[card_name(dev)]
    return f"{', '.join(picks)}; tuned from {card['source']} at commit {card['git_commit']}"


def collect() -> dict:
    """Everything ``td-kernels info`` prints, as a dict."""
    import td_kernels as td
    from .._registry import available_backends

    device_types = ["cpu", "cuda"] + (["mps"] if "mps" in _devices() else [])
    auto = {d: _auto_picks(d, available_backends(d)) for d in device_types}
    cuda = torch.version.cuda
    return {
        "td_kernels": f"{td.__version__} ({os.path.dirname(td.__file__)})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": f"{torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU-only build'}"
                 f"{', HIP ' + torch.version.hip if getattr(torch.version, 'hip', None) else ''})",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "CUDA available": f"{torch.cuda.is_available()} ({torch.cuda.device_count()} device(s))",
        "devices": _devices(),
        "native extension": _native_build(),
        "native CUDA kernels": why_no_native_cuda() or "built",
        "backends": _backends(device_types),
        "backend='auto' picks": auto,
        "threads": f"torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}, "
                   f"os.cpu_count {os.cpu_count()}",
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def format_info(info: dict | None = None) -> str:
    info = collect() if info is None else info
    lines = ["td_kernels info (paste this into a bug report)"]
    for key, value in info.items():
        if key == "backends":
            lines.append("backends:")
            for name, status in value:
                lines.append(f"  {name}:")
                lines.extend(f"    {d}: {s}" for d, s in status.items())
        elif key == "devices":
            lines.append(f"devices: {', '.join(value)}")
        elif isinstance(value, dict):
            text = ", ".join(f"{k}={v}" for k, v in value.items()) or "(none set)"
            lines.append(f"{key}: {text}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
