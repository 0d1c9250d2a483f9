"""The demo: the shape of the paper's Table 2 on scikit-learn's 8x8 digits, in minutes on a CPU.

Trains a small MLP, a small CNN and a small BatchNorm ResNet (the paper's family) with each
regularisation method, then magnitude-prunes every
weight layer except the logits layer (``td.prune_model``) at 0%, 10%, ..., 90%, per unit's
weights (weight pruning, eq. 2) and whole units (unit pruning, eq. 1), and to the 2:4 pattern
(N:M pruning, SPEC section 11), and reports the test accuracy: mean and standard deviation over
``seeds`` training runs (initial weights, data order and dropout draws; the same data split),
marking where a method differs from the unregularised network by more than the spread. The
ResNet is evaluated twice: with BatchNorm's running statistics as training left them and
recalibrated after pruning (``td.recalibrate_batchnorm`` on the training images): training under
targeted dropout (or any pruning) leaves statistics that do not fit the network evaluated. Run it
with ``td-kernels demo`` or ``python -m td_kernels demo``.
"""
from __future__ import annotations

import copy
import csv
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..training.batchnorm import batchnorm_modules
from ..training.nn import apply_targeted_dropout, prunable_layers, remove_targeted_dropout
from ..training.pruning import prune_model
from ..training.schedules import RampSchedule

__all__ = ["METHODS", "DEFAULT_METHODS", "MODELS", "BN_STATS", "PRUNE_RATES", "MethodConfig", "DemoResult", "run_demo",
           "check_args", "methods_for", "MODEL_METHODS", "make_model", "load_data", "train", "evaluate_pruning", "format_table", "format_nm_table",
           "format_bn_table"]

PRUNE_RATES = tuple(i / 10 for i in range(10))
PRUNE_MODES = ("weight", "unit")
NM = (2, 4)      # the N:M pattern of the N:M method and of N:M pruning (what sparse tensor cores run)
NM_MODE = "nm"   # prune_mode of the N:M rows; their prune_rate is the pattern's fraction, 1 - n/m


@dataclass(frozen=True)
class MethodConfig:
    label: str
    # "weight" / "unit" / "nm": targeted dropout of that mode (nm: the NM pattern, no targ_rate);
    # "dropout": standard weight dropout (dropconnect) at drop_rate; None: no regularisation
    mode: str | None = None
    drop_rate: float = 0.0      # alpha
    targ_rate: float = 0.0      # gamma
    ramp: bool = False          # ramp the rates over the first RAMP_FRACTION of training (section 5.5)


# Settings from the paper's Table 2: targeted weight dropout alpha=0.75, gamma=0.9 (its best
# column at 80-90% weight pruning: target about as much as you will prune), targeted unit
# dropout alpha=0.66, gamma=0.75; standard dropout drops the same expected number of weights as
# targeted weight dropout, rate gamma*alpha (section 5); ramping as in Table 6, alpha=0.99,
# gamma=0.9. "ramp_unit" (not run by default) is the unit-mode ramp. Targeted 2:4 dropout (not
# in the paper: SPEC section 11) drops each of the 2 smallest weights of every group of 4 with
# alpha=0.75, the weight method's alpha.
W_ALPHA, W_GAMMA = 0.75, 0.9
U_ALPHA, U_GAMMA = 0.66, 0.75
METHODS = {
    "none": MethodConfig("none"),
    "dropout": MethodConfig(f"weight dropout p={W_GAMMA * W_ALPHA:.3g}", "dropout", W_GAMMA * W_ALPHA),
    "targeted_weight": MethodConfig(f"targeted weight a={W_ALPHA} g={W_GAMMA}", "weight", W_ALPHA, W_GAMMA),
    "targeted_unit": MethodConfig(f"targeted unit a={U_ALPHA} g={U_GAMMA}", "unit", U_ALPHA, U_GAMMA),
    "ramp": MethodConfig("ramp targeted weight a=0.99 g=0.9", "weight", 0.99, 0.9, ramp=True),
    "ramp_unit": MethodConfig("ramp targeted unit a=0.99 g=0.9", "unit", 0.99, 0.9, ramp=True),
    "targeted_nm": MethodConfig(f"targeted {NM[0]}:{NM[1]} a={W_ALPHA}", "nm", W_ALPHA),
}
DEFAULT_METHODS = ("none", "dropout", "targeted_weight", "targeted_unit", "ramp", "targeted_nm")
# the ResNet trains about twice as long as the CNN per run: by default it runs the paper's main
# comparison only, to keep the default demo short; --methods runs any method on any model
MODEL_METHODS = {"resnet": ("none", "targeted_weight", "targeted_unit")}
RAMP_FRACTION = 0.6  # ramp over the first 60% of the steps, then train at the final rates


class _WeightDropout(nn.Module):
    """Standard weight dropout (dropconnect) as the authors' baseline ran it: each weight
    dropped with probability p and the rest scaled by 1/(1-p) (``tf.nn.dropout``)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, w):
        return nn.functional.dropout(w, self.p, self.training)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


class _Block(nn.Module):
    """A ResNet basic block (conv-BN-ReLU-conv-BN, plus the input or a 1x1 conv-BN shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def _resnet() -> nn.Module:
    """The paper's family (ResNet-32, WRN: BatchNorm everywhere) at the digits' scale and the
    demo's budget: a stem and one downsampling basic block, 15k parameters."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         _Block(16, 32, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


MODELS = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet}
# the BatchNorm statistics a model with BatchNorm is evaluated with (models without: "")
BN_STATS = ("recalibrated", "as trained")


def make_model(name: str) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"models must name {', '.join(MODELS)}; got {name!r}")
    return MODELS[name]()


def load_data(seed: int, device) -> tuple:
    """scikit-learn's 8x8 digits (bundled, no download) as [N, 1, 8, 8] in [0, 1]; 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)

    def t(a, b):
        return (torch.tensor(a, dtype=torch.float32).view(-1, 1, 8, 8).div_(16).to(device),
                torch.tensor(b, dtype=torch.long).to(device))
    return t(Xtr, ytr), t(Xte, yte)


@torch.no_grad()
def _accuracy(model: nn.Module, X, y) -> float:
    model.eval()
    return (model(X).argmax(1) == y).float().mean().item()


def train(model: nn.Module, method: MethodConfig, train_data, *, epochs: int, batch_size: int = 64, lr: float = 2e-3,
          seed: int = 0, backend: str = "auto", progress=None, optimizer: str = "adam") -> nn.Module:
    """Train ``model`` with ``method`` and Adam (``optimizer="sgd"``: plain SGD, no momentum, as
    the paper's section 5.1); returns it with plain weights (targeting removed)."""
    X, y = train_data
    torch.manual_seed(seed)
    if method.mode == "dropout":
        for _, layer in prunable_layers(model):
            parametrize.register_parametrization(layer, "weight", _WeightDropout(method.drop_rate), unsafe=True)
    elif method.mode is not None:
        with warnings.catch_warnings():
            # the ResNet's BatchNorm warning: evaluate_pruning(recalibrate=...) answers it
            warnings.filterwarnings("ignore", message="model has BatchNorm")
            if method.mode == "nm":  # the first conv (fan-in 9) has no 4-groups: it stays dense
                warnings.filterwarnings("ignore", message="apply_targeted_dropout skips")
                apply_targeted_dropout(model, method.drop_rate, mode="nm", n=NM[0], m=NM[1], backend=backend)
            else:
                apply_targeted_dropout(model, method.drop_rate, method.targ_rate, method.mode, backend=backend)
    steps_per_epoch = -(-len(X) // batch_size)
    schedule = RampSchedule(model, max(1, round(RAMP_FRACTION * epochs * steps_per_epoch))) if method.ramp else None
    opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer](model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X)).to(X.device)  # CPU generator: same order on every device
        for i in range(0, len(X), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            if progress is not None:
                progress.update(1)
    remove_targeted_dropout(model)
    for _, layer in prunable_layers(model):
        if parametrize.is_parametrized(layer, "weight"):  # the dropout baseline
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    return model.eval()


def evaluate_pruning(model: nn.Module, test_data, *, rates=PRUNE_RATES, modes=PRUNE_MODES + (NM_MODE,),
                     backend="auto", recalibrate=None) -> dict:
    """{(prune_mode, rate): test accuracy} of ``model`` pruned per unit at each rate, and for
    ``"nm"`` pruned to the 2:4 pattern (key ``("nm", 0.5)``; layers whose fan-in 4 does not
    divide stay dense). ``recalibrate``: batches over which BatchNorm's statistics are recomputed
    after pruning (``prune_model(..., recalibrate=...)``); None keeps the trained ones."""
    out = {}
    for mode in modes:
        if mode == NM_MODE:
            pruned = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prune_model(pruned, mode="nm", n=NM[0], m=NM[1], backend=backend, recalibrate=recalibrate)
            out[(mode, 1 - NM[0] / NM[1])] = _accuracy(pruned, *test_data)
            continue
        for rate in rates:
            pruned = copy.deepcopy(model)
            prune_model(pruned, rate, mode, backend=backend, recalibrate=recalibrate)
            out[(mode, rate)] = _accuracy(pruned, *test_data)
    return out


@dataclass
class DemoResult:
    # rows: dicts with model, method, prune_mode, prune_rate, seed, accuracy (one per training run)
    # and bn_stats (one of BN_STATS for a model with BatchNorm, "" without)
    rows: list = field(default_factory=list)
    seconds: float = 0.0
    csv_path: str | None = None
    png_path: str | None = None

    def accuracies(self, model: str, method: str, prune_mode: str, rate: float, bn_stats: str | None = None) -> list:
        """The accuracy of every seed's run, in seed order; ``bn_stats`` None: recalibrated
        BatchNorm statistics where the model has BatchNorm (the way to evaluate it)."""
        want = ("", BN_STATS[0]) if bn_stats is None else (bn_stats,)
        got = [r["accuracy"] for r in self.rows if (r["model"], r["method"], r["prune_mode"]) ==
               (model, method, prune_mode) and abs(r["prune_rate"] - rate) < 1e-9 and r.get("bn_stats", "") in want]
        if not got:
            raise KeyError((model, method, prune_mode, rate, bn_stats))
        return got

    def accuracy(self, model: str, method: str, prune_mode: str, rate: float, bn_stats: str | None = None) -> float:
        """Mean accuracy over the seeds."""
        return statistics.fmean(self.accuracies(model, method, prune_mode, rate, bn_stats))

    def std(self, model: str, method: str, prune_mode: str, rate: float, bn_stats: str | None = None) -> float:
        """Sample standard deviation over the seeds (0 for one seed)."""
        acc = self.accuracies(model, method, prune_mode, rate, bn_stats)
        return statistics.stdev(acc) if len(acc) > 1 else 0.0

    def mark(self, model: str, method: str, prune_mode: str, rate: float, baseline: str = "none",
             bn_stats: str | None = None) -> str:
        """"+" / "-" where ``method``'s mean is above / below the baseline's by more than the
        spread (the two standard deviations added); "" otherwise, and with a single seed."""
        if method == baseline or len(self.accuracies(model, method, prune_mode, rate, bn_stats)) < 2:
            return ""
        try:
            diff = (self.accuracy(model, method, prune_mode, rate, bn_stats)
                    - self.accuracy(model, baseline, prune_mode, rate, bn_stats))
        except KeyError:  # the baseline was not run
            return ""
        spread = self.std(model, method, prune_mode, rate, bn_stats) + self.std(model, baseline, prune_mode, rate,
                                                                                bn_stats)
        return "" if abs(diff) <= spread else ("+" if diff > 0 else "-")

    def cell(self, model: str, method: str, prune_mode: str, rate: float, bn_stats: str | None = None) -> str:
        mean = 100 * self.accuracy(model, method, prune_mode, rate, bn_stats)
        std = 100 * self.std(model, method, prune_mode, rate, bn_stats)
        return f"{mean:.1f}±{std:.1f}{self.mark(model, method, prune_mode, rate, bn_stats=bn_stats) or ' '}"


def _layout(lines, first_left: bool = False) -> str:
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if first_left and i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in lines)


def format_table(result: DemoResult, model: str, prune_mode: str, methods) -> str:
    """Table 2's layout: one row per prune percentage, one column per method (accuracy %,
    mean±std over the seeds, "+"/"-" where it beats / trails "none" by more than the spread)."""
    lines = [["prune"] + list(methods)]
    for rate in PRUNE_RATES:
        lines.append([f"{rate:.0%}"] + [result.cell(model, m, prune_mode, rate) for m in methods])
    return _layout(lines)


def format_nm_table(result: DemoResult, model: str, methods) -> str:
    """One row per method: accuracy unpruned and after N:M (2:4) pruning."""
    lines = [["method", "unpruned", f"{NM[0]}:{NM[1]} pruned"]]
    for m in methods:
        lines.append([m, result.cell(model, m, "weight", 0.0), result.cell(model, m, NM_MODE, 1 - NM[0] / NM[1])])
    return _layout(lines, first_left=True)


# the columns of the BatchNorm table: unpruned, weight pruning, unit pruning, 2:4; "as trained"
# is evaluated at these points only (recalibrated at every rate)
BN_COLUMNS = (("weight", 0.0), ("weight", 0.5), ("weight", 0.9), ("unit", 0.5), ("unit", 0.7), (NM_MODE, 0.5))
AS_TRAINED_RATES = (0.0, 0.5, 0.7, 0.9)
RECALIBRATION_IMAGES = 256  # training images BatchNorm's statistics are recomputed on (one batch)


def format_bn_table(result: DemoResult, model: str, methods) -> str:
    """Per method, accuracy with BatchNorm's statistics as trained and recalibrated after
    pruning, unpruned and at a few pruning points (mean±std over the seeds)."""
    head = {"weight": "w", "unit": "u", NM_MODE: ""}
    lines = [["method", "BN statistics"] + ["unpruned" if r == 0 else f"{NM[0]}:{NM[1]}" if mode == NM_MODE
                                            else f"{r:.0%} {head[mode]}" for mode, r in BN_COLUMNS]]
    for m in methods:
        for bn in BN_STATS[::-1]:
            lines.append([m, bn] + [result.cell(model, m, mode, r, bn) for mode, r in BN_COLUMNS])
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in lines)


def _write_csv(result: DemoResult, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "method", "prune_mode", "prune_rate", "seed", "accuracy", "bn_stats"])
        w.writeheader()
        w.writerows(result.rows)


def _plot(result: DemoResult, path: str, runs: dict) -> None:
    """One row of plots per model of ``runs`` ({model: its methods})."""
    models = list(runs)
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(PRUNE_MODES), figsize=(5.5 * len(PRUNE_MODES), 3.8 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        for j, mode in enumerate(PRUNE_MODES):
            ax = axes[i][j]
            x = [100 * r for r in PRUNE_RATES]
            for m in runs[model]:
                acc = [100 * result.accuracy(model, m, mode, r) for r in PRUNE_RATES]
                std = [100 * result.std(model, m, mode, r) for r in PRUNE_RATES]
                line, = ax.plot(x, acc, marker="o", ms=3, label=METHODS[m].label)
                ax.fill_between(x, [a - s for a, s in zip(acc, std)], [a + s for a, s in zip(acc, std)],
                                color=line.get_color(), alpha=0.18, linewidth=0)
            ax.set_title(f"{model}: {mode} pruning (mean ± std)")
            ax.set_xlabel("prune %")
            ax.set_ylabel("test accuracy %")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def methods_for(model: str, methods=None) -> tuple:
    """The methods ``model`` runs: ``methods`` if given, else DEFAULT_METHODS (MODEL_METHODS for
    the models listed there)."""
    return tuple(methods) if methods is not None else MODEL_METHODS.get(model, DEFAULT_METHODS)


def check_args(*, epochs, device, backend, methods, models, threads, seeds=1):
    """ValueError naming the bad argument; returns (device, threads) with defaults filled in."""
    from .._registry import resolve

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    for m in methods or ():
        if m not in METHODS:
            raise ValueError(f"methods must name {', '.join(METHODS)}; got {m!r}")
    for m in models:
        if m not in MODELS:
            raise ValueError(f"models must name {', '.join(MODELS)}; got {m!r}")
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but torch sees no CUDA device here")
    resolve(backend, device, torch.float32)  # names backend when it cannot run here
    if threads is None:
        threads = 1 if device.type == "cpu" else torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    return device, threads


def run_demo(*, epochs: int = 20, seed: int = 0, seeds: int = 3, out: str | None = "demo_out", device=None,
             backend: str = "auto", methods=None, models=tuple(MODELS), progress: bool = True, log=None,
             threads: int | None = None) -> DemoResult:
    """Train every (model, method) ``seeds`` times (training seeds ``seed``, ``seed + 1``, ...; the
    data split is ``seed``'s), evaluate each under weight and unit pruning at 0-90% and 2:4
    pruning, print the tables (mean±std), and write ``results.csv`` and
    ``accuracy_vs_pruning.png`` into ``out`` (if not None).

    ``threads``: torch CPU threads while it runs; None means 1 on CPU: these layers are too small
    to gain from intra-op threads, and on a busy small machine extra threads cost several times
    the run time (measured on a 2-core box: see the README's Demo section)."""
    device, threads = check_args(epochs=epochs, device=device, backend=backend, methods=methods, models=models,
                                 threads=threads, seeds=seeds)
    log = sys.stdout if log is None else log  # looked up per call, so redirection works
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(epochs, seed, seeds, out, device, backend, methods, models, progress, log)
    finally:
        torch.set_num_threads(saved_threads)


def _run(epochs, seed, seeds, out, device, backend, methods, models, progress, log) -> DemoResult:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    train_data, test_data = load_data(seed, device)
    steps = epochs * -(-len(train_data[0]) // 64)
    result = DemoResult()
    runs = {model_name: methods_for(model_name, methods) for model_name in models}
    with tqdm(total=steps * sum(map(len, runs.values())) * seeds, file=sys.stderr, disable=not progress,
              unit="step", dynamic_ncols=True) as bar:
        for model_name in models:
            for m in runs[model_name]:
                for s in range(seed, seed + seeds):
                    bar.set_description(f"{model_name} {m} seed {s}")
                    torch.manual_seed(s)  # same initial weights for every method
                    model = make_model(model_name).to(device)
                    train(model, METHODS[m], train_data, epochs=epochs, seed=s,
                          backend=backend, progress=bar)
                    # with BatchNorm: evaluated with the statistics recalibrated after pruning
                    # (on training images) and as trained (at a few rates); without: "" once
                    for bn in BN_STATS if batchnorm_modules(model) else ("",):
                        recal = bn == BN_STATS[0]
                        rates = AS_TRAINED_RATES if bn == BN_STATS[1] else PRUNE_RATES
                        recalibrate = [train_data[0][:RECALIBRATION_IMAGES]] if recal else None
                        for (mode, rate), acc in evaluate_pruning(model, test_data, backend=backend, rates=rates,
                                                                  recalibrate=recalibrate).items():
                            result.rows.append({"model": model_name, "method": m, "prune_mode": mode,
                                                "prune_rate": rate, "seed": s, "accuracy": round(acc, 6),
                                                "bn_stats": bn})
    result.seconds = time.perf_counter() - start
    how = f"mean±std over {seeds} seeds" if seeds > 1 else "1 seed"
    for model_name in models:
        methods = runs[model_name]
        marks = (' "+"/"-": above/below "none" by more than the two std added' if seeds > 1 and "none" in methods
                 else "")
        for mode in PRUNE_MODES:
            print(f"\n{model_name}, {mode} pruning: test accuracy % on digits ({len(test_data[0])} images, {how};"
                  f"{marks})", file=log)
            print(format_table(result, model_name, mode, methods), file=log)
        print(f"\n{model_name}, {NM[0]}:{NM[1]} pruning (layers whose fan-in {NM[1]} does not divide stay dense): "
              f"test accuracy % ({how})", file=log)
        print(format_nm_table(result, model_name, methods), file=log)
        if any(r["model"] == model_name and r["bn_stats"] for r in result.rows):
            print(f"\n{model_name}: BatchNorm statistics as trained vs recalibrated after pruning "
                  f"(td.recalibrate_batchnorm on {RECALIBRATION_IMAGES} training images; the tables above are recalibrated): "
                  f"test accuracy % ({how})", file=log)
            print(format_bn_table(result, model_name, methods), file=log)
    every = list(dict.fromkeys(m for ms in runs.values() for m in ms))
    print("\n" + "\n".join(f"{m}: {METHODS[m].label}" for m in every), file=log)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        result.csv_path = os.path.join(out, "results.csv")
        result.png_path = os.path.join(out, "accuracy_vs_pruning.png")
        _write_csv(result, result.csv_path)
        _plot(result, result.png_path, runs)
        print(f"\nwrote {result.csv_path} and {result.png_path}", file=log)
    print(f"{sum(map(len, runs.values())) * seeds} models trained and evaluated in {result.seconds:.1f} s on {device} "
          f"(backend={backend!r}, {torch.get_num_threads()} CPU threads)", file=log)
    return result
