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
