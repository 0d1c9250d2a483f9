#!/usr/bin/env bash
# CI's second half (`make test-cuda`): the CUDA build a GPU user makes, proven on this GPU-less
# machine, and the CPU suite under the GPU machine's torch and triton.
#   1. the shared environment: torch 2.11.0 (CUDA build) and triton 3.6.0, the GPU machine's
#      versions, plus the test tools, in $TD_CUDA_VENV (default ~/.cache/td_kernels/venv-cuda),
#      outside the clone so that CI's fresh clones reuse it; rebuilt when its stamp is missing
#      (a half-finished install) or names other packages;
#   2. .cuda-ci/ in the clone: src/, a copy of the clone's files (tracked and not ignored), and
#      venv/, a venv that sees the shared one's packages through a .pth file. The shared
#      environment holds no clone, so later or concurrent clones never point into each other,
#      and the copy keeps the CUDA build's td_kernels/_C*.so and _build.json apart from the
#      clone's own CPU build (.venv loads the clone's td_kernels);
#   3. the GPU run itself, as far as a CPU goes: `bash bench/gpu.sh --device cpu --stages
#      ops,steps,sanitize` in src/ with that venv's python, so CI executes the script a GPU lease
#      runs, stage by stage, under the GPU machine's torch and triton: its build stage is the
#      install (TD_KERNELS_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e ., a user's
#      install less the dependency lookup), then the smoke, the op benchmark and its ranking
#      (tune), the sanitize stage's selection (run plainly: no sanitizer without a GPU) and the
#      training-step benchmark (small CPU shapes; its results go to .cuda-ci/gpu-dry-run/). Its test stage is
#      the suite below (the same tests, and the selection itself is tested: test_gpu_script.py);
#   4. the build checked: `td-kernels info --require-native-cuda` (native.WITH_CUDA, sm_80 and
#      sm_90 in BUILD_INFO, every td_kernels_native op with a CUDA kernel);
#   5. the CPU test suite in that environment.
# Every phase logs its start, its end and its seconds (.ci/phase).
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE=.ci/phase
PYTHON=${PYTHON:-python3}
SHARED=${TD_CUDA_VENV:-$HOME/.cache/td_kernels/venv-cuda}
WORK=.cuda-ci
LOCAL=$WORK/venv
# the GPU machine's torch and triton (bench/README.md), and what the tests and gpu.sh use there;
# no torch-pruning: the GPU machine has none, so its tests must skip cleanly here too
PACKAGES="torch==2.11.0 triton==3.6.0 transformers==5.17.0 numpy ninja setuptools wheel pytest hypothesis
pytest-benchmark matplotlib scikit-learn tqdm"
STAMP="$SHARED/.td-stamp"
want_stamp="$($PYTHON -c 'import sys; print(sys.version.split()[0])') $PACKAGES"

command -v nvcc >/dev/null || { echo "test-cuda: no nvcc on PATH: CI must prove the CUDA build" >&2; exit 1; }

mkdir -p "$(dirname "$SHARED")"
exec 9>"$SHARED.lock"
flock 9  # one CI run at a time creates or replaces the shared environment
if [[ ! -f $STAMP || $(cat "$STAMP") != "$want_stamp" ]]; then
  echo "test-cuda: (re)creating $SHARED (stamp: $(cat "$STAMP" 2>/dev/null || echo none))"
  rm -rf "$SHARED"
  # (this machine's pip configuration names local indexes that lack these packages: drop its
  # "Location ... is ignored" lines)
  $PHASE "cuda: download and install torch 2.11.0 + triton 3.6.0 into $SHARED" \
    bash -c "set -o pipefail; { $PYTHON -m venv '$SHARED' && '$SHARED/bin/python' -m pip install -q --upgrade pip &&
             '$SHARED/bin/python' -m pip install -q $(echo $PACKAGES); } 2>&1 | { grep -v '^WARNING: Location' || true; }"
  echo "$want_stamp" >"$STAMP"
else
  echo "test-cuda: reusing $SHARED"
fi
flock -s 9  # others may read it now, none replaces it while this run uses it

site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
rm -rf "$WORK"
mkdir -p "$WORK/src"
git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -c | tar -x -C "$WORK/src"
$PYTHON -m venv --without-pip "$LOCAL"
LOCAL=$PWD/$LOCAL
echo "import site; site.addsitedir('$(site "$SHARED/bin/python")')" >"$(site "$LOCAL/bin/python")/td_cuda_shared.pth"
"$LOCAL/bin/python" -c 'import torch, triton; print("test-cuda: torch", torch.__version__, "(CUDA", torch.version.cuda,
  "), triton", triton.__version__)'
echo "test-cuda: nvcc $(command -v nvcc): $(nvcc --version | grep -o 'release [0-9.]*'); CUDA_HOME=${CUDA_HOME:-unset}"

PHASE=$PWD/$PHASE
cd "$WORK/src"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# gpu.sh finds python through $PYTHON, nvcc and td-kernels through PATH
$PHASE "cuda: bench/gpu.sh --device cpu --stages ops,steps,sanitize (build, smoke, benchmarks, sanitize)" \
  env PYTHON="$LOCAL/bin/python" PATH="$LOCAL/bin:$PATH" OUT="$(dirname "$PWD")/gpu-dry-run" \
  bash bench/gpu.sh --device cpu --stages ops,steps,sanitize
echo "test-cuda: td_kernels/_build.json: $(cat td_kernels/_build.json)"
$PHASE "cuda: check the build (td-kernels info --require-native-cuda)" \
  "$LOCAL/bin/td-kernels" info --require-native-cuda
$PHASE "cuda: CPU test suite under torch 2.11.0+cu130, triton 3.6.0" \
  nice "$LOCAL/bin/python" -m pytest -q -p no:cacheprovider
