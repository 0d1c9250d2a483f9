"""Data parallel training with targeted dropout (issue 10): DDP and FSDP2, torch.compile of
both, exact resume; 2 processes on gloo (CPU).

ONE group of 2 processes runs every check of tests/dp_worker.py (see its docstring for what
they show); each check is one test item here, failing with both ranks' tracebacks. The group
is started and read by tests/test_distributed.py's helpers."""
from pathlib import Path

import pytest
import torch

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import dp_worker  # noqa: E402
from test_distributed import Run, expect_clean_exit, expect_passed  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run(tmp_path_factory.mktemp("dp"), worker=Path(dp_worker.__file__))


@pytest.mark.parametrize("name", list(dp_worker.CHECKS))
def test_data_parallel(run, name):
    expect_passed(run, name)


def test_group_exits_cleanly(run):
    expect_clean_exit(run, dp_worker.CHECKS)
