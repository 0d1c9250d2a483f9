"""td-kernels info: the bug-report block."""
import json
import os
import subprocess
import sys

import pytest
import torch

import td_kernels as td
from td_kernels import _registry
from td_kernels.tools import cli
from td_kernels.tools.info import collect, format_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_names_versions_devices_backends_build_and_threads(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"td_kernels: {td.__version__}" in out
    assert f"torch: {torch.__version__}" in out
    assert "triton:" in out and "devices: cpu" in out and "native extension:" in out
    assert f"torch intra-op {torch.get_num_threads()}" in out
    for name in _registry.known_backends():
        assert f"  {name}:" in out
    assert "reference:\n    cpu: available" in out
    picked = _registry.available_backends("cpu")[0]
    assert f"cpu={picked}" in out


def test_an_unavailable_backend_says_why_and_how(monkeypatch):
    monkeypatch.delitem(_registry._BACKENDS, "triton", raising=False)
    monkeypatch.setitem(_registry._UNAVAILABLE, "triton", "Triton could not be imported (boom); install it with `pip`")
    text = format_info()
    assert "triton:\n    cpu: unavailable: Triton could not be imported (boom); install it with `pip`" in text


def test_native_build_info_is_read_when_the_extension_has_it(monkeypatch):
    try:
        from td_kernels import _C
    except ImportError:
        assert "not loaded" in collect()["native extension"]
        return
    monkeypatch.setattr(_C, "BUILD_INFO", {"cuda": "12.8", "arches": "sm_80;sm_90"}, raising=False)
    assert collect()["native extension"] == "cuda=12.8, arches=sm_80;sm_90"


def test_python_m_td_kernels_info_json():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "td_kernels", "info", "--json"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["torch"].startswith(torch.__version__)
    assert [b[0] for b in info["backends"]] == list(_registry.known_backends())


def test_info_says_why_native_cuda_is_missing(monkeypatch):
    """setup.py's build record (td_kernels/_build.json) becomes the reason, whichever it was."""
    from td_kernels.tools import info

    native = pytest.importorskip("td_kernels.backends.native")
    monkeypatch.setattr(native, "WITH_CUDA", False)
    for record, expected in [
            ({"extension": "built", "cuda": "not built", "why": "torch 2.13.0+cpu is a CPU-only build"},
             "torch 2.13.0+cpu is a CPU-only build"),
            ({"extension": "built", "cuda": "not built", "why": "no nvcc at build time (CUDA_HOME=unset, none on PATH)"},
             "no nvcc at build time"),
            ({"extension": "failed", "cuda": "failed", "why": "the build failed", "error": "CompileError: boom\nmore"},
             "the build failed; its error: CompileError: boom"),
            ({"extension": "built", "cuda": "built"}, "stale td_kernels/_C"),
            (None, "no build record")]:
        monkeypatch.setattr(info, "build_record", lambda r=record: r)
        assert expected in info.why_no_native_cuda()
        assert expected in info.collect()["native CUDA kernels"]
        assert expected in dict(info.collect()["backends"])["native"]["cuda"]
        assert info.native_cuda_problems() == [f"no CUDA kernels: {info.why_no_native_cuda()}"]
        assert cli.main(["info", "--require-native-cuda"]) == 1


def test_require_native_cuda_checks_every_op_on_a_cuda_build(monkeypatch):
    from td_kernels.tools import info

    native = pytest.importorskip("td_kernels.backends.native")
    monkeypatch.setattr(native, "WITH_CUDA", True)
    monkeypatch.setattr(native, "BUILD_INFO", "cpu: x; cuda: sm_80 (+compute_90 PTX)")
    problems = info.native_cuda_problems()
    assert f"BUILD_INFO names no sm_90: {native.BUILD_INFO}" in problems
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("td_kernels_native::weight_dropout", "CUDA")
    assert ("td_kernels_native::weight_dropout has no CUDA kernel" in problems) == (not has_cuda)
