"""Backend "native" (td_kernels._C) against the reference, bit for bit (SPEC.md section 10).

Skipped as a whole when the extension is not built. CUDA cases run only where torch sees a
GPU and the extension was built with CUDA.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

native = pytest.importorskip(
    "td_kernels.native",
    reason="native extension td_kernels._C not built (pip install --no-build-isolation -e .)")

import td_kernels as td  # noqa: E402
from td_kernels import reference as R  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
          torch.float64: torch.int64}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and native.WITH_CUDA else [])


def assert_bits(a: torch.Tensor, b: torch.Tensor):
    """Equal bit patterns (so +0 vs -0 and NaN payloads count)."""
    assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    ai, bi = a.cpu().view(INT_OF[a.dtype]), b.cpu().view(INT_OF[b.dtype])
    bad = (ai != bi).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} of {a.numel()} differ, first at {bad[0].tolist()}: " \
                             f"{a.cpu()[tuple(bad[0])]} vs {b.cpu()[tuple(bad[0])]}"


def check_weight(w, seed, targ, drop, device="cpu"):
    U, F = w.shape
    k, D = R.count(targ, F), R.drop_threshold(drop)
    ref_out, ref_limit = R.weight_dropout(w, seed, k, D)
    out, limit = native.weight_dropout(w.to(device), seed, k, D)
    assert limit.dtype == torch.int32 and limit.shape == (U,)
    assert torch.equal(limit.cpu(), ref_limit), (limit, ref_limit)
    assert_bits(out.cpu(), ref_out)
    g = torch.randn(U, F, generator=torch.Generator().manual_seed(seed % 1000)).to(w.dtype)
    ref_g = R.weight_dropout_backward(g, w, ref_limit, seed, D)
    assert_bits(native.weight_dropout_backward(g.to(device), w.to(device), limit, seed, D).cpu(), ref_g)


def check_unit(w, seed, targ, drop, device="cpu"):
    U = w.shape[0]
    k, D = R.count(targ, U), R.drop_threshold(drop)
    ref_out, ref_keep = R.unit_dropout(w, seed, k, D)
    out, keep = native.unit_dropout(w.to(device), seed, k, D)
    assert keep.dtype == torch.bool and torch.equal(keep.cpu(), ref_keep)
    assert_bits(out.cpu(), ref_out)
    g = torch.randn(w.shape).to(w.dtype)
    assert_bits(native.unit_dropout_backward(g.to(device), keep).cpu(), R.unit_dropout_backward(g, ref_keep))


def distinct_norm_rows(U, F, dtype, seed):
    """Rows whose L2 norms are (a permutation of) 1..U: far apart at any threshold, so float32
    accumulation order cannot reorder them (SPEC section 10's 1e-6 exception never arises)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(U, F, generator=gen, dtype=torch.float64)
    scale = (torch.randperm(U, generator=gen) + 1).to(torch.float64)
    return (w / w.norm(dim=1, keepdim=True) * scale[:, None]).to(dtype)


# ---- fixed cases -------------------------------------------------------------------------------
def test_registered():
    assert "native" in td.available_backends("cpu")
    assert td.available_backends("cpu")[0] == "native"


@pytest.mark.parametrize("device", DEVICES)
def test_spec_worked_example(device):
    W = torch.tensor([[0.5, -1.25, 2.0, -0.125, 3.5, 0.75, -0.25, 1.5],
                      [-2.5, 0.375, -0.0625, 1.0, -3.0, 0.875, 2.25, -0.625],
                      [1.75, -0.5, 0.25, -1.5, 0.0, 2.75, -0.875, 0.125]])
    out, _ = native.weight_dropout(W.to(device), 7, R.count(0.5, 8), R.drop_threshold(0.5))
    want = W.clone()
    want[0, [3, 6]] = 0
    want[1, [1, 5, 7]] = 0
    assert_bits(out.cpu(), want)
    out, keep = native.unit_dropout(W.to(device), 11, R.count(0.67, 3), R.drop_threshold(0.5))
    assert keep.cpu().tolist() == [True, True, False]
    assert_bits(out.cpu(), torch.cat([W[:2], torch.zeros(1, 8)]))


SHAPES = [(1, 1), (1, 7), (5, 1), (3, 5), (7, 300), (33, 257), (4, 4099), (64, 1024)]
RATES = [(0.0, 0.5), (1.0, 0.5), (0.5, 0.0), (0.5, 1.0), (0.3, 0.7), (1.0, 1.0), (0.29, 0.5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weight_matches_reference(shape, dtype, device):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    for targ, drop in RATES:
        check_weight(w, 2026 + shape[1], targ, drop, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3), (2, 9), (7, 300), (40, 33), (300, 5)], ids=str)
def test_unit_matches_reference(shape, dtype, device):
    w = distinct_norm_rows(*shape, dtype, seed=shape[0])
    for targ, drop in RATES:
        check_unit(w, 99 + shape[0], targ, drop, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_zeros_nan_inf(dtype, device):
    gen = torch.Generator().manual_seed(5)
    U, F = 16, 203
    vals = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0])
    w = vals[torch.randint(0, len(vals), (U, F), generator=gen)]
    w[3] = 0.0                      # an all-zero row: every key ties
    w[4] = -0.0
    w[5, ::7] = float("inf")        # inf and NaN rank at the top: not candidates while
    w[6, ::9] = float("-inf")       # fewer than F - k of them, thresholds among them otherwise
    w[7, 1::11] = float("nan")
    w[8, :3] = float("nan")
    w = w.to(dtype)
    for targ, drop in [(0.5, 0.5), (0.25, 1.0), (0.9, 0.6), (1.0, 0.5), (0.0, 1.0), (0.97, 1.0)]:
        check_weight(w, 17, targ, drop, device)


@pytest.mark.parametrize("device", DEVICES)
def test_unit_nan_inf_norms(device):
    w = distinct_norm_rows(9, 50, torch.float32, seed=3)
    w[2, 4] = float("nan")
    w[6, 0] = float("inf")
    for targ in [0.2, 0.5, 0.8, 1.0]:
        check_unit(w, 8, targ, 0.7, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("F", [31, 35, 36, 95, 96, 99, 131, 193, 291])
def test_fused_apply_tile_edges(F, dtype, device):
    """The CPU apply loop (AVX2 where present) goes scalar to a 4-aligned position, then 96-
    and 32-position register tiles, then scalar again; odd F puts every row at another offset
    mod 4, and a seed with both 32-bit halves set exercises every key word."""
    w = torch.randn(5, F, generator=torch.Generator().manual_seed(F)).to(dtype)
    for targ, drop in [(0.5, 0.3), (0.8, 0.9), (1.0, 1.0), (0.5, 1.0)]:
        check_weight(w, 0x9E3779B97F4A7C15 >> 1, targ, drop, device)


@pytest.mark.parametrize("device", DEVICES)
def test_long_row(device):
    w = torch.randn(1, 10**6, generator=torch.Generator().manual_seed(1))
    check_weight(w, 123456789, 0.3, 0.5, device)


# ---- unit norms: squares summed in float64, rounded once to float32 (reference.unit_norms) ----
def _old_float32_norm(row: torch.Tensor) -> float:
    """The norm as td_cpu.cpp summed it before float64: 8 sequential float32 partial sums."""
    sq = (row * row).numpy().reshape(-1, 8)
    acc = np.add.accumulate(sq, axis=0, dtype=np.float32)[-1]
    return float(np.sqrt(((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))))


@pytest.mark.parametrize("device", DEVICES)
def test_unit_long_rows_rank_like_the_reference(device):
    """2 x 2**22: row 1's norm lies 5e-6 relative below row 0's (SPEC's 1e-6 exception does not
    apply), so with targ_rate 0.5 and drop_rate 1 every backend must drop row 1 only. The rows
    are equal magnitudes with random signs: float32 running sums stall there, and the old
    float32 accumulation tied the two rows (dropping nothing); float64 sums rank them."""
    F = 2**22
    gen = torch.Generator().manual_seed(22)
    signs = torch.where(torch.rand(2, F, generator=gen) < 0.5, -1.0, 1.0)
    a = 1.1
    w = signs * torch.tensor([[a], [a * (1 - 5e-6)]], dtype=torch.float32)
    n = R.unit_norms(w).double()
    assert 4.9e-6 < 1 - float(n[1] / n[0]) < 5.1e-6
    assert _old_float32_norm(w[1]) >= _old_float32_norm(w[0])  # the case discriminates
    for rows, want in (([0, 1], [True, False]), ([1, 0], [False, True])):
        x = w[rows]
        _, keep = native.unit_dropout(x.to(device), 5, R.count(0.5, 2), R.drop_threshold(1.0))
        assert keep.cpu().tolist() == want
        assert R.unit_dropout(x, 5, 1, 2**32)[1].tolist() == want
    check_unit(w[:, :2**20].contiguous(), 5, 0.5, 1.0, device)  # the whole output, shorter rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e19, 1e-25])
def test_unit_huge_and_tiny_rows(scale, dtype, device):
    """Squares of 1e30 overflow float32 and those of 1e-30 underflow it; float64 sums keep the
    norms finite, nonzero and ordered (float32 sums gave inf or 0 for both rows: a tie)."""
    w = torch.full((3, 1000), scale)
    w[1] *= 2
    w[2] *= 1.5
    w[:, ::3] *= -1
    w = w.to(dtype)
    n = R.unit_norms(w)
    assert bool(torch.isfinite(n).all()) and bool((n > 0).all()) and n[0] < n[2] < n[1]
    for targ in (0.34, 0.67, 1.0):
        check_unit(w, 77, targ, 1.0, device)
    _, keep = native.unit_dropout(w.to(device), 77, R.count(0.67, 3), 2**32)
    assert keep.cpu().tolist() == [False, True, False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unit_nan_norms_tie(dtype, device):
    """Rows holding NaNs of different payloads: every NaN norm is the canonical NaN (which
    payload a sum propagates depends on its order), so they tie above +inf and with k = 2 of 4
    only the finite row is a candidate."""
    w = torch.randn(4, 100, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    payloads = {torch.float64: [0x7FF8000000000001, 0x7FF4000000000000, -0x0008000000012345],
                torch.float32: [0x7FC00001, 0x7FA00000, -0x003EDCBB]}
    bits = torch.tensor(payloads[torch.float64 if dtype == torch.float64 else torch.float32])
    nans = bits.view(torch.float64) if dtype == torch.float64 else bits.to(torch.int32).view(torch.float32)
    w = w.to(dtype)
    for u, j in ((1, 3), (2, 50), (3, 99)):
        w[u, j] = nans[u - 1].to(dtype)
        w[u, (j * 7) % 100] = nans[3 - u].to(dtype)
    _, keep = native.unit_dropout(w.to(device), 1, 2, 2**32)
    assert keep.cpu().tolist() == [False, True, True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_subnormal_and_huge_float64(device):
    # float64 values whose float32 rounding is subnormal, zero or inf
    w = torch.tensor([[1e-40, -3e-39, 1e-46, 4e38, -1e300, 1e-300, 0.5, 2.0, -1e-45, 7e-39]], dtype=torch.float64)
    for targ in [0.1, 0.3, 0.5, 0.7]:
        check_weight(w, 3, targ, 1.0, device)


def test_thread_count_does_not_change_bits():
    w = torch.randn(5, 70000)  # few long rows: the two-phase path
    w2 = torch.randn(300, 700)  # many rows: the fused path
    old = torch.get_num_threads()
    try:
        res = []
        for n in (1, 2):
            torch.set_num_threads(n)
            res.append([native.weight_dropout(x, 9, x.shape[1] // 3, 2**31)[0] for x in (w, w2)])
        for a, b in zip(*res):
            assert_bits(a, b)
    finally:
        torch.set_num_threads(old)


def test_public_api_and_autograd():
    w = torch.randn(12, 3, 3, 3, requires_grad=True)
    for fn in (td.targeted_weight_dropout, td.targeted_unit_dropout):
        outs, grads = [], []
        for backend in ("native", "reference"):
            y = fn(w, 0.5, 0.4, seed=42, backend=backend)
            (g,) = torch.autograd.grad((y * torch.arange(y.numel()).view_as(y)).sum(), w)
            outs.append(y.detach())
            grads.append(g)
        assert_bits(*outs)
        assert_bits(*grads)
    assert_bits(td.prune_weights(w.detach(), 0.5, backend="native"), td.prune_weights(w.detach(), 0.5, backend="reference"))


def test_fake_kernels_and_schemas():
    w = torch.randn(6, 10)
    D = R.drop_threshold(0.5)
    _, limit = native.weight_dropout(w, 1, 3, D)
    _, keep = native.unit_dropout(w, 1, 3, D)
    ops = torch.ops.td_kernels_native
    for op, args in [(ops.weight_dropout, (w, 1, 3, D)), (ops.weight_dropout_backward, (w, w, limit, 1, D)),
                     (ops.unit_dropout, (w, 1, 3, D)), (ops.unit_dropout_backward, (w, keep))]:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


# ---- bad input -> ValueError / TypeError naming the argument --------------------------------
def test_errors_name_the_argument():
    w = torch.randn(4, 6)
    D = 2**31
    with pytest.raises(ValueError, match="w must be contiguous"):
        native.weight_dropout(w.t(), 1, 2, D)
    with pytest.raises(ValueError, match="w must have 2 dimensions"):
        native.weight_dropout(w.view(-1), 1, 2, D)
    with pytest.raises(TypeError, match="w must be float16"):
        native.weight_dropout(w.to(torch.int32), 1, 2, D)
    with pytest.raises(ValueError, match="k must be in"):
        native.weight_dropout(w, 1, 7, D)
    with pytest.raises(ValueError, match="k must be in"):
        native.unit_dropout(w, 1, 5, D)
    with pytest.raises(ValueError, match="drop_threshold"):
        native.weight_dropout(w, 1, 2, 2**32 + 1)
    with pytest.raises(ValueError, match="seed"):
        native.weight_dropout(w, -1, 2, D)
    _, limit = native.weight_dropout(w, 1, 2, D)
    with pytest.raises(TypeError, match="limit must be Int"):
        native.weight_dropout_backward(w, w, limit.long(), 1, D)
    with pytest.raises(ValueError, match="limit must have shape"):
        native.weight_dropout_backward(w, w, limit[:2], 1, D)
    with pytest.raises(ValueError, match="grad must have w's shape"):
        native.weight_dropout_backward(w[:2], w, limit, 1, D)
    with pytest.raises(TypeError, match="grad must be"):
        native.weight_dropout_backward(w.double(), w, limit, 1, D)
    with pytest.raises(TypeError, match="keep must be Bool"):
        native.unit_dropout_backward(w, torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="keep must have shape"):
        native.unit_dropout_backward(w, torch.ones(3, dtype=torch.bool))


# ---- randomized --------------------------------------------------------------------------
@st.composite
def weights(draw):
    U = draw(st.integers(1, 24))
    F = draw(st.integers(1, 500))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**63 - 1))
    gen = torch.Generator().manual_seed(seed % 2**32)
    w = torch.randn(U, F, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if draw(st.booleans()):  # many ties
        w = torch.round(w * 2) / 2
    return w.to(dtype), seed


rates = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weights(), rates, rates)
def test_weight_random(ws, targ, drop):
    w, seed = ws
    check_weight(w, seed, targ, drop)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 40), st.integers(1, 300), st.sampled_from(DTYPES), st.integers(0, 2**63 - 1), rates, rates)
def test_unit_random(U, F, dtype, seed, targ, drop):
    w = distinct_norm_rows(U, F, dtype, seed % 2**32)
    norms = R.unit_norms(w).double()
    srt = norms.sort().values
    assume(bool(((srt[1:] - srt[:-1]) > 1e-5 * srt[1:]).all()) if U > 1 else True)
    assert not math.isnan(float(norms.sum()))
    check_unit(w, seed, targ, drop)
