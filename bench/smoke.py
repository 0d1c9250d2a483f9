"""`bash bench/gpu.sh --smoke`'s check: is every kernel family right on this device, and how fast?

For each backend that serves the device except the reference ("triton", "native"; the Triton
interpreter on a CPU) and each family (weight, N:M, unit), and for weight targeting each other
selection variant ("triton:sampled", "native:fused"), one forward and one backward on the
device compared bit for bit (outputs and grads as integers: NaN payloads and -0 count) with the
reference on a CPU copy; then one timing line per backend: weight targeted dropout forward +
backward on one shape, next to a clone. Every line is printed and appended to OUT/smoke.csv as
soon as it exists, so a run cut short keeps what it did. Exit 1 if any check failed.

    python bench/smoke.py --device cuda --out DIR
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from types import SimpleNamespace

import torch

import td_kernels as td
from td_kernels.tools.bench.common import device_name, time_fn
from td_kernels.tools.bench.ops import VARIANTS, variant

SEED, DROP, TARG, NM = 2026, 0.5, 0.5, (2, 4)
CHECK_SHAPE = (67, 1028)  # odd unit count, a fan-in neither a power of two nor a multiple of 16 words
FAMILIES = {  # name -> w, backend -> out
    "weight": lambda w, b: td.targeted_weight_dropout(w, DROP, TARG, seed=SEED, backend=b),
    "nm": lambda w, b: td.targeted_nm_dropout(w, DROP, n=NM[0], m=NM[1], seed=SEED, backend=b),
    "unit": lambda w, b: td.targeted_unit_dropout(w, DROP, TARG, seed=SEED, backend=b),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def check(family: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'ok' or what differs: forward output, then the grad of a fixed incoming gradient."""
    gen = torch.Generator().manual_seed(0)
    w_cpu = torch.randn(CHECK_SHAPE, generator=gen).to(dtype)
    g_cpu = torch.randn(CHECK_SHAPE, generator=gen).to(dtype)
    results = {}
    for b, dev in (("reference", torch.device("cpu")), (backend, device)):
        w = w_cpu.to(dev).requires_grad_()
        out = FAMILIES[family](w, b)
        (grad,) = torch.autograd.grad(out, w, g_cpu.to(dev))
        results[b] = (_bits(out), _bits(grad))
    for what, ref, got in zip(("forward", "backward"), results["reference"], results[backend]):
        if not torch.equal(ref, got):
            return f"{what}: {(ref != got).sum().item()} of {ref.numel()} elements differ"
    return "ok"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=".", help="folder for smoke.csv")
    p.add_argument("--time-shape", default=None, help="UxF for the timing lines (default 4096x4096 on CUDA, "
                                                      "512x1024 on a CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shape = tuple(int(x) for x in (args.time_shape or ("4096x4096" if device.type == "cuda" else "512x1024"))
                  .split("x"))
    backends = [b for b in td.available_backends(device) if b != "reference"]
    path = os.path.join(args.out, "smoke.csv")
    os.makedirs(args.out, exist_ok=True)
    fresh = not os.path.exists(path)
    f = open(path, "a", newline="")
    wr = csv.writer(f)
    if fresh:
        wr.writerow(["device", "backend", "what", "dtype", "shape", "result"])

    def emit(backend, what, dtype, shp, result):
        print(f"smoke: {backend:14s} {what:22s} {dtype:9s} {shp:10s} {result}", flush=True)
        wr.writerow([device_name(device), backend, what, dtype, shp, result])
        f.flush()

    print(f"smoke: {device_name(device)} ({device}), torch {torch.__version__}, backends {backends}", flush=True)
    failed = 0 if backends else 1
    if not backends:
        emit("-", "backends", "-", "-", f"FAILED: none serves {device.type} (td-kernels info says why)")
    # the backends' other selection variants too ("native:fused", "triton:sampled"): backend="auto"
    # takes one where td-kernels tune measured it fastest (the CPU ignores native's)
    checks = [(b, family) for b in backends for family in FAMILIES]
    checks += [(v, "weight") for v, (b, *_) in VARIANTS.items() if b in backends]
    for provider, family in checks:
        t0 = time.perf_counter()
        try:
            with variant(provider) as backend:
                result = check(family, backend, device, torch.float32)
        except Exception as e:  # a launch or compile error is a failed check, not the end
            result = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        failed += result != "ok"
        emit(provider, f"{family} fwd+bwd bit-exact", "float32", "x".join(map(str, CHECK_SHAPE)),
             f"{'ok' if result == 'ok' else 'FAILED: ' + result} ({time.perf_counter() - t0:.1f} s)")
    timing = SimpleNamespace(warmup_ms=10, rep_ms=50, cuda_runs=20, slow_call_s=1.0, slow_runs=3, min_time=0.2)
    w = torch.randn(shape, device=device).requires_grad_()
    g = torch.randn(shape, device=device)
    clone_ms = time_fn(lambda: w.clone(), device, timing).ms
    for backend in backends:
        if backend == "triton" and device.type == "cpu":
            emit(backend, "weight fwd+bwd time", "float32", args.time_shape or "-", "not timed: the interpreter")
            continue
        fn = lambda: torch.autograd.grad(FAMILIES["weight"](w, backend), w, g)  # noqa: E731
        try:
            ms = time_fn(fn, device, timing).ms
            result = f"{ms:.3f} ms (clone {clone_ms:.3f} ms: {ms / clone_ms:.1f}x)"
        except Exception as e:
            result, failed = f"FAILED: {type(e).__name__}: {e}".splitlines()[0][:300], failed + 1
        emit(backend, "weight fwd+bwd time", "float32", "x".join(map(str, shape)), result)
    f.close()
    print(f"smoke: {'all checks passed' if not failed else f'{failed} FAILED'}; wrote {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # gpu.sh's time limit (SIGINT): the lines so far are in smoke.csv
        print("smoke: stopped by SIGINT (the stage's time limit?)", flush=True)
        sys.exit(130)
