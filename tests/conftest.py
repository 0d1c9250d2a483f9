import os

import torch

# Triton's interpreter must be switched on before triton.jit decorates any kernel, i.e. before
# td_kernels is imported: on a machine without CUDA the Triton kernels then run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test draws its random weights from a fixed stream: a failure reproduces."""
    torch.manual_seed(0)


# bench/gpu.sh's test stage: the tests that run GPU code (test_triton.py, test_native.py's
# device=cuda cases, the cuda-marked tests), nothing that CI already proves on a CPU (test_native's
# device=cpu cases), and a bounded number of Triton compiles. test_triton.py as a whole launches 364 distinct Triton
# kernel variants (bench/count_triton_variants.py; ~0.7-2 s of compile each, one at a time): far
# more than the stage's 150 s. Left out (about 150 remain), each still run by CI under the
# interpreter, and on the GPU by `--gpu-tests-rest` (gpu.sh --stages tests-rest) when time is left:
GPU_TEST_FILES = ("test_triton.py", "test_native.py")
GPU_LEAVE_OUT = {
    # random shapes: each new row length can be a new compile
    "test_weight_hypothesis", "test_nm_hypothesis", "test_unit_hypothesis",
    # (n, m) are constexprs: 112 variants; the smoke's 2:4 check and
    # test_nm_long_rows_and_many_chunks keep N:M on the GPU
    "test_nm_matches_reference", "test_nm_spec_example_and_dtypes",
    # the same outputs, words and backwards are checked by test_weight_windows (aligned and
    # unaligned rows), test_weight_ties_and_zeros and test_weight_streamed_path in every dtype
    "test_weight_matches_reference", "test_weight_bits_words",
}


# bench/gpu.sh's sanitize stage (bench/sanitize.py runs them under compute-sanitizer's memcheck,
# racecheck and synccheck): test_native.py cases that reach every native CUDA kernel on small
# inputs (_weight_select, _apply, _weight_fused and its >32 KB fallback, windows, given limits,
# N:M, _unit_norms, _unit_select, _fill_i32 for k == 0 or F, ties/NaN/inf, every dtype, both
# backwards): the device=cuda cases where there is a GPU, else the device=cpu ones (so that CI
# runs the selection)
SANITIZE_TESTS = ("test_spec_worked_example", "test_spec_nm_example", "test_given_limits", "test_ties_zeros_nan_inf",
                  "test_window_block_of_a_global_weight", "test_unit_nan_norms_tie", "test_long_row")


def pytest_addoption(parser):
    parser.addoption("--gpu-tests", action="store_true",
                     help="only the tests that run GPU code (tests/test_triton.py, tests/test_native.py's "
                          "device=cuda cases, the cuda-marked tests) less conftest.GPU_LEAVE_OUT: bench/gpu.sh's "
                          "test stage")
    parser.addoption("--gpu-tests-rest", action="store_true", help="only conftest.GPU_LEAVE_OUT's tests")
    parser.addoption("--sanitize-tests", action="store_true",
                     help="only conftest.SANITIZE_TESTS' cases on this machine's GPU (else its CPU): bench/gpu.sh's "
                          "sanitize stage")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--sanitize-tests"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        keep = [i for i in items if i.path.name == "test_native.py" and i.originalname in SANITIZE_TESTS
                and getattr(i, "callspec", None) is not None and i.callspec.params.get("device") == device]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
        return
    rest = config.getoption("--gpu-tests-rest")
    if not (config.getoption("--gpu-tests") or rest):
        return

    def gpu(item):
        if item.get_closest_marker("cuda") is not None or item.path.name == "test_triton.py":
            return True
        # test_native.py runs each case per device: the CPU ones are CI's, the GPU takes the CUDA ones
        callspec = getattr(item, "callspec", None)
        return item.path.name == "test_native.py" and callspec is not None and callspec.params.get("device") == "cuda"

    def left_out(item):
        return item.path.name == "test_triton.py" and item.originalname in GPU_LEAVE_OUT

    keep = [i for i in items if gpu(i) and left_out(i) == bool(rest)]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep
