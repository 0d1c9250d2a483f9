"""What the benchmark programs share (``ops``, ``step``, ``inference``): timing, the machine's
and the commit's names, the hand-written ``kthvalue`` composites a user would otherwise write,
argument parsing and table/CSV output. Imports no other benchmark module."""
from __future__ import annotations

import argparse
import csv
import math
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from ..._registry import device_name  # noqa: F401  (the device_name column, as auto's table names cards)
from ...reference import count


def _kthvalue_weight(w, drop_rate, targ_rate):
    """Weight targeting as one would write it by hand, unfused: |W|, the k-th smallest per row
    (kthvalue sorts/selects), a float32 uniform per element, and masked_fill, which keeps a
    bool (1 byte per element) mask for backward."""
    with torch.no_grad():
        a = w.reshape(w.shape[0], -1).abs()
        k = count(targ_rate, a.shape[1])
        if k == 0 or k == a.shape[1]:
            cand = torch.full_like(a, k != 0, dtype=torch.bool)
        else:
            cand = a < a.kthvalue(k + 1, dim=1, keepdim=True).values
        drop = cand & (torch.rand(a.shape, device=a.device) < drop_rate)
    return w.masked_fill(drop.view(w.shape), 0)


def _kthvalue_unit(w, drop_rate, targ_rate):
    """Unit targeting by hand: row L2 norms, kthvalue over them, one uniform per unit."""
    with torch.no_grad():
        U = w.shape[0]
        norms = w.reshape(U, -1).float().norm(dim=1)
        k = count(targ_rate, U)
        if k == 0 or k == U:
            cand = torch.full_like(norms, k != 0, dtype=torch.bool)
        else:
            cand = norms < norms.kthvalue(k + 1).values
        drop = cand & (torch.rand(U, device=w.device) < drop_rate)
    return w.masked_fill(drop.view(U, *[1] * (w.ndim - 1)), 0)


def _kthvalue_nm(w, drop_rate, n, m):
    """N:M targeting by hand: |W| in groups of m, a stable argsort per group (ties to the lower
    index, as SPEC section 11), the m - n first are candidates, a uniform per element."""
    with torch.no_grad():
        a = w.reshape(w.shape[0], -1, m).abs()
        order = a.argsort(dim=2, stable=True)[..., : m - n]
        cand = torch.zeros_like(a, dtype=torch.bool).scatter_(2, order, True)
        drop = cand & (torch.rand(a.shape, device=a.device) < drop_rate)
    return w.masked_fill(drop.view(w.shape), 0)


@dataclass
class Timing:
    ms: float
    p20: float
    p80: float
    runs: int
    timer: str


def _quantile(xs, q):
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_fn(fn: Callable, device: torch.device, args) -> Timing:
    if device.type == "cuda":
        try:
            import triton.testing
        except ImportError:
            return _time_cuda_events(fn, args)
        ms, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(ms, p20, p80, -1, "triton.testing.do_bench")
    from torch.utils.benchmark import Timer
    t = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    first = t.timeit(1).median  # warm-up, and tells slow ops apart
    if first > args.slow_call_s:  # e.g. the reference on CPU: --slow-runs single calls, the
        # first included (warm-up effects are noise next to a call this slow)
        times = [first] + [t.timeit(1).median for _ in range(args.slow_runs - 1)]
        kind = "torch.utils.benchmark.Timer.timeit(1)"
    else:
        m = t.blocked_autorange(min_run_time=args.min_time)
        times = m.times
        kind = "torch.utils.benchmark.Timer.blocked_autorange"
    ms = [x * 1e3 for x in times]
    return Timing(_quantile(ms, 0.5), _quantile(ms, 0.2), _quantile(ms, 0.8), len(ms), kind)


def _time_cuda_events(fn, args) -> Timing:
    """Fallback without Triton: CUDA events, a 256 MiB write before each run flushes L2."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    ms = []
    for _ in range(max(5, args.cuda_runs)):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    return Timing(_quantile(ms, 0.5), _quantile(ms, 0.2), _quantile(ms, 0.8), len(ms), "cuda events")


def git_commit() -> str:
    repo = Path(__file__).resolve().parents[3]  # td_kernels/tools/bench/ -> the repo
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return ""


def _csv_list(choices=None):
    def parse(s):
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or s!r}: choose from {', '.join(choices)}")
        return items
    return parse


def interleaved(items: list, rounds: int):
    """``(round, item)`` for ``rounds`` rounds over ``items``, each round starting one item
    later, so that a slow phase of a shared machine lands on every item alike."""
    for r in range(rounds):
        for item in items[r % len(items):] + items[:r % len(items)]:
            yield r, item


def median(xs) -> float:
    return _quantile(list(xs), 0.5)


def text_table(head, lines, left: int) -> str:
    """Aligned columns: the first ``left`` left-aligned (labels), the rest right-aligned (numbers)."""
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(l) for l in lines])


def write_csv(rows, path: Path, columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=columns)
        wr.writeheader()
        for r in rows:
            wr.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
