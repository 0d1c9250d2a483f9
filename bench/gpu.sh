#!/usr/bin/env bash
# One-shot GPU check: build the extension with CUDA, run the test suite on the GPU, benchmark,
# and leave CSV, PNGs and a log in a results dir named after the card:
#   $OUT if set, else bench/results/<card>/.
# Needs: a CUDA GPU, torch (CUDA build), triton, pytest, hypothesis, matplotlib, pytest-benchmark,
# setuptools, ninja. Nothing of ours needs to be built first. Budget: well under 10 minutes
# (every step has a timeout; a failed step is logged and the next one still runs).
#
#   bash bench/gpu.sh                         # the whole thing on the GPU
#   bash bench/gpu.sh --device cpu --no-build --quick   # dry run of the Python parts on CPU
#   bash bench/gpu.sh -- --shapes 4096x4096   # anything after -- goes to td_kernels.benchmark
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
device=cuda build=1 tests=1 quick=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --no-tests) tests=0; shift ;;
    --quick) quick=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# the card's name, from torch alone (our package may not be built yet)
card=$("$PY" - "$device" <<'PYEOF'
import re, sys, torch
dev = torch.device(sys.argv[1])
if dev.type == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu.sh: --device cuda but torch sees no CUDA device (torch %s)" % torch.__version__)
    name = torch.cuda.get_device_name(dev)
else:
    name = next((l.split(":", 1)[1] for l in open("/proc/cpuinfo") if l.startswith("model name")), "cpu")
print(re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower())
PYEOF
) || exit 2
results=${OUT:-bench/results/$card}
mkdir -p "$results"
exec > >(tee "$results/gpu.log") 2>&1
echo "# results: $results   started $(date -u +%FT%TZ)"

failed=()
step() {  # step NAME TIMEOUT_S CMD...: run, time, record a failure, carry on
  local name=$1 limit=$2; shift 2
  echo; echo "## $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "## $name: exit $rc after $((SECONDS - t0))s"
  [[ $rc -eq 0 ]] || failed+=("$name (exit $rc)")
}

if [[ $device == cuda ]]; then nvidia-smi || true; fi
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
"$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"
git log -1 --format='commit %h %s' 2>/dev/null || true

unset TRITON_INTERPRET  # the Triton kernels must run compiled on the GPU, not interpreted
if [[ $build == 1 ]]; then
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  step build 180 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
"$PY" -c "import td_kernels as td; print('backends on $device:', td.available_backends('$device'))"

if [[ $tests == 1 ]]; then
  step tests 150 "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --junitxml="$results/tests.xml" tests
fi

bench_args=(--device "$device" --out "$results" --rep-ms 60 --warmup-ms 15)
[[ $quick == 1 ]] && bench_args+=(--quick)
if [[ -f "$results/bench.csv" ]]; then  # an earlier run on this card: flag regressions
  cp "$results/bench.csv" "$results/bench.previous.csv"
  bench_args+=(--compare "$results/bench.previous.csv")
fi
step benchmark 180 "$PY" -m td_kernels.benchmark "${bench_args[@]}" "${extra[@]}"
step pytest-benchmark 45 "$PY" -m pytest -q -p no:cacheprovider bench/ --benchmark-only \
  --benchmark-max-time=0.2 --benchmark-json="$results/pytest-benchmark.json"

echo; echo "# finished $(date -u +%FT%TZ) after ${SECONDS}s; results in $results:"; ls -l "$results"
if [[ ${#failed[@]} -gt 0 ]]; then echo "# FAILED: ${failed[*]}"; exit 1; fi
echo "# all steps passed"
