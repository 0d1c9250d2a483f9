"""The training-step benchmark: ``td-kernels bench --step``.

Op benchmarks (``td_kernels.tools.bench.ops``) time one op on one weight; a user pays for whole
training steps. This times forward + backward + optimizer step of real models under each
regulariser, and prints each one's cost over the unregularised step:

models    ``mlp-b32`` / ``mlp-b256``: an MLP 1024-4096-4096-1024-10 at batch 32 / 256;
          ``cnn``: the demo's CNN (td_kernels.tools.demo) on 8x8 images, batch 64;
          ``llama-block``: one Llama-style decoder block built from code (RMSNorm, attention with
          4 nn.Linear projections and SDPA, a SwiGLU MLP of 3 nn.Linear), hidden 1024 and 256
          tokens on a CPU, hidden 4096 and 8192 tokens on a GPU.
variants  ``none``; ``dropout``: F.dropout (p=0.5) on the hidden activations; ``td-weight``:
          targeted weight dropout (drop 0.5, targ 0.5) with the default mask format, and
          ``td-weight-recompute`` with the mask rebuilt in the backward; ``td-unit``: targeted
          unit dropout on the weight, ``td-unit-output``: the same on the layer's output
          (``apply_to="output"``); ``td-nm``: 2:4 targeted dropout (drop 0.5); ``kthvalue``: the
          hand-written composite (abs, kthvalue per row, torch.rand, masked_fill) on the same
          layers. Every targeted layer is every nn.Linear / nn.Conv2d but the logits layer.
Timing: CPU ``torch.utils.benchmark.Timer.blocked_autorange`` at the stated thread count; CUDA
``triton.testing.do_bench`` (L2 flushed). Each model's variants are timed in one run, in
``--rounds`` interleaved rounds (3 on a CPU, 1 on CUDA): each ratio is the median over the rounds
of the variant's time over the unregularised step's in the same round, and ms (p20, p80) the
median of the rounds' medians (p20s, p80s). On a shared VM whose speed drifts by tens of percent
over a minute, back-to-back timing alone had put a variant 10% below the unregularised step.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import td_kernels as td
from . import common as bench

__all__ = ["MODELS", "VARIANTS", "build", "run", "main"]

MODELS = ("mlp-b32", "mlp-b256", "cnn", "llama-block")
VARIANTS = ("none", "dropout", "td-weight", "td-weight-recompute", "td-unit", "td-unit-output", "td-nm", "kthvalue")
COLUMNS = ("device_name", "device_type", "threads", "torch", "git_commit", "model", "variant", "ms", "ms_p20",
           "ms_p80", "overhead", "rounds", "params")
P = 0.5  # drop_rate and targ_rate of every regulariser, and dropout's p


class MLP(nn.Module):
    def __init__(self, sizes=(1024, 4096, 4096, 1024, 10), p: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.p = p

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.dropout(F.relu(layer(x)), self.p, self.training) if self.p else F.relu(layer(x))
        return self.layers[-1](x)


class CNN(nn.Module):
    """td_kernels.tools.demo's CNN, with dropout on the hidden activations when p > 0."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.f1, self.f2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)
        self.p = p

    def forward(self, x):
        d = (lambda t: F.dropout(t, self.p, self.training)) if self.p else (lambda t: t)
        x = d(F.relu(self.c2(d(F.relu(self.c1(x))))))
        return self.f2(d(F.relu(self.f1(F.max_pool2d(x, 2).flatten(1)))))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class LlamaBlock(nn.Module):
    """One pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.)); causal SDPA."""

    def __init__(self, d: int, heads: int, hidden: int, p: float = 0.0):
        super().__init__()
        self.heads, self.p = heads, p
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        h = self.n1(x)
        q, k, v = (p(h).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + F.dropout(self.o_proj(a), self.p, self.training)
        h = F.silu(self.gate_proj(self.n2(x))) * self.up_proj(self.n2(x))
        return x + self.down_proj(F.dropout(h, self.p, self.training))


@dataclass
class Case:
    model: nn.Module
    inputs: torch.Tensor
    loss: Callable
    exclude: object  # apply_targeted_dropout's exclude


def build(name: str, variant: str, device, dtype=torch.float32, gpu_sizes: bool = False) -> Case:
    """The model ``name`` with regulariser ``variant`` applied, its inputs and its loss."""
    gen = torch.Generator().manual_seed(0)
    p = P if variant == "dropout" else 0.0
    torch.manual_seed(0)
    if name.startswith("mlp"):
        batch = int(name.split("-b")[1])
        model, x = MLP(p=p), torch.randn(batch, 1024, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        loss, exclude = (lambda out: F.cross_entropy(out, y.to(out.device))), td.nn.LAST_LINEAR
    elif name == "cnn":
        model, x = CNN(p=p), torch.randn(64, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (64,), generator=gen)
        loss, exclude = (lambda out: F.cross_entropy(out, y.to(out.device))), td.nn.LAST_LINEAR
    elif name == "llama-block":
        d, heads, hidden, tokens = (4096, 32, 11008, 8192) if gpu_sizes else (1024, 16, 2816, 256)
        with torch.device(device):  # 202M parameters initialised on the host took ~1.6 s per build
            model = LlamaBlock(d, heads, hidden, p=p)
        x = torch.randn(1, tokens, d, generator=gen)
        loss, exclude = (lambda out: out.float().pow(2).mean()), ()  # no logits layer: every projection
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    model = model.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    _regularise(model, variant, exclude)
    return Case(model.train(), x, loss, exclude)


def _composite_forward(layer, x):
    w = bench._kthvalue_weight(layer.weight, P, P)
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, layer.bias)
    return layer._conv_forward(x, w, layer.bias)


def _regularise(model: nn.Module, variant: str, exclude) -> None:
    if variant in ("none", "dropout"):
        return
    if variant == "kthvalue":
        for _, layer in td.nn.prunable_layers(model, exclude):
            layer.forward = _composite_forward.__get__(layer)
        return
    kwargs = dict(exclude=exclude)
    if variant == "td-weight":
        td.apply_targeted_dropout(model, P, P, "weight", **kwargs)
    elif variant == "td-weight-recompute":
        td.apply_targeted_dropout(model, P, P, "weight", mask="recompute", **kwargs)
    elif variant == "td-unit":
        td.apply_targeted_dropout(model, P, P, "unit", **kwargs)
    elif variant == "td-unit-output":
        td.apply_targeted_dropout(model, P, P, "unit", apply_to="output", **kwargs)
    elif variant == "td-nm":
        td.apply_targeted_dropout(model, P, mode="nm", n=2, m=4, **kwargs)
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def step_fn(case: Case) -> Callable:
    opt = torch.optim.SGD(case.model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        case.loss(case.model(case.inputs)).backward()
        opt.step()
    return step


def run(args, on_progress: Callable[[list], None] | None = None) -> list:
    """Time every model and variant ``args`` selects; ``on_progress(rows)`` after each model."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(device_name=bench.device_name(device), device_type=device.type, threads=torch.get_num_threads(),
                  torch=torch.__version__, git_commit=bench.git_commit())
    print(f"# training steps on {common['device_name']} ({device}), torch {common['torch']}, "
          f"{common['threads']} threads, commit {common['git_commit']}")
    rounds = args.rounds or (1 if device.type == "cuda" else 3)
    rows = []
    for name in args.models:
        times, params = {v: [] for v in args.variants}, {}
        # one model alive at a time, rebuilt per round (the same seeded model each time)
        for _, variant in bench.interleaved(list(args.variants), rounds):
            with warnings.catch_warnings():  # N:M skips layers whose fan-in 4 does not divide: expected
                warnings.simplefilter("ignore")
                case = build(name, variant, device, gpu_sizes=device.type == "cuda")
            params[variant] = sum(p.numel() for p in case.model.parameters())
            fn = step_fn(case)
            fn()  # warm-up: allocations, optimizer state
            times[variant].append(bench.time_fn(fn, device, args))
            del case, fn
        for variant in args.variants:
            t = times[variant]
            ratio = bench.median([a.ms / b.ms for a, b in zip(t, times["none"])])
            ms = bench.median([x.ms for x in t])
            rows.append(dict(common, model=name, variant=variant, ms=ms, ms_p20=bench.median([x.p20 for x in t]),
                             ms_p80=bench.median([x.p80 for x in t]), overhead=ratio, rounds=rounds,
                             params=params[variant]))
            print(f"# {name:12s} {variant:20s} {ms:9.2f} ms  {ratio:5.2f}x", file=sys.stderr, flush=True)
        if on_progress is not None:
            on_progress(rows)
    return rows


def format_table(rows) -> str:
    head = ("model", "variant", "ms/step", "p20-p80", "x none")
    lines = [(r["model"], r["variant"], f"{r['ms']:.2f}", f"{r['ms_p20']:.2f}-{r['ms_p80']:.2f}",
              "" if r["overhead"] is None else f"{r['overhead']:.2f}x") for r in rows]
    return bench.text_table(head, lines, left=2)


def plot(rows, path: Path) -> Path:
    """One bar group per model: each variant's step time over the unregularised step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    cell = {(r["model"], r["variant"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(1.9 * len(models) + 4.5, 4))
    width = 0.8 / max(1, len(variants))
    for n, v in enumerate(variants):
        xs = [i + n * width - 0.4 + width / 2 for i, m in enumerate(models) if (m, v) in cell]
        ys = [cell[(m, v)]["overhead"] for m in models if (m, v) in cell]
        bars = ax.bar(xs, ys, width, label=v, color=f"C{n}")
        ax.bar_label(bars, [f"{y:.2f}" for y in ys], fontsize=6, rotation=90, padding=2)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, 1.2 * max(r["overhead"] for r in rows if r["overhead"] is not None))
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("step time / unregularised step")
    r0 = rows[0]
    ax.set_title(f"training step (forward, backward, SGD) over the unregularised one\n{r0['device_name']} "
                 f"({r0['device_type']}, {r0['threads']} threads), torch {r0['torch']}", fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="td-kernels bench --step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--step", action="store_true", help="(the flag that selects this benchmark)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", type=bench._csv_list(MODELS), default=list(MODELS))
    p.add_argument("--variants", type=bench._csv_list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per model; ratios are medians of per-round ratios (default 3 on CPU, 1 on CUDA)")
    p.add_argument("--min-time", type=float, default=0.5, help="CPU: blocked_autorange min_run_time per round, s")
    p.add_argument("--slow-call-s", type=float, default=1.0, help="CPU: steps slower than this get --slow-runs calls")
    p.add_argument("--slow-runs", type=int, default=5)
    p.add_argument("--warmup-ms", type=int, default=25, help="CUDA: do_bench warmup")
    p.add_argument("--rep-ms", type=int, default=200, help="CUDA: do_bench rep")
    p.add_argument("--cuda-runs", type=int, default=20, help="CUDA without Triton: timed runs")
    p.add_argument("--out", type=Path, default=None, help="directory for step.csv and step.png")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if "none" not in args.variants:
        args.variants = ["none"] + list(args.variants)  # the baseline every ratio needs
    csv_path = args.out / "step.csv" if args.out else None
    # the CSV is rewritten after each model: a run cut short keeps the models it finished
    rows = run(args, on_progress=(lambda rows: bench.write_csv(rows, csv_path, COLUMNS)) if csv_path else None)
    print(format_table(rows))
    if csv_path and rows:
        print(f"# wrote {csv_path}, {plot(rows, args.out / 'step.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
