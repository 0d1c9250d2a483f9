"""Inference latency of sparsity that buys speed: shrunk unit-pruned models (CPU) and 2:4
semi-structured linears (CUDA), each against its dense original measured in the same run.

    python -m td_kernels.tools.bench.inference                 # CPU: demo MLP and CNN, 50/70/80% units
    python -m td_kernels.tools.bench.inference --gpu           # also 2:4 vs dense linears (CUDA only)

CPU: the demo's MLP and CNN (``td_kernels.tools.demo.make_model``, seeded random weights: latency does
not depend on the values) are unit-pruned per layer with ``td.prune_model(mode="unit")`` at each
rate (every layer but the logits layer), shrunk with ``td.shrink_model``, and timed against the
dense original. The machine may be shared, so the variants are timed interleaved: every repeat
times each variant once (a block of calls lasting about ``--block-ms``) in a fresh random
order, and we report the median over repeats and the 25-75% spread, and the speed-up as the
median of the per-repeat ratios dense / shrunk (pairs taken close in time). Writes
``inference.csv``, ``inference.txt`` and ``inference.png`` under ``--out``.

GPU (``--gpu``, CUDA only): ``nn.Linear`` at LLM shapes (Llama-2-7B's 4096x4096, 11008x4096,
4096x11008) in float16, 2:4-pruned with ``td.prune_nm`` and converted with
``torch.sparse.to_sparse_semi_structured``, against the dense layer, at 1 to 4096 tokens, timed
with CUDA events (interleaved likewise). Writes ``inference_gpu.csv``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import random
import sys
import time
from pathlib import Path

import torch

import td_kernels as td
from ..demo import make_model
from .common import _quantile, device_name, git_commit

RATES = (0.5, 0.7, 0.8)
BATCHES = (1, 64, 512)
GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
GPU_TOKENS = (1, 16, 128, 1024, 4096)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _block(fn, block_s: float) -> int:
    """Calls per timed block so that a block lasts about ``block_s``."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < block_s / 4:
        fn()
        n += 1
    return max(1, 4 * n)


def time_interleaved(fns: dict, reps: int, block_s: float, seed: int = 0) -> dict:
    """{name: [seconds per call, one per repeat]}; each repeat runs every fn once, shuffled."""
    calls = {k: _block(f, block_s) for k, f in fns.items()}
    rng = random.Random(seed)
    out = {k: [] for k in fns}
    for _ in range(reps):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            f, n = fns[k], calls[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            out[k].append((time.perf_counter() - t0) / n)
    return out


def machine(threads: int) -> str:
    return (f"{device_name(torch.device('cpu'))}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{threads} thread(s), commit {git_commit()}")


def run_cpu(models, rates, batches, reps: int, block_s: float, threads: int, progress=print) -> list:
    torch.set_num_threads(threads)
    rows = []
    for name in models:
        torch.manual_seed(0)
        dense = make_model(name).eval()
        variants = {"dense": (dense, None, 0.0)}
        example = torch.rand(64, 1, 8, 8)
        for rate in rates:
            pruned = copy.deepcopy(dense)
            td.prune_model(pruned, rate, mode="unit")
            small, report = td.shrink_model(pruned, example)
            assert report.max_abs_diff <= 1e-4 * report.output_scale, report  # float32, see tests/test_shrink.py
            variants[f"shrunk {round(rate * 100)}%"] = (small, report, rate)
        for batch in batches:
            x = torch.rand(batch, 1, 8, 8)
            with torch.inference_mode():
                fns = {k: (lambda m=m: m(x)) for k, (m, _, _) in variants.items()}
                times = time_interleaved(fns, reps, block_s)
            base = times["dense"]
            for k, (m, report, rate) in variants.items():
                ts = [t * 1e6 for t in times[k]]
                ratio = [b / t for b, t in zip(base, times[k])]
                rows.append(dict(
                    model=name, batch=batch, variant=k, unit_prune_rate=rate, params=_params(m),
                    params_pct=round(100 * _params(m) / _params(dense), 1),
                    units_removed=report.removed_units if report else 0,
                    zero_units_left=sum(n for _, n, _ in report.left) if report else 0,
                    median_us=round(_quantile(ts, 0.5), 2), p25_us=round(_quantile(ts, 0.25), 2),
                    p75_us=round(_quantile(ts, 0.75), 2), speedup=round(_quantile(ratio, 0.5), 3),
                    speedup_p25=round(_quantile(ratio, 0.25), 3), speedup_p75=round(_quantile(ratio, 0.75), 3),
                    reps=reps, threads=threads))
            progress(f"  {name} batch {batch}: " + ", ".join(
                f"{r['variant']} {r['median_us']:.1f} us" for r in rows if r["model"] == name and r["batch"] == batch))
    return rows


def format_table(rows, header: str) -> str:
    cols = ("model", "batch", "variant", "params", "params_pct", "units_removed", "zero_units_left", "median_us",
            "p25_us", "p75_us", "speedup", "speedup_p25", "speedup_p75")
    table = [cols] + [tuple(str(r[c]) for c in cols) for r in rows]
    w = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(t)) for t in table]
    return "# " + header + "\n" + "\n".join(lines) + "\n"


def write_csv(rows, path: Path, header: str) -> None:
    with open(path, "w", newline="") as f:
        f.write("# " + header + "\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows, path: Path, header: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(4.2 * (len(models) + 1), 3.6), squeeze=False)
    for i, name in enumerate(models):
        ax = axes[0][i]
        for j, b in enumerate(batches):
            sub = [r for r in rows if r["model"] == name and r["batch"] == b and r["unit_prune_rate"] > 0]
            xs = [100 * r["unit_prune_rate"] for r in sub]
            ax.errorbar(xs, [r["speedup"] for r in sub],
                        yerr=[[r["speedup"] - r["speedup_p25"] for r in sub], [r["speedup_p75"] - r["speedup"] for r in sub]],
                        marker="o", capsize=3, label=f"batch {b}", color=f"C{j}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("units pruned per layer (%)")
        ax.set_ylabel("speed-up vs dense (median, 25-75%)")
        ax.set_title(f"demo {name}: shrunk vs dense", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for i, name in enumerate(models):
        sub = [r for r in rows if r["model"] == name and r["batch"] == batches[0]]
        ax.plot([100 * r["unit_prune_rate"] for r in sub], [r["params_pct"] for r in sub], marker="o", label=name)
    ax.set_xlabel("units pruned per layer (%)")
    ax.set_ylabel("parameters left (% of dense)")
    ax.set_title("parameter count", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(header, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_gpu(shapes, tokens, reps: int, progress=print) -> list:
    """2:4 semi-structured vs dense nn.Linear, float16, CUDA events; [] if it cannot run."""
    why = td.sparse.semi_structured_unsupported("cuda") if torch.cuda.is_available() else "CUDA is not available"
    if why:
        progress(f"GPU section skipped: {why}")
        return []
    from torch.sparse import to_sparse_semi_structured

    rows = []
    dev = torch.device("cuda")
    for out_f, in_f in shapes:
        lin = torch.nn.Linear(in_f, out_f, bias=False, device=dev, dtype=torch.float16).eval()
        with torch.no_grad():
            lin.weight.copy_(td.prune_nm(lin.weight, n=2, m=4))
        sp = copy.deepcopy(lin)
        sp.weight = torch.nn.Parameter(to_sparse_semi_structured(sp.weight.detach()), requires_grad=False)
        for n_tok in tokens:
            x = torch.randn(n_tok, in_f, device=dev, dtype=torch.float16)
            with torch.inference_mode():
                err = (sp(x) - lin(x)).abs().max().item()
                ms = {"dense": [], "2:4": []}
                for _ in range(reps):
                    for k in random.sample(list(ms), 2):
                        f = lin if k == "dense" else sp
                        f(x)
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        for _ in range(10):
                            f(x)
                        b.record()
                        torch.cuda.synchronize()
                        ms[k].append(a.elapsed_time(b) / 10)
            ratio = [d / s for d, s in zip(ms["dense"], ms["2:4"])]
            rows.append(dict(device=torch.cuda.get_device_name(dev), weight=f"{out_f}x{in_f}", tokens=n_tok,
                             dtype="float16", dense_ms=round(_quantile(ms["dense"], 0.5), 4),
                             sparse_ms=round(_quantile(ms["2:4"], 0.5), 4), speedup=round(_quantile(ratio, 0.5), 3),
                             speedup_p25=round(_quantile(ratio, 0.25), 3), speedup_p75=round(_quantile(ratio, 0.75), 3),
                             max_abs_diff=err, reps=reps, torch=torch.__version__))
            progress(f"  {out_f}x{in_f} tokens {n_tok}: dense {rows[-1]['dense_ms']} ms, "
                     f"2:4 {rows[-1]['sparse_ms']} ms, x{rows[-1]['speedup']}")
    return rows


def _csv_list(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m td_kernels.tools.bench.inference", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/cpu", help="output directory (default: bench/results/cpu)")
    p.add_argument("--models", type=_csv_list(str), default=("mlp", "cnn"))
    p.add_argument("--rates", type=_csv_list(float), default=RATES, help="unit prune rates (default: 0.5,0.7,0.8)")
    p.add_argument("--batches", type=_csv_list(int), default=BATCHES, help="batch sizes (default: 1,64,512)")
    p.add_argument("--reps", type=int, default=21, help="interleaved repeats (default: 21)")
    p.add_argument("--block-ms", type=float, default=20.0, help="length of one timed block of calls (default: 20)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--gpu", action="store_true", help="also run the CUDA 2:4 section (needs sm_8x/sm_9x)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    args = p.parse_args(argv)
    for name, v in (("--reps", args.reps), ("--threads", args.threads)):
        if v < 1:
            p.error(f"{name} must be >= 1")
    if any(not 0 < r < 1 for r in args.rates):
        p.error("--rates must lie in (0, 1)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_cpu:
        header = machine(args.threads) + f"; {args.reps} interleaved repeats of ~{args.block_ms:g} ms blocks"
        print(header)
        rows = run_cpu(args.models, args.rates, args.batches, args.reps, args.block_ms / 1e3, args.threads)
        write_csv(rows, out / "inference.csv", header)
        (out / "inference.txt").write_text(format_table(rows, header))
        plot(rows, out / "inference.png", header)
        print(format_table(rows, header))
    if args.gpu:
        rows = run_gpu(GPU_SHAPES, GPU_TOKENS, max(5, args.reps))
        if rows:
            write_csv(rows, out / "inference_gpu.csv", f"{rows[0]['device']}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
