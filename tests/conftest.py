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


# bench/gpu.sh's test stage: the tests that run GPU code, nothing that CI already proves on a CPU
GPU_TEST_FILES = ("test_triton.py", "test_native.py")


def pytest_addoption(parser):
    parser.addoption("--gpu-tests", action="store_true",
                     help="only the tests that run GPU code: tests/test_triton.py, tests/test_native.py and the "
                          "cuda-marked tests (bench/gpu.sh's test stage)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpu-tests"):
        return
    keep = [i for i in items if i.path.name in GPU_TEST_FILES or i.get_closest_marker("cuda")]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep
