"""pytest-benchmark suite over the same providers as td_kernels.tools.bench.ops:

    pytest bench/ --benchmark-only [--benchmark-max-time=0.2] [--benchmark-json=out.json]

One weight (TD_BENCH_SHAPE, default 4096x4096 on CUDA, 1024x1024 on CPU; TD_BENCH_DTYPE, default
float32) per provider x op x mode. Each benchmark's extra_info carries the bytes the op must move
and the GB/s at the median. On CUDA every call synchronizes (pytest-benchmark times on the host
and does not flush L2); `python -m td_kernels.tools.bench.ops` is the authoritative harness.
"""
import os

import pytest
import torch

from td_kernels.tools.bench import ops as tb

DEVICE = torch.device(os.environ.get("TD_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
SHAPE = tb.parse_shape(os.environ.get("TD_BENCH_SHAPE", "4096x4096" if DEVICE.type == "cuda" else "1024x1024"))
DTYPE = tb.DTYPES[os.environ.get("TD_BENCH_DTYPE", "float32")]


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=gen).to(DEVICE, DTYPE).requires_grad_()
    g = torch.randn(SHAPE, generator=gen).to(DEVICE, DTYPE)
    return w, g


@pytest.mark.parametrize("mode", tb.MODES)
@pytest.mark.parametrize("op", tb.OPS)
@pytest.mark.parametrize("provider", tb.provider_names(DEVICE))
def test_bench(benchmark, tensors, provider, op, mode):
    w, g = tensors
    fn = tb.make_bench_fn(provider, op, mode, w, g, 0.5, 0.5)
    if DEVICE.type == "cuda":
        def call():
            fn()
            torch.cuda.synchronize()
    else:
        call = fn
    U, N = SHAPE[0], w.numel()
    nbytes = tb.copy_bytes(mode, N, w.element_size()) if provider == "clone" else \
        tb.op_bytes(op, mode, U, N // U, w.element_size())
    benchmark.group = f"{op} {mode} {'x'.join(map(str, SHAPE))} {str(DTYPE).replace('torch.', '')} {DEVICE.type}"
    benchmark.extra_info.update(bytes=nbytes, device=tb.device_name(DEVICE), threads=torch.get_num_threads())
    if provider == "reference" and DEVICE.type == "cpu":  # about a second a call: a few rounds
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(call)
    benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
