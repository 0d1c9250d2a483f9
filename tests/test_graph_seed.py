"""The graph-safe seed of SPEC section 9 (td_kernels._params.device_seed).

On the CPU: every backend takes the seed as a 0-dim int64 tensor (``dseed``: the kernels read
it themselves) and gives the same bits as with the int, forward and both backwards; a call
during CUDA graph capture raises while GRAPH_SAFE_VERIFIED is False (capture simulated).
On a GPU (``cuda`` marks): the real capture, graph replays and torch.compile's
``mode="reduce-overhead"`` draw a fresh s each step, reproducibly under torch.manual_seed, with
the flag switched on for the test; when they pass, the flag can be set True in _params.
"""
import pytest
import torch

import td_kernels as td
from td_kernels import _params, _registry, ops, reference as R
from td_kernels.training import nn as tdnn

CUDA = torch.cuda.is_available()


def _backends(device: str):
    """Backends that run here on ``device`` (Triton on CPU only under its interpreter)."""
    return _registry.available_backends(device)


def _same(a, b):
    assert a.dtype == b.dtype and torch.equal(a.view(torch.int16) if a.element_size() == 2 else a.view(torch.int32),
                                              b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32))


@pytest.mark.parametrize("backend", _backends("cpu"))
@pytest.mark.parametrize("mask", ["bits", "recompute"])
def test_tensor_seed_gives_the_int_seeds_bits(backend, mask):
    """Weight, N:M and unit targeting with ``dseed`` equal the same calls with the int seed,
    forward and gradient (the recompute backward reads the saved dseed)."""
    s = 2**40 + 2026
    w = torch.randn(5, 36, dtype=torch.bfloat16 if backend == "triton" else torch.float32)
    dseed = torch.tensor(s, dtype=torch.int64)
    g = torch.randn(w.shape).to(w.dtype)
    for kind in ("weight", "nm", "unit"):
        outs = []
        for params_seed, ds in ((s, None), (0, dseed)):
            x = w.clone().requires_grad_(True)
            if kind == "weight":
                out = ops.weight_dropout(x, _params.weight_params(params_seed, 0.5, 0.5, 36), backend, mask, dseed=ds)[0]
            elif kind == "nm":
                out = ops.nm_dropout(x, _params.nm_params(params_seed, 0.5, 36), 2, 4, backend, mask, dseed=ds)[0]
            else:
                out = ops.unit_dropout(x, _params.unit_params(params_seed, 0.5, 0.6, 5), backend, dseed=ds)[0]
            out.backward(g)
            outs.append((out.detach(), x.grad))
        (o1, g1), (o2, g2) = outs
        _same(o1, o2)
        _same(g1, g2)
        assert not torch.equal(o1, w) or kind == "unit"  # something dropped: the seed mattered


def test_tensor_seed_checked():
    w = torch.randn(4, 8)
    params = _params.weight_params(1, 0.5, 0.5, 8)
    for bad in (torch.tensor([1]), torch.tensor(1, dtype=torch.int32), 1):
        with pytest.raises(ValueError, match="dseed"):
            ops.weight_dropout(w, params, "reference", "bits", dseed=bad)


@pytest.mark.parametrize("backend", [b for b in _backends("cpu") if b != "reference"])
def test_launchers_check_tensor_seeds(backend):
    launcher = _registry.resolve(backend, torch.device("cpu"), torch.float32).weight_dropout
    with pytest.raises((ValueError, TypeError, RuntimeError), match="seed"):
        launcher(torch.randn(4, 8), torch.tensor([3]), 4, 2**31)


def test_capture_raises_until_verified(monkeypatch):
    """seed=None during (simulated) CUDA graph capture raises; an explicit seed does not (it
    means one fixed mask, by design); a training module raises (its seed advances on the host)."""
    monkeypatch.setattr(_params, "capturing", lambda w: True)
    monkeypatch.setattr(tdnn, "capturing", lambda w: True)
    assert not _params.GRAPH_SAFE_VERIFIED
    w = torch.randn(4, 8)
    for call in (lambda: td.targeted_weight_dropout(w, 0.5, 0.5),
                 lambda: td.targeted_nm_dropout(w, 0.5),
                 lambda: td.targeted_unit_dropout(w, 0.5, 0.5)):
        with pytest.raises(RuntimeError, match="CUDA graph capture"):
            call()
    td.targeted_weight_dropout(w, 0.5, 0.5, seed=3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    td.apply_targeted_dropout(model, 0.5, 0.5)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        model(torch.randn(2, 8))
    model.eval()
    model(torch.randn(2, 8))  # eval mode: identity, nothing to draw


# ---- on a GPU -----------------------------------------------------------------------------
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
GPU_BACKENDS = [b for b in ("triton", "native") if CUDA and b in _backends("cuda")]


@pytest.mark.cuda
@cuda
def test_real_capture_raises_until_verified(monkeypatch):
    monkeypatch.setattr(_params, "GRAPH_SAFE_VERIFIED", False)
    w = torch.randn(64, 256, device="cuda")
    td.targeted_weight_dropout(w, 0.5, 0.5)  # warm up outside capture
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.graph(g):
            td.targeted_weight_dropout(w, 0.5, 0.5)


def _replays(backend, mask, steps=3):
    """(s, out, grad) of each replay of one captured forward + recompute/bits backward."""
    w = torch.randn(64, 256, device="cuda")
    grad = torch.randn_like(w)
    params = _params.weight_params(0, 0.5, 0.5, 256)

    def step():
        dseed = _params.device_seed(w.device)
        out, lim, bits = ops.weight_dropout(w, params, backend, mask, dseed=dseed)
        g = ops.weight_dropout_backward(grad, w, lim, bits, params, backend, mask, dseed)
        return dseed, out, g

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (compiles Triton kernels) outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    got = []
    for _ in range(steps):
        graph.replay()
        torch.cuda.synchronize()
        got.append(tuple(t.clone() for t in static))
    return w, grad, got


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mask", ["bits", "recompute"])
def test_graph_replay_draws_fresh_seed_each_replay(backend, mask):
    """Each replay reads a new s on the device: out and grad equal the reference for that s,
    the s differ, and torch.manual_seed reproduces the sequence."""
    torch.manual_seed(5)
    w, grad, got = _replays(backend, mask)
    seeds = [int(s) for s, _, _ in got]
    assert len(set(seeds)) == len(seeds), seeds
    for s, out, g in got:
        ref, lim, _ = R.weight_dropout(w.cpu(), int(s), 128, 2**31)
        assert torch.equal(out.cpu(), ref)
        assert torch.equal(g.cpu(), R.weight_dropout_backward(grad.cpu(), w.cpu(), lim, int(s), 2**31))
    torch.manual_seed(5)
    assert [int(s) for s, _, _ in _replays(backend, mask)[2]] == seeds


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_public_call_under_graph_capture(monkeypatch, backend):
    """With the flag on, td.targeted_*_dropout(seed=None) captured in a CUDA graph gives a new
    mask at every replay, the same sequence after the same torch.manual_seed."""
    monkeypatch.setattr(_params, "GRAPH_SAFE_VERIFIED", True)

    def run():
        torch.manual_seed(11)
        w = torch.randn(32, 128, device="cuda")
        fns = (lambda: td.targeted_weight_dropout(w, 0.5, 0.5, backend=backend),
               lambda: td.targeted_nm_dropout(w, 0.5, backend=backend),
               lambda: td.targeted_unit_dropout(w, 0.5, 0.5, backend=backend))
        outs = []
        for f in fns:
            f()  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = f()
            for _ in range(3):
                graph.replay()
                outs.append(static.clone())
        return outs

    a = run()
    for i in range(0, len(a), 3):
        assert not torch.equal(a[i], a[i + 1]) or not torch.equal(a[i + 1], a[i + 2])
    assert all(torch.equal(x, y) for x, y in zip(a, run()))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_reduce_overhead_draws_fresh_masks(monkeypatch, backend):
    monkeypatch.setattr(_params, "GRAPH_SAFE_VERIFIED", True)
    torch._dynamo.reset()
    f = torch.compile(lambda w: td.targeted_weight_dropout(w, 0.5, 0.5, backend=backend) * 2, mode="reduce-overhead")

    def run():
        torch.manual_seed(3)
        w = torch.randn(32, 128, device="cuda")
        return [f(w).clone() for _ in range(5)]

    from torch._dynamo.utils import counters

    counters.clear()
    a = run()
    # inductor falls back to plain launches, silently, when it cannot graph the region (a CPU
    # tensor in it, say): then fresh masks would prove nothing about replays
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert all(not torch.equal(x, y) for x, y in zip(a, a[1:]))
    assert all(torch.equal(x, y) for x, y in zip(a, run()))


@pytest.mark.cuda
@cuda
def test_module_under_capture_raises():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
    td.apply_targeted_dropout(model, 0.5, 0.5)
    x = torch.randn(4, 64, device="cuda")
    model(x)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.graph(g):
            model(x)
