#!/usr/bin/env bash
# GPU check in stages, sized for a 15-minute GPU lease, reruns included (bench/README.md's budget):
#   bash bench/gpu.sh --smoke     # <= 2 min: build, import, a bit-exact fwd/bwd check of every
#                                 #   kernel family per backend, one timing line per backend
#   bash bench/gpu.sh             # <= 7 min: the smoke, then the GPU tests, the op benchmark
#                                 #   (ranked for backend="auto" by td-kernels tune) and the
#                                 #   training-step benchmark
#   bash bench/gpu.sh --device cpu [--smoke]   # the same here, without a GPU: a CPU build, the
#                                 #   native CPU kernels and the Triton interpreter, small shapes,
#                                 #   4x the time limits
#   --stages tests,ops,steps      # the full run's stages to run (after the smoke); tests-rest:
#                                 #   the Triton tests left out of tests (tests/conftest.py);
#                                 #   sanitize: compute-sanitizer on the native CUDA kernels; --no-build
#   -- ARGS                       # more arguments for the op benchmark (td-kernels bench)
# Each stage logs its start, end and seconds, runs under `timeout -s INT` (pytest and the
# benchmarks stop cleanly on SIGINT and keep what they wrote) and writes its results as it goes
# into $OUT, else bench/results/<card>/: gpu.log smoke.csv tests.xml bench.csv step.csv step.png
# (sanitize.csv, tests-rest.xml when asked for).
# A failed build, or a build without complete native CUDA kernels, stops the run at once.
# Needs: torch (CUDA build), triton, pytest, hypothesis, matplotlib, ninja, setuptools, nvcc;
# nothing from the network (PIP_NO_INDEX=1).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
device=cuda build=1 smoke_only=0 stages=tests,ops,steps extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --smoke) smoke_only=1; shift ;;
    --stages) stages=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $device == cuda || $device == cpu ]] || { echo "gpu.sh: --device must be cuda or cpu" >&2; exit 2; }
export PIP_NO_INDEX=1 HYPOTHESIS_PROFILE=ci PYTHONUNBUFFERED=1

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
exec > >(tee -a "$results/gpu.log") 2>&1
tee_pid=$!  # bash does not wait for a process substitution: leave() does, so gpu.log is complete
leave() { exec >&- 2>&-; wait "$tee_pid" 2>/dev/null; exit "$1"; }
echo "# gpu.sh --device $device$([[ $smoke_only == 1 ]] && echo " --smoke"): results in $results, started $(date -u +%FT%TZ)"

failed=()
# on a CPU the Triton kernels run interpreted on 2 shared cores: 4x the limits (the GPU budget is 1x)
scale=1; [[ $device == cpu ]] && scale=4
stage() {  # stage NAME LIMIT_S CMD...: run under timeout -s INT, log and time it, record a failure
  local name=$1 limit=$(($2 * scale)); shift 2
  echo; echo "== [$(date -u +%T)] $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout -s INT -k 5 "$limit" "$@"
  local rc=$?
  echo "== [$(date -u +%T)] $name: $([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc$([[ $rc == 124 ]] && echo ': time limit'))") after $((SECONDS - t0)) s"
  [[ $rc == 0 ]] || failed+=("$name (exit $rc)")
  return $rc
}
finish() {
  echo; echo "# finished $(date -u +%FT%TZ) after ${SECONDS} s; results in $results:"; ls -l "$results"
  if [[ ${#failed[@]} -gt 0 ]]; then echo "# FAILED: ${failed[*]}"; leave 1; fi
  echo "# all stages passed"; leave 0
}

if [[ $device == cuda ]]; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true
else export TRITON_INTERPRET=1; fi  # on a CPU the Triton kernels run under the interpreter
[[ $device == cuda ]] && unset TRITON_INTERPRET  # on the GPU they must run compiled
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
  torch.version.cuda, "triton", triton.__version__)'
git log -1 --format='commit %h %s' 2>/dev/null || true

# ---- smoke: build, import, check, one timing line per backend (<= 2 min) ----------------------
if [[ $build == 1 ]]; then
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  stage build 80 env TD_KERNELS_BUILD_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . || {
    echo "gpu.sh: the native extension did not build (log above): stopping"; finish; }
fi
if [[ $device == cuda ]]; then
  "$PY" -m td_kernels info --require-native-cuda || {
    echo "gpu.sh: the native CUDA kernels are not there (above: why): stopping; rebuild with TD_KERNELS_BUILD_EXT=1"
    failed+=("native CUDA kernels missing"); finish; }
else
  echo "gpu.sh: --device cpu: native CUDA not required; here it is: $("$PY" -m td_kernels info --json |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["native CUDA kernels"])')"
fi
stage smoke 35 "$PY" bench/smoke.py --device "$device" --out "$results"
[[ $smoke_only == 1 ]] && finish

# ---- the full run (<= 7 min with the smoke) -----------------------------------------------------
want() { [[ ",$stages," == *",$1,"* ]]; }
if want tests; then
  # the tests that run GPU code (tests/conftest.py --gpu-tests: test_triton, test_native, the
  # cuda-marked ones) with their names in the log; what CI proves on a CPU is left out
  stage tests 150 "$PY" -m pytest --gpu-tests -rA -q -m "not slow" -p no:cacheprovider \
    --junitxml="$results/tests.xml" tests
fi
if want tests-rest; then  # not in the default stages: for a lease's spare minutes
  stage tests-rest 150 "$PY" -m pytest --gpu-tests-rest -rA -q -p no:cacheprovider \
    --junitxml="$results/tests-rest.xml" tests
fi
if want ops; then
  # no plots: the device tool returns at most 8 files (bench_*.png come from bench.csv later)
  bench_args=(--device "$device" --out "$results" --rep-ms 40 --warmup-ms 10 --skip-reference --no-plot)
  if [[ $device == cuda ]]; then bench_args+=(--shapes 4096x4096,4096x11008,256x1000000)
  else bench_args+=(--quick --min-time 0.05); fi
  if [[ -f "$results/bench.csv" ]]; then  # an earlier run on this card: flag regressions
    previous=$(mktemp); cp "$results/bench.csv" "$previous"; bench_args+=(--compare "$previous")
  fi
  stage ops 80 "$PY" -m td_kernels bench "${bench_args[@]}" "${extra[@]}" &&
    # what backend="auto" should take on this card, per targeting kind (into the log; a session
    # records it with `td-kernels tune <this bench.csv> --write`, bench/README.md)
    stage tune 10 "$PY" -m td_kernels tune "$results/bench.csv"
fi
if want sanitize; then  # not in the default stages: compute-sanitizer on the native CUDA kernels,
  # for a lease's spare minutes; a runtime that refuses the tool is recorded, not a failure
  stage sanitize 150 "$PY" bench/sanitize.py --device "$device" --out "$results"
fi
if want steps; then
  step_args=(--step --device "$device" --out "$results" --rep-ms 100 --variants dropout,td-weight,td-unit,td-nm)
  if [[ $device == cuda ]]; then step_args+=(--models mlp-b256,llama-block)
  else step_args+=(--models cnn --min-time 0.05 --rounds 1); fi
  stage steps 50 "$PY" -m td_kernels bench "${step_args[@]}"
fi
finish
