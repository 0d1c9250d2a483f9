"""The ``td-kernels`` command: ``td-kernels demo [...]``, ``td-kernels bench [...]`` and ``td-kernels info``."""
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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="td-kernels", description="td_kernels: fast targeted dropout for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,info}")
    _demo_parser(sub)
    info = sub.add_parser("info", help="versions, devices, backends and build: paste it into a bug report",
                          description="Print td_kernels', torch's, Triton's and CUDA's versions, the devices torch "
                                      "sees, every backend with whether it runs here (and why not), the native "
                                      "extension's build and the thread counts.")
    info.add_argument("--json", action="store_true", help="print it as JSON")
    info.add_argument("--require-native-cuda", action="store_true",
                      help="check only that the native CUDA kernels are built and complete (sm_80, sm_90, every "
                           "op registered for CUDA); say what is missing and exit 1 if anything is")
    sub.add_parser("bench", help="benchmark the backends (arguments go to td_kernels.tools.bench.ops)", add_help=False)
    if argv[:1] == ["bench"]:
        # hand every remaining argument to the benchmark's own parser
        from .bench import ops  # lazily: it may pull in Triton and the native extension

        return ops.main(argv[1:]) or 0
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
