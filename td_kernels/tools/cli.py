"""The ``td-kernels`` command: ``td-kernels demo [...]``, ``td-kernels analyse [...]``, ``td-kernels bench [...]``,
``td-kernels tune CSV`` and ``td-kernels info``."""
from __future__ import annotations

import argparse
import sys


def _csv(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _demo_parser(sub) -> None:
    from .demo import DEFAULT_METHODS, METHODS, MODEL_METHODS, MODELS  # light: no training at import

    p = sub.add_parser("demo", help="train small nets on 8x8 digits and tabulate accuracy vs pruning (Table 2)",
                       description="Reproduce the shape of the paper's Table 2 on scikit-learn's 8x8 digits: "
                                   "train each model with each method (several seeds), prune 0-90% of its weights / "
                                   "units and to 2:4, print the accuracy tables (mean and std), write results.csv and "
                                   "accuracy_vs_pruning.png.")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per model (default: 20)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, and the first training seed (initial weights, data order, dropout) "
                        "(default: 0)")
    p.add_argument("--seeds", type=int, default=3,
                   help="training runs per cell, seeds SEED, SEED+1, ...: the tables give mean and standard "
                        "deviation and mark where a method differs from 'none' by more than the spread (default: 3)")
    p.add_argument("--out", default="demo_out", help="output directory (default: ./demo_out)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="auto", help="td_kernels backend for the targeted ops (default: auto)")
    p.add_argument("--methods", type=_csv, default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; "
                        f"the ResNet: {','.join(MODEL_METHODS['resnet'])})")
    p.add_argument("--models", type=_csv, default=tuple(MODELS),
                   help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads while it runs (default: 1 on CPU; these layers are too small to gain "
                        "from more)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _analyse_parser(sub) -> None:
    p = sub.add_parser("analyse", help="the paper's second-order analysis on 8x8 digits (Table 1, Figure 1)",
                       description="Reproduce the paper's section 5.1 on scikit-learn's 8x8 digits: train a 64-10-10 "
                                   "ReLU network with plain SGD, unregularised and with targeted weight dropout "
                                   "(gamma=0.75, alpha=0.5 on the hidden layer), then over the test set in float64: "
                                   "the change in loss from pruning the targeted 75%% (eq. 3, estimate and actual), "
                                   "the accuracies (Table 1, mean and std over the seeds) and the Hessian-weight "
                                   "matrices (Figure 1). Writes table1.txt, table1.csv, figure1.png, figure1.csv.")
    p.add_argument("--epochs", type=int, default=200, help="SGD epochs per network (default: 200, the paper's)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, no momentum (default: 0.05)")
    p.add_argument("--batch-size", type=int, default=32, help="SGD batch size (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and the first training seed (default: 0)")
    p.add_argument("--seeds", type=int, default=3, help="training runs per method, seeds SEED, SEED+1, ... (default: 3)")
    p.add_argument("--out", default="analyse_out", help="output directory (default: ./analyse_out)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--hvp-cost", action="store_true",
                   help="instead: time one Hessian-vector product against one forward+backward for the demo's "
                        "models and a GPT-2 small from its config (writes hvp_cost.txt/.csv into --out)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="td-kernels", description="td_kernels: fast targeted dropout for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="{demo,analyse,bench,tune,info}")
    _demo_parser(sub)
    _analyse_parser(sub)
    info = sub.add_parser("info", help="versions, devices, backends and build: paste it into a bug report",
                          description="Print td_kernels', torch's, Triton's and CUDA's versions, the devices torch "
                                      "sees, every backend with whether it runs here (and why not), the native "
                                      "extension's build and the thread counts.")
    info.add_argument("--json", action="store_true", help="print it as JSON")
    info.add_argument("--require-native-cuda", action="store_true",
                      help="check only that the native CUDA kernels are built and complete (sm_80, sm_90, every "
                           "op registered for CUDA); say what is missing and exit 1 if anything is")
    sub.add_parser("bench", help="benchmark the backends (arguments go to td_kernels.tools.bench.ops)", add_help=False)
    sub.add_parser("tune", add_help=False,
                   help="from a card's benchmark CSV, what backend='auto' picks there (td_kernels.tools.bench.tune)")
    if argv[:1] == ["bench"]:
        # hand every remaining argument to the benchmark's own parser
        from .bench import ops  # lazily: it may pull in Triton and the native extension

        return ops.main(argv[1:]) or 0
    if argv[:1] == ["tune"]:
        from .bench import tune

        return tune.main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        from .info import collect, format_info, native_cuda_problems

        if args.require_native_cuda:
            problems = native_cuda_problems()
            for p in problems:
                print(f"td-kernels info: native CUDA kernels: {p}", file=sys.stderr)
            if not problems:
                from ..backends import native

                print(f"native CUDA kernels: complete ({native.BUILD_INFO})")
            return 1 if problems else 0
        if args.json:
            import json

            print(json.dumps(collect(), indent=1))
        else:
            print(format_info())
        return 0
    if args.command == "analyse":
        from .analyse import hvp_cost, run_analyse

        if args.hvp_cost:
            hvp_cost(device=args.device, out=args.out, threads=args.threads)
            return 0
        try:
            run_analyse(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, seeds=args.seeds,
                        out=args.out, device=args.device, progress=not args.no_progress, threads=args.threads)
        except (ValueError, TypeError) as e:
            parser.error(str(e))
        return 0
    from .demo import check_args, run_demo

    kwargs = dict(epochs=args.epochs, device=args.device, backend=args.backend, methods=args.methods,
                  models=args.models, threads=args.threads, seeds=args.seeds)
    try:
        check_args(**kwargs)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    run_demo(seed=args.seed, out=args.out, progress=not args.no_progress, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
