"""setup.py's failure paths, run for real: a user's `pip` building a wheel from a copy of the
sources, with a toolchain made to fail. CI's own builds only ever take the successful path.

With TD_KERNELS_BUILD_EXT unset, a CUDA build that fails (an nvcc error, or torch refusing the
toolkit) must still install the CPU kernels, and a CPU build that fails must still install the
package; TD_KERNELS_BUILD_EXT=1 must fail. Each outcome is recorded in td_kernels/_build.json,
which `td-kernels info` reads.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAKE_NVCC = """#!/bin/sh
# a CUDA toolkit whose nvcc reports release {release} and refuses to compile anything
for a in "$@"; do case "$a" in --version|-V) echo "Cuda compilation tools, release {release}, V{release}.0"; exit 0;; esac; done
echo "nvcc (fake): refusing to compile" >&2
exit 1
"""
needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="the CUDA build path needs a CUDA build of torch")


def _sources(tmp_path):
    """The files a wheel is built from, copied: the build must not touch the checkout's own."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "_build.json", "*.egg-info")
    for name in ("csrc", "td_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    return src


def _fake_toolkit(tmp_path, release):
    home = tmp_path / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(FAKE_NVCC.format(release=release))
    nvcc.chmod(0o755)
    return home


def _wheel(src, **env):
    """`pip wheel` as a user's install builds it: (exit status, output, the build record, the wheel's names)."""
    full = {**os.environ, "MAX_JOBS": "2", "PIP_NO_INDEX": "1", **env}
    if "TD_KERNELS_BUILD_EXT" not in env:
        full.pop("TD_KERNELS_BUILD_EXT", None)  # unset: the default a user gets
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                           "-w", str(src / "wheels"), str(src)], cwd=src, env=full, capture_output=True, text=True,
                          timeout=900)
    record = json.loads((src / "td_kernels" / "_build.json").read_text())
    wheels = list((src / "wheels").glob("*.whl")) if (src / "wheels").exists() else []
    names = zipfile.ZipFile(wheels[0]).namelist() if wheels else []
    return proc.returncode, proc.stdout + proc.stderr, record, names, wheels


# the test environment's own editable install of td_kernels answers for modules the wheel lacks
# (td_kernels._C): its finder goes, so that the wheel is seen as a user would see it
WHEEL_ONLY = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def _run_from_wheel(wheel, tmp_path, code):
    """Run code with the wheel's td_kernels first on the path, and only the wheel's."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    proc = subprocess.run([sys.executable, "-c", WHEEL_ONLY + code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@needs_cuda_torch
def test_a_failed_cuda_build_still_installs_the_cpu_kernels(tmp_path):
    src = _sources(tmp_path)
    toolkit = _fake_toolkit(tmp_path, torch.version.cuda)  # the version torch wants: nvcc's compile fails
    rc, out, record, names, wheels = _wheel(src, CUDA_HOME=str(toolkit))
    assert rc == 0, out[-4000:]
    assert "the CUDA kernels did not build" in out and "building the CPU kernels alone" in out
    assert record["extension"] == "built" and record["cuda"] == "failed"
    assert record["why"].startswith("the CUDA build failed (RuntimeError: Error compiling objects")
    assert "only the CPU kernels were built" in record["why"]
    assert any(n.startswith("td_kernels/_C") and n.endswith(".so") for n in names), names
    shown = _run_from_wheel(wheels[0], tmp_path, """
import torch, td_kernels as td
from td_kernels.backends import native
from td_kernels.tools import info
assert td.__file__.startswith(%r), td.__file__
assert not native.WITH_CUDA and "cuda: not built" in native.BUILD_INFO, native.BUILD_INFO
w = torch.randn(9, 70)
a = td.targeted_weight_dropout(w, 0.5, 0.5, training=True, seed=5, backend="native")
b = td.targeted_weight_dropout(w, 0.5, 0.5, training=True, seed=5, backend="reference")
assert torch.equal(a, b)
print(info.why_no_native_cuda())
""" % str(tmp_path / "site"))
    assert "the CUDA build failed" in shown


@needs_cuda_torch
def test_a_required_build_fails_on_a_toolkit_torch_refuses(tmp_path):
    src = _sources(tmp_path)
    other = f"{int(torch.version.cuda.split('.')[0]) - 1}.8"  # another major version: torch raises
    rc, out, record, names, _ = _wheel(src, CUDA_HOME=str(_fake_toolkit(tmp_path, other)), TD_KERNELS_BUILD_EXT="1")
    assert rc != 0 and not names
    assert record["extension"] == "failed" and record["cuda"] == "failed"
    assert record["error"].startswith(f"RuntimeError: The detected CUDA version ({other}) mismatches")


def test_a_failed_cpu_build_installs_without_the_extension(tmp_path):
    src = _sources(tmp_path)
    rc, out, record, names, wheels = _wheel(src, TD_KERNELS_BUILD_CUDA="0", CC="false", CXX="false")
    assert rc == 0, out[-4000:]
    assert "building the native extension failed" in out
    assert record["extension"] == "failed" and record["cuda"] == "not built" and record["error"]
    assert not any(n.startswith("td_kernels/_C") for n in names), names
    shown = _run_from_wheel(wheels[0], tmp_path, """
import torch, td_kernels as td
assert td.__file__.startswith(%r), td.__file__
assert "native" not in td.available_backends("cpu")
try:
    td.targeted_weight_dropout(torch.randn(4, 8), 0.5, 0.5, training=True, seed=1, backend="native")
except ValueError as e:
    print(e)
else:
    raise SystemExit("backend='native' without the extension did not raise")
""" % str(tmp_path / "site"))
    assert "native" in shown
