"""Benchmarks that tell the truth: time, achieved bandwidth, memory kept for backward.

``python -m td_kernels.tools.bench.ops --help`` (also ``td-kernels bench``). For every (op, mode,
shape, dtype) it times each *provider*:

* one per backend in ``td.available_backends(device)``, called through the public API with
  ``backend=name`` (the Triton interpreter is not a provider: on CPU it measures Python);
* ``torch-kthvalue``: the unfused composite a user would write by hand (abs, kthvalue per row
  -- or an argsort per N:M group --, a torch.rand draw, masked_fill): "what you'd otherwise write";
* ``dropout``: ``torch.nn.functional.dropout`` on the same tensor;
* ``triton:sampled``, ``native:fused`` (CUDA, weight targeting): the backend with another
  selection algorithm switched on for the call (``VARIANTS``; same bits), to A/B them;
* ``clone``: a plain copy, the floor for any one-pass op (always measured: the bandwidth
  fractions are relative to it).

Our backends run weight and N:M targeting once per mask format (``--masks``, column ``mask``):
``bits`` (the forward writes a 1-bit keep mask, the backward reads grad and the bits) and
``recompute`` (the backward rebuilds the mask from W and the seed).

Timing: CUDA uses ``triton.testing.do_bench`` (L2 flushed before every run; median and
20/80% quantiles); CPU uses ``torch.utils.benchmark.Timer`` (``blocked_autorange``, or single
calls for ops slower than ``--slow-call-s``) at ``torch.get_num_threads()`` threads, stated in
every row, in ``--rounds`` interleaved rounds (3 on CPU, 1 on CUDA) whose medians are reported:
on a shared VM whose speed drifts by 10-30% within a minute, timing one provider after another
once had put the same kernel at 50 ms in one run and 28 ms in the next. Forward timing runs on
a leaf that requires grad, as in training.

Bandwidth: ``op_bytes`` is the traffic the op *must* move (see its docstring); GB/s =
op_bytes / time is the same numerator for every provider of a row group, so it ranks time;
``frac_copy`` divides it by the copy's bandwidth measured in the same run (the clone row uses
the copy's own bytes). Memory: ``saved_bytes`` sums the tensors the autograd graph keeps for
backward (the weight, a parameter, excluded); ``peak_mb`` is the peak memory a forward+backward
allocates above what existed before it (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the
torch profiler's allocator events, i.e. every tensor allocation by torch, not the process RSS).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import sys
import weakref
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import td_kernels as td

from .common import (_csv_list, _kthvalue_nm, _kthvalue_unit, _kthvalue_weight, _version, device_name, git_commit,
                     interleaved, median, read_csv, text_table, time_fn, write_csv)

__all__ = ["main", "op_bytes", "copy_bytes", "compare_rows", "saved_bytes", "provider_names", "make_fn", "VARIANTS",
           "interleaved", "median", "COLUMNS", "SHAPES", "QUICK_SHAPES", "OPS", "MODES"]

# Linear [out, in] of a 7B-class MLP and attention, conv [out, in, 3, 3], and a long row.
SHAPES = ("4096x4096", "11008x4096", "4096x11008", "512x512x3x3", "64x64x3x3", "256x1000000")
QUICK_SHAPES = ("1024x1024", "64x64x3x3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("weight", "unit", "nm")
MASKS = ("bits", "recompute")
NM = (2, 4)  # the N:M pattern benchmarked: 2:4, what sparse tensor cores run
MODES = ("fwd", "bwd", "fwd+bwd")
YARDSTICKS = ("torch-kthvalue", "dropout", "clone")
# Kernel variants to A/B on a GPU: the same bits by another algorithm, weight targeting only.
# "backend:variant" runs the backend with one of its module knobs set for the call:
# provider -> (backend, module, knob, value).
VARIANTS = {
    "triton:sampled": ("triton", "td_kernels.backends.triton.weight_dropout", "SELECT", "sampled"),
    "native:fused": ("native", "td_kernels.backends.native", "WEIGHT_FORWARD", "fused"),
}
COLUMNS = (
    "timestamp", "device_type", "device_name", "threads", "torch", "triton", "git_commit",
    "op", "mode", "shape", "dtype", "provider", "mask", "drop_rate", "targ_rate",
    "ms", "ms_p20", "ms_p80", "runs", "rounds", "timer", "bytes", "gbps", "copy_gbps", "frac_copy",
    "speedup_vs_reference", "speedup_vs_dropout", "saved_bytes_per_elem", "peak_mb",
)
# what identifies "the same measurement" across runs for --compare
KEY_COLUMNS = ("device_name", "threads", "op", "mode", "shape", "dtype", "provider", "mask", "drop_rate",
               "targ_rate")


# ---- the bytes model ---------------------------------------------------------------------
def op_bytes(op: str, mode: str, U: int, F: int, elem_size: int, mask: str = "recompute") -> int:
    """Bytes targeted dropout must move, N = U*F elements of ``elem_size`` bytes:

    weight fwd: read W + write out (N each) + write the int32 limit (4 bytes/unit)
                (+ the 1-bit keep mask, 4 bytes per 32 elements of a unit, with mask="bits")
    weight bwd: "recompute": read grad + read W (keep is recomputed from the keys) + read limit
                + write grad_w; "bits": read grad + read the bits + write grad_w
    nm fwd/bwd: as weight targeting without the limit (the groups need no threshold)
    unit   fwd: read W + write out + write the bool keep flag (1 byte/unit)
    unit   bwd: read grad + read keep + write grad_w (W is not needed); no mask formats
    fwd+bwd: the sum. The selection's own passes over W (the k-th key per row, the row norms)
    are *not* counted: a fused kernel that keeps a row on chip reads W once, so this is the
    floor, and GB/s above it means an implementation moves less than a one-pass op could.
    """
    N = U * F
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if op == "unit":
        fwd, bwd = 2 * N * elem_size + U, 2 * N * elem_size + U
    else:
        per_unit = 4 * U if op == "weight" else 0
        bits = 4 * U * ((F + 31) // 32) if mask == "bits" else 0
        fwd = 2 * N * elem_size + per_unit + bits
        bwd = 2 * N * elem_size + bits if mask == "bits" else 3 * N * elem_size + per_unit
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def copy_bytes(mode: str, N: int, elem_size: int) -> int:
    """A clone reads and writes N elements; fwd+bwd is two clones (W, then grad)."""
    return (4 if mode == "fwd+bwd" else 2) * N * elem_size


# ---- providers ---------------------------------------------------------------------------


def provider_names(device) -> list:
    """Providers for ``device``: the library's backends (best first, reference first), then
    the yardsticks. On CPU the Triton backend runs only in its interpreter: not a provider."""
    dev = torch.device(device).type
    backends = [b for b in td.available_backends(dev) if not (b == "triton" and dev != "cuda")]
    backends.sort(key=lambda b: b != "reference")
    variants = [v for v, (b, *_) in VARIANTS.items() if b in backends and dev == "cuda"]  # CUDA kernels' choices
    return backends + variants + list(YARDSTICKS)


def masks_for(provider: str, op: str, masks=MASKS) -> tuple:
    """The mask formats a provider runs for an op: ours, for weight and N:M targeting, each of
    ``masks``; the yardsticks and unit targeting have none (""); a variant runs weight targeting only."""
    if provider in VARIANTS and op != "weight":
        return ()
    return tuple(masks) if provider not in YARDSTICKS and op != "unit" else ("",)


@contextlib.contextmanager
def variant(provider: str):
    """Within: ``provider``'s variant knob set (nothing for a plain backend); yields the backend."""
    if provider not in VARIANTS:
        yield provider
        return
    import importlib
    backend, module, knob, value = VARIANTS[provider]
    mod = importlib.import_module(module)
    saved = getattr(mod, knob)
    setattr(mod, knob, value)
    try:
        yield backend
    finally:
        setattr(mod, knob, saved)


def make_fn(provider: str, op: str, drop_rate: float, targ_rate: float, seed: int = 1234,
            mask: str = "") -> Callable:
    """``w -> out`` for one provider and op (a fixed seed: no RNG draw is timed for ours)."""
    if provider == "clone":
        return torch.clone
    if provider == "dropout":
        return lambda w: F.dropout(w, drop_rate, training=True)
    if provider == "torch-kthvalue":
        if op == "nm":
            return lambda w: _kthvalue_nm(w, drop_rate, *NM)
        f = _kthvalue_weight if op == "weight" else _kthvalue_unit
        return lambda w: f(w, drop_rate, targ_rate)
    mask = mask or td.api.DEFAULT_MASK
    if provider in VARIANTS:
        def fn(w):
            with variant(provider) as backend:
                return td.targeted_weight_dropout(w, drop_rate, targ_rate, seed=seed, backend=backend, mask=mask)
        return fn
    if op == "weight":
        return lambda w: td.targeted_weight_dropout(w, drop_rate, targ_rate, seed=seed, backend=provider, mask=mask)
    if op == "nm":
        return lambda w: td.targeted_nm_dropout(w, drop_rate, n=NM[0], m=NM[1], seed=seed, backend=provider,
                                                mask=mask)
    return lambda w: td.targeted_unit_dropout(w, drop_rate, targ_rate, seed=seed, backend=provider)


def make_bench_fn(provider: str, op: str, mode: str, w, g, drop_rate: float, targ_rate: float,
                  mask: str = "") -> Callable:
    """The callable timed for a mode. ``w`` is a leaf requiring grad, ``g`` the incoming grad.

    bwd: one forward builds the graph; each call runs backward through it (retain_graph).
    clone has no real backward (CloneBackward passes grad through untouched), so its bwd is
    an explicit copy of the grad: the floor for a one-pass backward."""
    f = make_fn(provider, op, drop_rate, targ_rate, mask=mask)
    if mode == "fwd":
        return lambda: f(w)
    if provider == "clone":
        return (lambda: g.clone()) if mode == "bwd" else (lambda: (w.clone(), g.clone()))
    if mode == "bwd":
        out = f(w)
        return lambda: torch.autograd.grad(out, w, g, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(f(w), w, g)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ---- memory ------------------------------------------------------------------------------
class _Packed:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def saved_bytes(fn: Callable, w) -> int:
    """Bytes the autograd graph of ``fn(w)`` keeps for backward, the weight itself excluded.

    Saved tensors are caught with saved_tensors_hooks and held through weak handles, so what a
    graph packed and already freed (intermediate nodes that died) does not count; tensors
    stashed as attributes on graph nodes are found by walking the graph. Each storage counts
    once, whole."""
    handles = []

    def pack(t):
        h = _Packed(t)
        handles.append(weakref.ref(h))
        return h

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        out = fn(w)
    gc.collect()
    tensors = [h().t for h in handles if h() is not None]
    seen, stack = set(), [out.grad_fn]
    while stack:  # ctx.<attr> = tensor on custom autograd Functions
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for v in getattr(node, "__dict__", {}).values():
            for t in (v if isinstance(v, (list, tuple)) else (v,)):
                if isinstance(t, torch.Tensor):
                    tensors.append(t)
        stack.extend(n for n, _ in node.next_functions)
    skip = {w.untyped_storage().data_ptr()}
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            skip.add(s.data_ptr())
            total += s.nbytes()
    del out
    return total


@contextlib.contextmanager
def _quiet_fd2():
    """Kineto prints start/stop lines to fd 2; keep the table readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable, device: torch.device) -> Optional[int]:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ---- run ---------------------------------------------------------------------------------
def parse_shape(s: str) -> tuple:
    try:
        dims = tuple(int(d) for d in s.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) < 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not a shape like 4096x4096 or 512x512x3x3")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="td-kernels bench", description=__doc__.split("\n\n")[0],
                                epilog="td-kernels bench --step [...] times whole training steps instead "
                                       "(td_kernels.tools.bench.step; --step --help for its options)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=lambda v: [parse_shape(x) and x for x in _csv_list()(v)], default=None, help=f"comma list (default: {','.join(SHAPES)})")
    p.add_argument("--dtypes", type=_csv_list(DTYPES), default=None, help="comma list (default: float32,bfloat16)")
    p.add_argument("--providers", type=_csv_list(), default=None,
                   help="comma list (default: every backend available here, then " + ",".join(YARDSTICKS) +
                        "); clone is always measured, the copy floor")
    p.add_argument("--ops", type=_csv_list(OPS), default=list(OPS))
    p.add_argument("--modes", type=_csv_list(MODES), default=list(MODES))
    p.add_argument("--masks", type=_csv_list(MASKS), default=list(MASKS),
                   help="mask formats of our backends for weight and N:M targeting")
    p.add_argument("--quick", action="store_true",
                   help=f"small CPU-friendly subset: shapes {','.join(QUICK_SHAPES)}, float32 (unless given)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--drop-rate", type=float, default=0.5)
    p.add_argument("--targ-rate", type=float, default=0.5)
    p.add_argument("--skip-reference", action="store_true", help="do not time the (slow) reference")
    p.add_argument("--reference-max-numel", type=float, default=None,
                   help="skip the reference above this many elements (default: 64M on CPU, none on CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the saved-bytes and peak-memory measurements")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per op, shape and dtype; each row is the median of the rounds "
                        "(default 3 on CPU, 1 on CUDA; the reference is timed once)")
    p.add_argument("--min-time", type=float, default=0.3, help="CPU: blocked_autorange min_run_time per round, s")
    p.add_argument("--slow-call-s", type=float, default=0.1, help="CPU: calls slower than this get --slow-runs single calls")
    p.add_argument("--slow-runs", type=int, default=3, help="CPU: single calls timed for a slow op (>= 1)")
    p.add_argument("--warmup-ms", type=int, default=25, help="CUDA: do_bench warmup")
    p.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench rep")
    p.add_argument("--cuda-runs", type=int, default=20, help="CUDA without Triton: timed runs")
    p.add_argument("--out", type=Path, default=None, help="directory for bench.csv and bench_<op>.png")
    p.add_argument("--csv", type=Path, default=None, help="CSV path (default: OUT/bench.csv)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--compare", type=Path, default=None, help="an older CSV: flag rows slower on the same key")
    p.add_argument("--regression-threshold", type=float, default=0.10, help="relative slow-down that counts")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 if --compare found a regression")
    return p


def _fmt(x, spec):
    if x is None or x == "":
        return ""
    if spec == "sig":  # three significant digits without exponents: 2345, 12.3, 0.0123
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.3g}"
    return format(x, spec)


def run(args, on_progress: Optional[Callable[[list], None]] = None) -> list:
    """Measure everything ``args`` selects; ``on_progress(rows)`` after each shape and dtype."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (list(QUICK_SHAPES) if args.quick else list(SHAPES))
    shapes = [parse_shape(s) for s in shapes]
    available = provider_names(device)
    wanted = args.providers or available
    missing = [p for p in wanted if p not in available]
    for p in missing:
        why = td._registry._UNAVAILABLE.get(p) or ("the Triton interpreter is not a provider" if p == "triton" else
                                                   f"it does not serve {device.type}")
        print(f"# provider {p!r} skipped: {why}", file=sys.stderr)
    providers = [p for p in available if p in wanted or p == "clone"]
    if args.skip_reference and "reference" in providers:
        providers.remove("reference")
    providers.sort(key=lambda p: p != "clone")  # copy first: the rows after it need its bandwidth
    ref_max = args.reference_max_numel if args.reference_max_numel is not None else (
        64 * 2**20 if device.type == "cpu" else math.inf)

    common = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": _version("triton"), "git_commit": git_commit(),
        "drop_rate": args.drop_rate, "targ_rate": args.targ_rate,
    }
    print(f"# {common['device_name']} ({device}), torch {common['torch']}, triton {common['triton'] or '-'}, "
          f"commit {common['git_commit']}, {common['threads']} threads, drop_rate {args.drop_rate}, "
          f"targ_rate {args.targ_rate}")
    rows = []
    # drawn on the device, once per shape (every dtype gets the same values, rounded): 256x1000000
    # drawn on the host and copied over took seconds of a GPU stage's 80
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        U, N = shape[0], math.prod(shape)
        w32 = torch.randn(shape, generator=gen, device=device)
        g32 = torch.randn(shape, generator=gen, device=device)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            w = w32.to(dtype, copy=True).requires_grad_()  # a leaf, as a parameter is
            g = g32.to(dtype, copy=True)
            for op in args.ops:
                if op == "nm" and (N // U) % NM[1]:
                    print(f"# skip nm at {'x'.join(map(str, shape))}: fan-in {N // U} is not a multiple of {NM[1]}",
                          file=sys.stderr)
                    continue
                entries = []
                for p in providers:
                    if p == "reference" and N > ref_max:
                        print(f"# skip reference at {'x'.join(map(str, shape))}: {N} > --reference-max-numel "
                              f"{ref_max:.0f}", file=sys.stderr)
                        continue
                    entries.extend((p, mask) for mask in masks_for(p, op, args.masks))
                rows.extend(_measure_group(entries, op, shape, dname, w, g, args, common, device))
            del w, g
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if on_progress is not None:  # partial results survive a timeout
                on_progress(_finish(rows, args, shapes, providers))
        del w32, g32
    return _finish(rows, args, shapes, providers)


def _measure_group(entries, op, shape, dname, w, g, args, common, device) -> list:
    """The rows of one op, shape and dtype: every (provider, mask format) entry in every mode,
    plus the memory columns. Entries are timed in ``args.rounds`` interleaved rounds (each round
    starts one entry later), and each row reports the median over the rounds of the round's
    median (p20, p80): a slow phase of a shared machine then lands on every provider alike
    instead of on whichever ran during it. The reference, seconds per call, is timed once."""
    U, N = shape[0], math.prod(shape)
    rates = (args.drop_rate, args.targ_rate)
    rounds = args.rounds or (1 if device.type == "cuda" else 3)
    times = {e: {} for e in entries}
    for r, e in interleaved(entries, rounds):
        if r and e[0] == "reference":
            continue
        for mode in args.modes:
            fn = make_bench_fn(e[0], op, mode, w, g, *rates, mask=e[1])
            times[e].setdefault(mode, []).append(time_fn(fn, device, args))
            del fn
        gc.collect()
    rows = []
    for p, mask in entries:
        mem = {}
        if not args.no_memory:
            mem["saved"] = saved_bytes(make_fn(p, op, *rates, mask=mask), w) / N
            mem["peak"] = peak_bytes(make_bench_fn(p, op, "fwd+bwd", w, g, *rates, mask=mask), device)
        for mode in args.modes:
            ts = times[(p, mask)][mode]
            ms = median(t.ms for t in ts)
            nbytes = copy_bytes(mode, N, w.element_size()) if p == "clone" else \
                op_bytes(op, mode, U, N // U, w.element_size(), mask or "recompute")
            peak = mem.get("peak") if mode == "fwd+bwd" else None
            rows.append(dict(common, op=op, mode=mode, shape="x".join(map(str, shape)), dtype=dname, provider=p,
                             mask=mask, ms=ms, ms_p20=median(t.p20 for t in ts),
                             ms_p80=median(t.p80 for t in ts), runs=sum(t.runs for t in ts),
                             rounds=len(ts), timer=ts[0].timer, bytes=nbytes, gbps=nbytes / ms / 1e6,
                             saved_bytes_per_elem=mem.get("saved"), peak_mb=None if peak is None else peak / 2**20))
            print(f"# {op:6s} {mode:7s} {rows[-1]['shape']:>12s} {dname:8s} {p:15s} {mask:9s} {ms:10.3f} ms",
                  file=sys.stderr, flush=True)
    return rows


def _finish(rows, args, shapes, providers) -> list:
    rows = [dict(r) for r in rows]
    _derive(rows)
    # read by group: each (op, shape, dtype, mode) with its providers together, the copy floor last
    order = {k: i for i, k in enumerate(list(args.ops) + ["x".join(map(str, s)) for s in shapes] + list(args.dtypes)
                                        + list(MODES) + [p for p in providers if p != "clone"] + ["clone"])}
    mask_order = {m: i for i, m in enumerate(("",) + MASKS)}
    rows.sort(key=lambda r: tuple(order[r[c]] for c in ("op", "shape", "dtype", "mode", "provider"))
              + (mask_order[r["mask"]],))
    return rows


def _derive(rows) -> None:
    """Fill frac_copy and the speedups from the rows of the same group (same run); the
    reference row of the same mask format is the one a backend is compared with."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), []).append(r)
    for group in groups.values():
        by = {(r["provider"], r["mask"]): r for r in group}
        copy, drop = by.get(("clone", "")), by.get(("dropout", ""))
        for r in group:
            ref = by.get(("reference", r["mask"]))
            r["copy_gbps"] = copy["gbps"] if copy else None
            r["frac_copy"] = r["gbps"] / copy["gbps"] if copy else None
            r["speedup_vs_reference"] = ref["ms"] / r["ms"] if ref else None
            r["speedup_vs_dropout"] = drop["ms"] / r["ms"] if drop else None


def label(r) -> str:
    """A row's provider, with its mask format where it has one: "native (bits)"."""
    return f"{r['provider']} ({r['mask']})" if r.get("mask") else r["provider"]


def format_table(rows) -> str:
    head = ("op", "mode", "shape", "dtype", "provider", "mask", "ms", "p20-p80 ms", "GB/s", "%copy", "x ref",
            "x dropout", "saved B/el", "peak MB")
    lines = []
    for r in rows:
        lines.append((r["op"], r["mode"], r["shape"], r["dtype"], r["provider"], r["mask"], _fmt(r["ms"], ".3f"),
                      f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}", _fmt(r["gbps"], "sig"),
                      _fmt(None if r.get("frac_copy") is None else 100 * r["frac_copy"], ".0f"),
                      _fmt(r.get("speedup_vs_reference"), ".1f"), _fmt(r.get("speedup_vs_dropout"), ".2f"),
                      _fmt(r.get("saved_bytes_per_elem"), ".4f"), _fmt(r.get("peak_mb"), ".1f")))
    return text_table(head, lines, left=6)


def _key(r) -> tuple:
    # threads matter only for CPU timings
    return tuple("" if (c == "threads" and r.get("device_type") != "cpu") else str(r.get(c, ""))
                 for c in KEY_COLUMNS)


def compare_rows(old_rows, new_rows, threshold: float = 0.10):
    """(regressions, matched): rows whose ms grew by more than ``threshold`` on the same key
    (device, threads on CPU, op, mode, shape, dtype, provider, rates)."""
    old = {_key(r): float(r["ms"]) for r in old_rows if str(r.get("ms", "")) != ""}
    regressions, matched = [], 0
    for r in new_rows:
        k = _key(r)
        if k not in old or str(r.get("ms", "")) == "":
            continue
        matched += 1
        ratio = float(r["ms"]) / old[k]
        if ratio > 1 + threshold:
            regressions.append((r, old[k], ratio))
    return regressions, matched


def plot(rows, out_dir: Path) -> list:
    """One PNG per op: GB/s per provider per shape (log scale), the copy floor as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        sub = [r for r in rows if r["op"] == op]
        modes = list(dict.fromkeys(r["mode"] for r in sub))
        dtypes = list(dict.fromkeys(r["dtype"] for r in sub))
        shapes = list(dict.fromkeys(r["shape"] for r in sub))
        provs = [p for p in dict.fromkeys(label(r) for r in sub) if p != "clone"]
        fig, axes = plt.subplots(len(modes), len(dtypes), squeeze=False,
                                 figsize=(max(6, 1.6 * len(shapes) * len(dtypes) + 2), 3.2 * len(modes)))
        width = 0.8 / max(1, len(provs))
        for i, mode in enumerate(modes):
            for j, dt in enumerate(dtypes):
                ax = axes[i][j]
                cell = {(r["shape"], label(r)): r for r in sub if r["mode"] == mode and r["dtype"] == dt}
                for n, p in enumerate(provs):
                    xs = [s + n * width - 0.4 + width / 2 for s, sh in enumerate(shapes) if (sh, p) in cell]
                    ys = [cell[(sh, p)]["gbps"] for sh in shapes if (sh, p) in cell]
                    ax.bar(xs, ys, width, label=p, color=f"C{n}")
                for s, sh in enumerate(shapes):
                    if (sh, "clone") in cell:
                        ax.hlines(cell[(sh, "clone")]["gbps"], s - 0.45, s + 0.45, colors="k", linestyles="--",
                                  label="copy (clone)" if s == 0 else None)
                ax.set_xticks(range(len(shapes)), shapes, rotation=20, fontsize=8)
                ax.set_yscale("log")
                ax.set_ylabel("GB/s (op bytes / time)")
                ax.set_title(f"{op} targeting, {mode}, {dt}", fontsize=9)
        axes[0][0].legend(fontsize=7)
        r0 = sub[0]
        fig.suptitle(f"{r0['device_name']} ({r0['device_type']}, {r0['threads']} threads), torch {r0['torch']}, "
                     f"commit {r0['git_commit']}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"bench_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--step" in argv:  # whole training steps: td_kernels.tools.bench.step
        from . import step
        return step.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("slow_runs", "threads", "rep_ms", "cuda_runs", "rounds"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    known = td._registry.known_backends() + tuple(VARIANTS) + YARDSTICKS
    unknown = [x for x in args.providers or () if x not in known]
    if unknown:
        parser.error(f"--providers: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    if not (0 <= args.drop_rate <= 1 and 0 <= args.targ_rate <= 1):
        parser.error("--drop-rate and --targ-rate must be in [0, 1]")
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    csv_path = args.csv or (args.out / "bench.csv" if args.out else None)
    rows = run(args, on_progress=(lambda rows: write_csv(rows, csv_path, COLUMNS)) if csv_path else None)
    print(format_table(rows))
    print("# GB/s = bytes the op must move (td_kernels.tools.bench.ops.op_bytes) / median time; %copy = that / the "
          "clone's GB/s in this run; saved B/el = bytes kept for backward per element (weight excluded); "
          "peak MB = peak allocation of one fwd+bwd above its inputs"
          + (" (CPU: torch profiler allocator events)" if args.device.startswith("cpu") else ""))
    if csv_path:
        write_csv(rows, csv_path, COLUMNS)
        print(f"# wrote {csv_path}")
    if args.out and not args.no_plot and rows:
        args.out.mkdir(parents=True, exist_ok=True)
        for path in plot(rows, args.out):
            print(f"# wrote {path}")
    if args.compare:
        regressions, matched = compare_rows(read_csv(args.compare), rows, args.regression_threshold)
        print(f"# compared with {args.compare}: {matched} matching rows, {len(regressions)} regressions "
              f"(> {100 * args.regression_threshold:.0f}% slower)")
        for r, old_ms, ratio in regressions:
            print(f"REGRESSION {r['op']} {r['mode']} {r['shape']} {r['dtype']} {r['provider']}: "
                  f"{old_ms:.3f} -> {r['ms']:.3f} ms ({100 * (ratio - 1):+.0f}%)")
        if regressions and args.fail_on_regression:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
