"""Native CPU kernels side by side with a clone and F.dropout, in one run, interleaved.

    .venv/bin/python bench/native_cpu.py [--size 4096] [--dtypes float32,bfloat16] [--threads 2]
                                         [--repeats 15] [--cases fwd,fwd_bits,...]

Every repeat runs every case once, in a rotated order (so a burst of load from other
processes hits all cases alike), each on a fresh output as in training; the table gives the
median wall time over the repeats, its spread (p25..p75) and the median as a multiple of the
clone's, then the median CPU time of the process (all threads; user + system, which is what a
shared machine's load inflates least) and its system part (page faults). The system time comes
from getrusage, which the kernel samples per tick: read it as a rough split, not a precise one.
Weight [size, size], drop_rate 0.5, targ_rate 0.5, seed 1.

Environment: TD_KERNELS_HUGEPAGES=0 stops the native ops from advising their fresh outputs
onto transparent huge pages; THP_MEM_ALLOC_ENABLE=1 makes torch's own CPU allocator do that for
every allocation (clone and F.dropout included). Both are read at start-up.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import td_kernels  # noqa: F401  (registers the backends)
from td_kernels import reference
from td_kernels.backends import native
from td_kernels.tools.bench.common import device_name

CASES = ("clone", "dropout_fwd", "dropout_bwd", "fwd", "fwd_bits", "bwd_recompute", "bwd_bits", "nm_fwd",
         "unit_fwd")


def make_cases(size: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(size, size, generator=gen).to(dtype)
    g = torch.randn(size, size, generator=gen).to(dtype)
    k, D = reference.count(0.5, size), reference.drop_threshold(0.5)
    _, limit, bits = native.weight_dropout(w, 1, k, D, bits=True)
    wr = w.clone().requires_grad_()
    y = F.dropout(wr, 0.5, training=True)
    return {
        "clone": lambda: w.clone(),
        "dropout_fwd": lambda: F.dropout(w, 0.5, training=True),
        "dropout_bwd": lambda: torch.autograd.grad(y, wr, g, retain_graph=True),
        "fwd": lambda: native.weight_dropout(w, 1, k, D),
        "fwd_bits": lambda: native.weight_dropout(w, 1, k, D, bits=True),
        "bwd_recompute": lambda: native.weight_dropout_backward(g, w, limit, 1, D),
        "bwd_bits": lambda: native.weight_dropout_backward(g, None, None, 1, D, bits=bits),
        "nm_fwd": lambda: native.nm_dropout(w, 1, 2, 4, D),
        "unit_fwd": lambda: native.unit_dropout(w, 1, k, D),
    }


def measure(cases: dict, names: list, repeats: int) -> dict:
    """{case: [(wall, cpu, sys) seconds per call]}"""
    for n in names:  # warm up: first-touch of inputs, thread pool, code
        cases[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            s0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.process_time(), time.perf_counter()
            cases[n]()
            t1, c1, s1 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
            times[n].append((t1 - t0, c1 - c0, s1 - s0))
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [c for c in args.cases.split(",") if c]
    unknown = set(names) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{device_name(torch.device('cpu'))}, {os.cpu_count()} CPUs, {args.threads} thread(s), torch {torch.__version__}; "
          f"load average {load:.1f} at start")
    print(f"native: {native.BUILD_INFO}")
    print(f"TD_KERNELS_HUGEPAGES={os.environ.get('TD_KERNELS_HUGEPAGES', '(unset: on)')} "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset: off)')}")
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        cases = make_cases(args.size, dtype)
        times = measure(cases, names, args.repeats)
        med = {n: [statistics.median(x[i] for x in times[n]) for i in range(3)] for n in names}
        base = med["clone"] if "clone" in med else None
        print(f"\n{dname} [{args.size}, {args.size}], {args.repeats} interleaved repeats")
        print(f"  {'case':14s} {'wall ms':>9s} {'p25..p75 ms':>16s} {'x clone':>8s} {'cpu ms':>8s} {'x clone':>8s}"
              f" {'sys ms':>7s}")
        for n in names:
            t = sorted(x[0] for x in times[n])
            q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
            rel = f"{med[n][0] / base[0]:8.2f}" if base else ""
            crel = f"{med[n][1] / base[1]:8.2f}" if base else ""
            print(f"  {n:14s} {med[n][0] * 1e3:9.2f} {q[0] * 1e3:7.2f}..{q[2] * 1e3:7.2f} {rel} "
                  f"{med[n][1] * 1e3:8.2f} {crel} {med[n][2] * 1e3:7.1f}")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else "")


if __name__ == "__main__":
    main()
