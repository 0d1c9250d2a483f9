"""`bash bench/gpu.sh --stages sanitize`: the native CUDA kernels under compute-sanitizer.

Runs `pytest --sanitize-tests tests/test_native.py` (tests/conftest.py's SANITIZE_TESTS: small
cases that reach every native CUDA kernel, each still checked bit for bit) under
compute-sanitizer's memcheck, racecheck and synccheck, one process per tool (memcheck with torch's
caching allocator off, so that an access past a tensor's end is outside any allocation), and
writes one line per tool to OUT/sanitize.csv as it finishes:

  ok          the tests passed and the tool reported nothing
  errors      the tool reported errors (exit code 86; its reports are in gpu.log)
  refused     the machine's runtime does not let the tool run (on gVisor machines it says
              "Device not supported"): recorded, not a failure
  missing     no compute-sanitizer on PATH or under CUDA_HOME: recorded, not a failure
  failed      the tests failed, or the tool hit its time limit

On a CPU there is nothing to sanitize: the same selection runs once without a tool (its CPU
cases), so that CI executes the selection and this script. Exit 1 on errors or failed.

    python bench/sanitize.py --device cuda --out DIR [--tool-limit 45]
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("memcheck", "racecheck", "synccheck")
ERRORS_RC = 86  # --error-exitcode: the tool found something (pytest never exits 86)
REFUSALS = ("Device not supported", "device is not supported", "not supported on this platform")


def find_sanitizer():
    for cand in (shutil.which("compute-sanitizer"),
                 *(os.path.join(d, "bin", "compute-sanitizer") for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda")
                   if d)):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def pytest_cmd() -> list:
    return [sys.executable, "-m", "pytest", "--sanitize-tests", "-q", "-p", "no:cacheprovider", "tests/test_native.py"]


def run(cmd: list, limit: float, env: dict) -> tuple:
    """(exit code, or None at the time limit, output), the output echoed as it comes."""
    lines = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a time limit kills the tool and pytest

    def echo():
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        rc = None
    finally:  # the time limit, or gpu.sh's SIGINT: nothing of the tool's may keep the GPU
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return rc, "".join(lines)


def classify(rc, out: str) -> str:
    if any(r in out for r in REFUSALS):
        return "refused"
    if rc == 0:
        return "ok"
    if rc == ERRORS_RC:
        summary = [l.strip("= \n") for l in out.splitlines() if "SUMMARY" in l]
        return "errors" + (f": {summary[-1]}" if summary else "")
    return "failed (time limit)" if rc is None else f"failed (exit {rc})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=".", help="folder for sanitize.csv")
    p.add_argument("--tool-limit", type=float, default=45.0, help="seconds per tool (default 45)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sanitize.csv")
    fresh = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        wr = csv.writer(f)
        if fresh:
            wr.writerow(["device", "tool", "result", "seconds"])
        failed = 0

        def record(tool, result, t0):
            nonlocal failed
            secs = time.monotonic() - t0
            print(f"sanitize: {tool:10s} {result} ({secs:.1f} s)", flush=True)
            wr.writerow([args.device, tool, result, f"{secs:.1f}"])
            f.flush()
            failed += result.startswith(("errors", "failed"))

        if args.device == "cpu":
            t0 = time.monotonic()
            rc, out = run(pytest_cmd(), args.tool_limit, dict(os.environ))
            record("none", "ok (CPU: no sanitizer; the selection ran plainly)" if rc == 0 else classify(rc, out), t0)
            return 1 if failed else 0
        tool_bin = find_sanitizer()
        for tool in TOOLS:
            t0 = time.monotonic()
            if tool_bin is None:
                record(tool, "missing (no compute-sanitizer on PATH or under CUDA_HOME)", t0)
                continue
            env = dict(os.environ, **({"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {}))
            cmd = [tool_bin, "--tool", tool, "--error-exitcode", str(ERRORS_RC), "--print-limit", "20"] + pytest_cmd()
            rc, out = run(cmd, args.tool_limit, env)
            result = classify(rc, out)
            record(tool, result, t0)
            if result == "refused":  # the runtime, not the tool: the others would say the same
                for rest in TOOLS[TOOLS.index(tool) + 1:]:
                    record(rest, "refused (as the first tool)", time.monotonic())
                break
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
