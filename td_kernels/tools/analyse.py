"""``td-kernels analyse``: the paper's section 5.1 (Table 1 and Figure 1) on scikit-learn's digits.

The paper's toy network, one hidden layer of 10 ReLU units (here 64 -> 10 -> 10 on the 8x8
digits instead of CIFAR-10's 3072 -> 10 -> 10), is trained twice per seed with plain SGD
without momentum: unregularised, and with targeted weight dropout on the hidden layer
(gamma = 0.75 targeted, alpha = 0.5 dropped). The targeted layer is the hidden layer, the only
one besides the logits layer, which the paper neither regularises nor prunes (the library's
default ``exclude``, section 5): the analysis, the dropout and the pruning all act on its
64 x 10 = 640 weights. Then, in float64, over the test set: ``td.delta_e`` for pruning the
targeted 75% (the 48 smallest weights of every unit, eq. 2, exactly what ``td.prune_model``
removes), the accuracy unpruned and pruned (Table 1), and ``td.hessian_weight_matrix`` with the
important quarter first (Figure 1). ``--hvp-cost`` instead times one Hessian-vector product
against one backward pass for the demo's models and a GPT-2 small built from its config.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..analysis.second_order import _grad_and_hvp, _removed, delta_e, hessian_weight_matrix
from ..training.pruning import prune_model
from .bench.common import device_name, interleaved, median, text_table, write_csv
from .demo import MethodConfig, _accuracy, check_args, load_data, train

__all__ = ["METHODS", "make_model", "train_sgd", "analyse_model", "run_analyse", "AnalyseResult", "hvp_cost"]

HIDDEN = 10
GAMMA, ALPHA = 0.75, 0.5   # section 5.1: the 75% lowest-magnitude weights targeted, dropped at 50%
METHODS = {"none": "unregularised", "targeted": f"targeted weight dropout g={GAMMA} a={ALPHA}"}
# Table 1 of the paper (CIFAR-10, 3072 -> 10 -> 10, 200 epochs of SGD at lr 0.001)
PAPER = {"none": (0.120698, 38.11, 26.13), "targeted": (0.0145907, 40.09, 40.14)}
TEST_BATCH = 256           # the test set in batches (450 images: 256 + 194), weighted by size in E
TABLE_COLUMNS = ["method", "seed", "epochs", "train_loss", "test_loss", "gradient_term", "hessian_term", "estimate",
                 "actual", "accuracy", "pruned_accuracy", "removed", "targeted"]
BLOCKS = ("kept_kept", "kept_removed", "removed_removed")  # Figure 1's blocks: sums of theta_i H_ij theta_j


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def train_sgd(model: nn.Module, method: str, train_data, *, epochs: int, lr: float, batch_size: int, seed: int,
              progress=None) -> float:
    """Train with plain SGD (no momentum, no weight decay; the demo's loop), targeted weight
    dropout on the hidden layer for ``method="targeted"``; returns the final training loss (eval
    mode, all samples). The model comes back plain (targeting removed) and in eval mode."""
    config = MethodConfig(method, "weight", ALPHA, GAMMA) if method == "targeted" else MethodConfig(method)
    train(model, config, train_data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
          optimizer="sgd")
    with torch.no_grad():
        return nn.functional.cross_entropy(model(train_data[0]), train_data[1]).item()


def analyse_model(model: nn.Module, test_data) -> tuple[dict, torch.Tensor, int]:
    """Table 1's numbers for one trained model (float64, over the test set): ``(row, M, k)``
    with M Figure 1's matrix and k its number of kept (important) weights."""
    model = copy.deepcopy(model).double()
    X, y = test_data
    batches = [(X[i:i + TEST_BATCH].double(), y[i:i + TEST_BATCH]) for i in range(0, len(X), TEST_BATCH)]
    loss_fn = nn.CrossEntropyLoss()
    r = delta_e(model, loss_fn, batches, rate=GAMMA)
    pruned = copy.deepcopy(model)
    prune_model(pruned, GAMMA)
    M, _ = hessian_weight_matrix(model, loss_fn, batches, important=1 - GAMMA)
    k = r.targeted_weights - r.removed_weights
    row = {"test_loss": r.loss, "gradient_term": r.gradient_term, "hessian_term": r.hessian_term,
           "estimate": r.estimate, "actual": r.actual, "accuracy": _accuracy(model, X.double(), y),
           "pruned_accuracy": _accuracy(pruned, X.double(), y), "removed": r.removed_weights,
           "targeted": r.targeted_weights}
    return row, M, k


def _blocks(M: torch.Tensor, k: int) -> dict:
    return {"kept_kept": M[:k, :k].sum().item(), "kept_removed": 2 * M[:k, k:].sum().item(),
            "removed_removed": M[k:, k:].sum().item()}


@dataclass
class AnalyseResult:
    rows: list = field(default_factory=list)    # TABLE_COLUMNS per (method, seed)
    blocks: list = field(default_factory=list)  # method, seed and BLOCKS per (method, seed)
    matrices: dict = field(default_factory=dict)  # method -> (M, k) of the first seed: the figure
    seconds: float = 0.0

    def values(self, method: str, column: str) -> list:
        return [r[column] for r in self.rows if r["method"] == method]

    def cell(self, method: str, column: str, scale: float = 1.0, fmt: str = ".3g", std_fmt: str = ".2g") -> str:
        """Mean±std (sample standard deviation; 0 for one seed) of ``column`` over the seeds."""
        v = [scale * x for x in self.values(method, column)]
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.fmean(v):{fmt}}±{std:{std_fmt}}"


def format_table(result: AnalyseResult) -> str:
    """Table 1: |ΔE| (estimate and actual) and the accuracies, mean±std over the seeds, beside the paper's."""
    head = ["method", "|ΔE| estimate", "|ΔE| actual", "-∇Eᵀd", "½dᵀHd", "unpruned acc %", f"pruned {GAMMA:.0%} acc %",
            "paper |ΔE|", "paper acc %"]
    lines = []
    for m in METHODS:
        paper = PAPER[m]
        lines.append([m, result.cell(m, "estimate"), result.cell(m, "actual"), result.cell(m, "gradient_term"),
                      result.cell(m, "hessian_term"), result.cell(m, "accuracy", 100, ".1f", ".1f"),
                      result.cell(m, "pruned_accuracy", 100, ".1f", ".1f"), f"{paper[0]:.4g}", f"{paper[1]} -> {paper[2]}"])
    return text_table(head, lines, left=1)


def _plot(result: AnalyseResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import SymLogNorm

    mats = {m: result.matrices[m] for m in METHODS}
    vmax = max(M.abs().max().item() for M, _ in mats.values())
    # one symmetric scale for both panels; linear within 1/1000 of the largest entry, logarithmic
    # beyond, so that the many small entries and the few large ones both show
    norm = SymLogNorm(linthresh=vmax / 1e3, vmin=-vmax, vmax=vmax, base=10)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), constrained_layout=True)
    for ax, (m, (M, k)) in zip(axes, mats.items()):
        im = ax.imshow(M.float().cpu().numpy(), cmap="RdBu_r", norm=norm, interpolation="nearest")
        P = M.shape[0]
        for f in (ax.axhline, ax.axvline):
            f(k - 0.5, color="black", lw=0.8)
        ax.set_xticks([k / 2, (k + P) / 2], [f"kept {k}", f"pruned {P - k}"])
        ax.set_yticks([k / 2, (k + P) / 2], [f"kept {k}", f"pruned {P - k}"], rotation=90, va="center")
        b = _blocks(M, k)
        ax.set_title(f"{METHODS[m]}\nsum over pruned x pruned = {b['removed_removed']:.3g} (= dᵀHd)", fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="θᵢ Hᵢⱼ θⱼ (symmetric log scale)")
    fig.suptitle(f"Figure 1 on digits: θᵀ⊙H⊙θ of the hidden layer's {P} weights, the important {1 - GAMMA:.0%} "
                 "(largest per unit) first", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run_analyse(*, epochs: int = 200, lr: float = 0.05, batch_size: int = 32, seed: int = 0, seeds: int = 3,
                out: str | None = "analyse_out", device=None, progress: bool = True, log=None,
                threads: int | None = None) -> AnalyseResult:
    """Train both networks ``seeds`` times (training seeds ``seed``, ``seed + 1``, ...; the data
    split is ``seed``'s), analyse each, print Table 1 (mean±std) and write ``table1.txt``,
    ``table1.csv``, ``figure1.png`` (the first seed's matrices) and ``figure1.csv`` (every
    seed's block sums) into ``out``."""
    device, threads = check_args(epochs=epochs, device=device, backend="auto", methods=(), models=(),
                                 threads=threads, seeds=seeds)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    log = sys.stdout if log is None else log
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(epochs, lr, batch_size, seed, seeds, out, device, progress, log)
    finally:
        torch.set_num_threads(saved)


def _run(epochs, lr, batch_size, seed, seeds, out, device, progress, log) -> AnalyseResult:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    train_data, test_data = load_data(seed, device)
    result = AnalyseResult()
    steps = epochs * -(-len(train_data[0]) // batch_size) + 1  # SGD steps, then the analysis
    with tqdm(total=steps * len(METHODS) * seeds, file=sys.stderr, disable=not progress, unit="step",
              dynamic_ncols=True) as bar:
        for s in range(seed, seed + seeds):
            for m in METHODS:
                bar.set_description(f"{m} seed {s}: training")
                torch.manual_seed(s)  # the same initial weights for both methods
                model = make_model().to(device)
                train_loss = train_sgd(model, m, train_data, epochs=epochs, lr=lr, batch_size=batch_size, seed=s,
                                       progress=bar)
                bar.set_description(f"{m} seed {s}: ΔE and Hessian")
                row, M, k = analyse_model(model, test_data)
                bar.update(1)
                result.rows.append({"method": m, "seed": s, "epochs": epochs, "train_loss": train_loss, **row})
                result.blocks.append({"method": m, "seed": s, **_blocks(M, k)})
                if s == seed:
                    result.matrices[m] = (M, k)
    result.seconds = time.perf_counter() - start
    table = format_table(result)
    how = f"mean±std over {seeds} seeds" if seeds > 1 else "1 seed"
    text = (f"Table 1 on digits ({len(test_data[0])} test images, {how}): pruning the targeted {GAMMA:.0%} of the "
            f"hidden layer's weights\n(64 -> {HIDDEN} ReLU -> 10, SGD lr={lr} batch {batch_size} for {epochs} epochs; "
            f"paper: CIFAR-10, 200 epochs at lr 0.001)\n{table}")
    print("\n" + text, file=log)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        Path(out, "table1.txt").write_text(text + "\n")
        write_csv(result.rows, Path(out, "table1.csv"), TABLE_COLUMNS)
        write_csv(result.blocks, Path(out, "figure1.csv"), ["method", "seed", *BLOCKS])
        _plot(result, os.path.join(out, "figure1.png"))
        print(f"\nwrote table1.txt, table1.csv, figure1.png and figure1.csv into {out}", file=log)
    print(f"{len(METHODS) * seeds} networks trained and analysed in {result.seconds:.1f} s on {device} "
          f"({device_name(device)}, {torch.get_num_threads()} CPU threads)", file=log)
    return result


# ---- what a Hessian-vector product costs -------------------------------------------------------
def _cost_cases(device, gpt2: dict):
    """(name, model, loss_fn, batch) for the demo's models on a digits batch of 64 and a GPT-2
    (``GPT2Config(**gpt2)``, default GPT-2 small; random weights, nothing downloaded) on one
    sequence of 128 tokens."""
    from .demo import make_model as demo_model

    X = torch.rand(64, 1, 8, 8, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    cases = [(f"demo {name}", demo_model(name).to(device), nn.CrossEntropyLoss(), (X, y)) for name in ("mlp", "cnn")]
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(**gpt2)).to(device)
    ids = torch.randint(0, lm.config.vocab_size, (1, min(128, lm.config.n_positions)), device=device)
    cases.append(("GPT-2 small (config)" if not gpt2 else "GPT-2 (small config)", _Logits(lm), _lm_loss, (ids, ids)))
    return cases


class _Logits(nn.Module):
    """A transformers causal LM as ``inputs -> logits``, so that ``loss_fn(model(x), y)`` fits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids).logits


def _lm_loss(logits, ids):
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def hvp_cost(*, rounds: int = 5, device=None, log=None, out: str | None = None, gpt2: dict | None = None,
             threads: int | None = None) -> list:
    """Time, per model, one training step's forward + backward (the baseline), the
    Hessian-vector product :func:`td.delta_e` takes per batch (forward, gradient with its graph,
    second backward) and a whole ``delta_e`` on that batch (masks and the pruned forward too),
    as medians of ``rounds`` interleaved rounds; print and return the rows. ``gpt2``: GPT2Config
    arguments (default: none, GPT-2 small). ``threads``: as in :func:`run_analyse` (1 on CPU)."""
    device, threads = check_args(epochs=1, device=device, backend="auto", methods=(), models=(), threads=threads)
    log = sys.stdout if log is None else log
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _hvp_cost(rounds, device, log, out, gpt2)
    finally:
        torch.set_num_threads(saved)


def _hvp_cost(rounds, device, log, out, gpt2) -> list:
    rows = []
    for name, model, loss_fn, (x, y) in _cost_cases(device, gpt2 or {}):
        model.eval()
        targeted = list(_removed(model, "hvp_cost", GAMMA, "weight", "last_linear", None, None, "auto"))
        params = dict(model.named_parameters())
        d = [params[n].detach() for n in targeted]

        def backward():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()

        def hvp():  # what delta_e runs per batch: reverse over reverse
            with sdpa_kernel(SDPBackend.MATH):
                _grad_and_hvp(loss_fn(model(x), y), [params[n] for n in targeted], [d])

        def jvp_over_grad():  # torch.func's recipe, forward over reverse, for comparison
            def f(p):
                return loss_fn(functional_call(model, p, (x,)), y)

            with sdpa_kernel(SDPBackend.MATH):
                jvp(grad(f), ({n: params[n].detach() for n in targeted},), (dict(zip(targeted, d)),))

        def whole():
            delta_e(model, loss_fn, [(x, y)], rate=GAMMA)

        fns = {"backward": backward, "hvp": hvp, "jvp_over_grad": jvp_over_grad, "delta_e": whole}
        times = {k: [] for k in fns}
        for fn in fns.values():  # warm-up
            fn()
        for _, k in interleaved(list(fns), rounds):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
        ms = {k: 1e3 * median(v) for k, v in times.items()}
        rows.append({"model": name, "targeted_weights": sum(p.numel() for p in d), "backward_ms": ms["backward"],
                     "hvp_ms": ms["hvp"], "jvp_over_grad_ms": ms["jvp_over_grad"], "delta_e_ms": ms["delta_e"],
                     "hvp_over_backward": ms["hvp"] / ms["backward"]})
        model.zero_grad(set_to_none=True)
    head = ["model", "targeted weights", "fwd+bwd ms", "HVP ms", "HVP / (fwd+bwd)", "jvp(grad) ms", "delta_e ms"]
    lines = [[r["model"], f"{r['targeted_weights']:,}", f"{r['backward_ms']:.1f}", f"{r['hvp_ms']:.1f}",
              f"{r['hvp_over_backward']:.2f}", f"{r['jvp_over_grad_ms']:.1f}", f"{r['delta_e_ms']:.1f}"] for r in rows]
    text = (f"One Hessian-vector product as td.delta_e takes it (HVP: forward, gradient with its graph, double "
            f"backward) against one training forward+backward; jvp(grad): torch.func's forward-over-reverse product "
            f"for comparison; delta_e: the whole call on that batch. Medians of {rounds} interleaved rounds on "
            f"{device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
            + text_table(head, lines, left=1))
    print(text, file=log)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "hvp_cost.txt").write_text(text + "\n")
        write_csv(rows, Path(out, "hvp_cost.csv"), list(rows[0]))
    return rows
