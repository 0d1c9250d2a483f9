"""bench/gpu.sh, the script a GPU lease runs, checked where CI can check it.

CI runs the script itself (`.ci/cuda_build.sh`: `gpu.sh --device cpu --stages ops,steps,sanitize`, its build
included); its test stage is the suite, so what is left to prove here is the stage's *selection*
(`pytest --gpu-tests`, tests/conftest.py): every test that runs GPU code is in it, the leave-outs
are out, and each leave-out still names a test (a renamed test would silently rejoin the stage
and blow its compile budget). A selection that missed a test would never run that test on a GPU.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from conftest import GPU_LEAVE_OUT, GPU_TEST_FILES, SANITIZE_TESTS  # noqa: E402

# two plugins for the subprocess: the items before conftest's selection (with their markers),
# and the node ids after it (one hook per module: pluggy takes one implementation of a name each)
BEFORE = """
import json, os, pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    json.dump([{"id": i.nodeid, "file": i.path.name, "name": i.originalname,
                "cuda": i.get_closest_marker("cuda") is not None,
                "device": getattr(i, "callspec", None) and i.callspec.params.get("device"),
                "skip_reasons": [str(m.kwargs.get("reason", "")) for m in i.iter_markers("skipif")]}
               for i in items], open(os.environ["TD_RECORD"] + ".all", "w"))
"""
AFTER = """
import json, os, pytest

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    json.dump([i.nodeid for i in items], open(os.environ["TD_RECORD"] + ".kept", "w"))
"""


def _collect(tmp_path, option):
    """(every collected item, the node ids the option keeps), from `pytest --collect-only`."""
    (tmp_path / "td_before.py").write_text(BEFORE)
    (tmp_path / "td_after.py").write_text(AFTER)
    record = tmp_path / "record"
    env = {**os.environ, "TD_RECORD": str(record),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "td_before", "-p", "td_after", option, "tests"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(Path(f"{record}.all").read_text())
    return rows, set(json.loads(Path(f"{record}.kept").read_text()))


@pytest.fixture(scope="module")
def gpu_tests(tmp_path_factory):
    return _collect(tmp_path_factory.mktemp("gpu"), "--gpu-tests")


def test_gpu_stage_runs_every_gpu_test_but_the_leave_outs(gpu_tests):
    rows, kept = gpu_tests
    by_id = {r["id"]: r for r in rows}
    # test_triton.py runs on the GPU where there is one (its kernels, compiled); test_native.py's
    # cases run per device, and only the CUDA ones need the GPU (none are collected on a CPU)
    want = {r["id"] for r in rows
            if r["cuda"] or (r["file"] == "test_triton.py" and r["name"] not in GPU_LEAVE_OUT)
            or (r["file"] == "test_native.py" and r["device"] == "cuda")}
    assert kept == want, (sorted(kept - want)[:10], sorted(want - kept)[:10])
    files = {by_id[i]["file"] for i in kept}
    assert {"test_triton.py", "test_graph_seed.py"} <= files  # graph_seed: the CUDA-graph replays
    assert not {by_id[i]["name"] for i in kept if by_id[i]["file"] == "test_triton.py"} & GPU_LEAVE_OUT
    native = [r for r in rows if r["file"] == "test_native.py"]
    cpu_cases = {r["name"] for r in native if r["device"] == "cpu"}
    # every test_native case that runs a kernel on a CPU also runs it on each device there is
    assert cpu_cases >= {"test_weight_random", "test_nm_random", "test_unit_random", "test_long_row"}
    assert {r["name"] for r in native if r["device"] == "cuda"} == (cpu_cases if torch.cuda.is_available() else set())


# a skip reason that says a GPU is missing ("needs a CUDA device"), not one about torch's build
NEEDS_GPU = re.compile(r"\bcuda (device|gpu)\b|\bgpu\b", re.I)


def test_every_test_that_needs_cuda_is_marked(gpu_tests):
    """A test outside test_triton.py/test_native.py that skips without CUDA must carry the `cuda`
    marker, or the GPU stage never selects it: it would run nowhere."""
    rows, _ = gpu_tests
    unmarked = sorted(r["id"] for r in rows
                      if r["file"] not in GPU_TEST_FILES and not r["cuda"]
                      and any(NEEDS_GPU.search(s) for s in r["skip_reasons"]))
    assert not unmarked, f"skip without CUDA but have no @pytest.mark.cuda: {unmarked}"


def test_gpu_tests_rest_is_exactly_the_leave_outs(tmp_path):
    rows, kept = _collect(tmp_path, "--gpu-tests-rest")
    names = {r["name"] for r in rows if r["id"] in kept}
    assert {r["file"] for r in rows if r["id"] in kept} == {"test_triton.py"}
    assert names == GPU_LEAVE_OUT, f"names in conftest.GPU_LEAVE_OUT that no test has: {GPU_LEAVE_OUT - names}"


def test_sanitize_selection_is_small_native_cases_on_this_machines_device(tmp_path):
    """The sanitize stage's tests (conftest.SANITIZE_TESTS): each name is a test_native.py test,
    and the selection keeps exactly their cases on this machine's GPU, else its CPU."""
    rows, kept = _collect(tmp_path, "--sanitize-tests")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    want = {r["id"] for r in rows if r["file"] == "test_native.py" and r["name"] in SANITIZE_TESTS
            and r["device"] == device}
    assert kept == want and {r["name"] for r in rows if r["id"] in kept} == set(SANITIZE_TESTS)
    assert len(kept) <= 40  # under memcheck each kernel runs 10-100x slower: keep the stage in minutes


def test_sanitize_script_classifies_what_the_tool_says(tmp_path):
    """bench/sanitize.py with a stand-in compute-sanitizer: a refusing runtime is recorded and not
    a failure, reported errors are; on a CPU the selection runs once, plainly."""
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\ncase "$FAKE" in\n'
                    '  refuse) echo "========= Error: Device not supported"; exit 255;;\n'
                    '  errors) echo "========= ERROR SUMMARY: 3 errors"; exit 86;;\nesac\n')
    fake.chmod(0o755)
    for mode, rc, want in [("refuse", 0, "refused"), ("errors", 1, "errors: ERROR SUMMARY: 3 errors")]:
        env = {**os.environ, "FAKE": mode, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
        out = tmp_path / mode
        proc = subprocess.run([sys.executable, "bench/sanitize.py", "--device", "cuda", "--out", str(out)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == rc, proc.stdout + proc.stderr
        lines = (out / "sanitize.csv").read_text().splitlines()
        assert lines[0] == "device,tool,result,seconds" and len(lines) == 4  # one line per tool
        assert lines[1].startswith(f"cuda,memcheck,{want}"), lines
    out = tmp_path / "cpu"
    proc = subprocess.run([sys.executable, "bench/sanitize.py", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout + proc.stderr
    assert "cpu,none,ok (CPU: no sanitizer" in (out / "sanitize.csv").read_text()


def _gpu_sh(*args):
    return subprocess.run(["bash", "bench/gpu.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_gpu_sh_parses_and_refuses_bad_arguments():
    assert subprocess.run(["bash", "-n", "bench/gpu.sh"], cwd=ROOT).returncode == 0
    help_ = _gpu_sh("--help")
    assert help_.returncode == 0 and "--smoke" in help_.stdout and "--stages" in help_.stdout
    bad = _gpu_sh("--bogus")
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
    dev = _gpu_sh("--device", "tpu")
    assert dev.returncode == 2 and "--device must be cuda or cpu" in dev.stderr
