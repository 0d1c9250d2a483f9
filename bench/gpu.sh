#!/usr/bin/env bash
# One-shot GPU check: build the extension with CUDA, run the test suite on the GPU, benchmark ops
# and training steps, and leave at most 8 files (no subfolder) in a results dir named after the card:
#   $OUT if set, else bench/results/<card>/:
#   gpu.log  tests.xml  bench.csv  bench_weight.png  bench_unit.png  bench_nm.png  step.csv  step.png
# Needs: a CUDA GPU, torch (CUDA build, >= 2.11), triton (>= 3.6), pytest, hypothesis, matplotlib,
# pytest-benchmark, setuptools, ninja; no network. Nothing of ours needs to be built first.
# Budget: the step limits add up to 8 min 10 s; a failed step is logged and the next one still runs.
#
#   bash bench/gpu.sh                         # the whole thing on the GPU
#   bash bench/gpu.sh --device cpu --no-build --quick   # dry run of the Python parts on CPU
#   bash bench/gpu.sh -- --shapes 4096x4096   # anything after -- goes to td_kernels.tools.bench.ops
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
  step build 110 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
"$PY" -c "import td_kernels as td; print('backends on $device:', td.available_backends('$device'))"

if [[ $tests == 1 ]]; then
  # CPU-only checks that CI already runs are left out: the sm_80/sm_90 compiles without a GPU
  # (test_triton_aot, the nvcc spill checks) and the 2-process gloo tests
  step tests 150 "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --junitxml="$results/tests.xml" tests \
    --ignore=tests/test_triton_aot.py --ignore=tests/test_distributed.py --ignore=tests/test_data_parallel.py \
    --deselect=tests/test_native_core.py::test_cuda_kernels_compile_without_spills
fi

# the issue's shapes: two Linear layers of a 7B model each way round, and few long rows; the
# reference is a correctness yardstick, not timed here
bench_args=(--device "$device" --out "$results" --rep-ms 40 --warmup-ms 10 --skip-reference)
[[ $quick == 1 ]] && bench_args+=(--quick) || bench_args+=(--shapes 4096x4096,11008x4096,4096x11008,256x1000000)
if [[ -f "$results/bench.csv" ]]; then  # an earlier run on this card: flag regressions
  previous=$(mktemp)
  cp "$results/bench.csv" "$previous"
  bench_args+=(--compare "$previous")
fi
step benchmark 140 "$PY" -m td_kernels.tools.bench.ops "${bench_args[@]}" "${extra[@]}"
step_args=(--step --device "$device" --out "$results" --rep-ms 100)
[[ $quick == 1 ]] && step_args+=(--models cnn --min-time 0.05)
step training-steps 60 "$PY" -m td_kernels.tools.bench.ops "${step_args[@]}"
step pytest-benchmark 30 "$PY" -m pytest -q -p no:cacheprovider bench/ --benchmark-only --benchmark-max-time=0.2

echo; echo "# finished $(date -u +%FT%TZ) after ${SECONDS}s; results in $results:"; ls -l "$results"
if [[ ${#failed[@]} -gt 0 ]]; then echo "# FAILED: ${failed[*]}"; exit 1; fi
echo "# all steps passed"
