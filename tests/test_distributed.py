"""Sharded weights (SPEC section 12): DTensor results against the single process, bit for bit.

ONE group of 2 processes (gloo, CPU, FileStore) runs every check of tests/dist_worker.py; each
check is one test item here, failing with the children's tracebacks. Checks per backend run on
every backend available on CPU; a backend whose launchers raise NotImplementedError for what
the sharded path needs (windows, given limits, bit masks) is skipped with that reason, so the
checks cover it as soon as it implements them."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import dist_worker  # noqa: E402
import oracle  # noqa: E402

from td_kernels import distributed  # noqa: E402
from td_kernels import reference as R  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 300


class Run:
    """Runs ``worker`` (a script whose ``__main__`` calls ``dist_worker.main``) on 2 processes in
    ``tmp`` and collects each rank's results, exit code and output."""

    def __init__(self, tmp: Path, worker: Path = WORKER):
        out = tmp / "result"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0, self.started = time.perf_counter(), time.time()
        logs = [open(tmp / f"rank{r}.log", "w+") for r in range(dist_worker.WORLD)]
        procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(tmp / "store"), str(out)],
                                  stdout=logs[r], stderr=subprocess.STDOUT, env=env, cwd=worker.parent)
                 for r in range(dist_worker.WORLD)]
        self.codes = []
        for p in procs:
            try:
                self.codes.append(p.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - t0))))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                self.codes.append(f"killed after {TIMEOUT_S} s")
        self.seconds = time.perf_counter() - t0
        self.logs = []
        for f in logs:
            f.seek(0)
            self.logs.append(f.read())
            f.close()
        self.results = []
        for r in range(dist_worker.WORLD):
            path = Path(f"{out}.{r}.json")
            self.results.append(__import__("json").loads(path.read_text()) if path.exists() else {})

    def why_missing(self, r):
        return f"rank {r} exited with {self.codes[r]}; its output ends with:\n{self.logs[r][-3000:]}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run(tmp_path_factory.mktemp("dist"))


def expect_passed(run: Run, name: str) -> None:
    """Fails (with both ranks' tracebacks, or the output of a rank that died) unless check
    ``name`` passed on every rank; skips if it skipped on every rank."""
    got = [res.get(name) for res in run.results]
    for r, g in enumerate(got):
        if g is None:
            pytest.fail(f"check {name!r} did not run on rank {r}: {run.why_missing(r)}", pytrace=False)
    fails = [f"--- rank {r}:\n{g['detail']}" for r, g in enumerate(got) if g["status"] == "fail"]
    if fails:
        pytest.fail(f"check {name!r} failed:\n" + "\n".join(fails), pytrace=False)
    statuses = {g["status"] for g in got}
    assert statuses in ({"pass"}, {"skip"}), f"ranks disagree on {name!r}: {got}"
    if statuses == {"skip"}:
        pytest.skip(got[0]["detail"])


def expect_clean_exit(run: Run, names) -> None:
    """Every rank exited 0; prints the group's wall time, start-up and slowest ``names``."""
    assert run.codes == [0] * dist_worker.WORLD, "\n".join(run.why_missing(r) for r in range(dist_worker.WORLD))
    checks = {n: v for n, v in run.results[0].items() if n in names}
    print(f"\n2-process group: {run.seconds:.1f} s wall, of which start-up (interpreter, imports) "
          f"{run.results[0]['__imported__']['s'] - run.started:.1f} s and checks {sum(v['s'] for v in checks.values()):.1f} s;"
          " slowest checks: " + ", ".join(f"{n} {v['s']:.2f}s" for n, v in sorted(checks.items(), key=lambda kv: -kv[1]["s"])[:5]))


@pytest.mark.parametrize("name", list(dist_worker.CHECKS))
def test_sharded(run, name):
    expect_passed(run, name)


def test_group_exits_cleanly(run):
    expect_clean_exit(run, dist_worker.CHECKS)


# ---- the selection without a group: the radix select itself, against the reference ---------
@given(shape=st.sampled_from([(1, 1), (1, 2), (3, 7), (5, 33), (2, 300), (4, 3, 3, 3)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       style=st.sampled_from(oracle.STYLES), data_seed=st.integers(0, 2**32 - 1), targ_rate=st.floats(0, 1))
@settings(max_examples=60)
def test_radix_limits_match_reference(shape, dtype, style, data_seed, targ_rate):
    """With no process group the radix select is a local selection: it must find exactly the
    reference's limits (ties, +-0, NaN payloads, inf, every dtype's key widening)."""
    w2d = oracle.make_weight(shape, dtype, style, data_seed).reshape(shape[0], -1)
    F = w2d.shape[1]
    k = R.count(targ_rate, F)
    if not 0 < k < F:
        k = max(1, min(F - 1, k))
        if not 0 < k < F:
            return  # F == 1: no selection to make
    got = distributed._radix_limits(w2d, k, F, [])
    assert got.dtype == torch.int32
    assert torch.equal(got, R.weight_limits(w2d, k))
