"""Native CPU kernels vs the reference and torch dropout (torch.utils.benchmark).

    .venv/bin/python bench/native_cpu.py [--threads N] [--size 4096] [--quick]

Prints median times on one float32 weight [size, size], drop_rate 0.5, targ_rate 0.5.
"""
import argparse

import torch
import torch.utils.benchmark as benchmark

import td_kernels  # noqa: F401  (registers the backends)
from td_kernels import native, reference


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="skip the (slow) reference")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    dt = getattr(torch, args.dtype)
    w = torch.randn(args.size, args.size).to(dt)
    g = torch.randn_like(w)
    k, D = reference.count(0.5, w.shape[1]), reference.drop_threshold(0.5)
    _, limit = native.weight_dropout(w, 1, k, D)
    wr = w.clone().requires_grad_()
    y = torch.nn.functional.dropout(wr, 0.5, training=True)
    cases = {
        "native weight_dropout": "native.weight_dropout(w, 1, k, D)",
        "native weight_dropout_backward": "native.weight_dropout_backward(g, w, limit, 1, D)",
        "native unit_dropout": "native.unit_dropout(w, 1, k, D)",
        "torch dropout (forward)": "torch.nn.functional.dropout(w, 0.5, training=True)",
        "torch dropout (backward)": "torch.autograd.grad(y, wr, g, retain_graph=True)",
    }
    if not args.quick:
        cases["reference weight_dropout"] = "reference.weight_dropout(w, 1, k, D)"
    env = dict(native=native, reference=reference, torch=torch, w=w, g=g, k=k, D=D, limit=limit, y=y, wr=wr)
    times = {}
    print(f"{args.dtype} [{args.size}, {args.size}], {args.threads} thread(s), "
          f"torch {torch.__version__}")
    for name, stmt in cases.items():
        t = benchmark.Timer(stmt, globals=env, num_threads=args.threads, label=name)
        m = t.blocked_autorange(min_run_time=args.min_run_time if "reference" not in name else 0.1)
        times[name] = m.median
        print(f"  {name:34s} {m.median * 1e3:9.2f} ms  (IQR {m.iqr * 1e3:.2f} ms, {len(m.times)} runs)")
    nf = times["native weight_dropout"]
    print(f"  forward: {times['torch dropout (forward)'] / nf:.1f}x faster than torch dropout", end="")
    if "reference weight_dropout" in times:
        print(f", {times['reference weight_dropout'] / nf:.0f}x faster than the reference", end="")
    print(f"\n  backward: {times['torch dropout (backward)'] / times['native weight_dropout_backward']:.1f}x "
          "faster than torch dropout's backward")


if __name__ == "__main__":
    main()
