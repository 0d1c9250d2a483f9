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
    "td_kernels.backends.native",
    reason="native extension td_kernels._C not built (pip install --no-build-isolation -e .)")

import oracle  # noqa: E402
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


def assert_words(bits: torch.Tensor, ref: torch.Tensor):
    """A bit-packed keep mask equal to reference.pack_bits's words (padding bits included)."""
    assert bits is not None and bits.dtype == torch.int32 and bits.shape == ref.shape, (bits, ref.shape)
    assert torch.equal(bits.cpu(), ref), f"{int((bits.cpu() != ref).sum())} mask words differ"


def grad_like(w, seed):
    return torch.randn(w.shape, generator=torch.Generator().manual_seed(seed % 1000)).to(w.dtype)


def check_weight(w, seed, targ, drop, device="cpu", window=None):
    """Forward (with and without bits, and with the limits given back), both backwards: all
    bit for bit against the reference. On CUDA the forward runs once per variant (two-pass and
    fused, whose rows over 32 KB fall back to two-pass): backend="auto" may take either there."""
    U, F = w.shape
    k, D = R.count(targ, F), R.drop_threshold(drop)
    ref_out, ref_limit, ref_bits = R.weight_dropout(w, seed, k, D, window=window, bits=True)
    wd = w.to(device)
    for variant in native.WEIGHT_FORWARDS if wd.is_cuda else (None,):  # the CPU has one algorithm
        out, limit, bits = native.weight_dropout(wd, seed, k, D, window=window, bits=True, variant=variant)
        assert limit.dtype == torch.int32 and limit.shape == (U,)
        assert torch.equal(limit.cpu(), ref_limit), (variant, limit, ref_limit)
        assert_bits(out.cpu(), ref_out)
        assert_words(bits, ref_bits)
        out_nobits, _limit, none = native.weight_dropout(wd, seed, k, D, window=window, variant=variant)
        assert none is None
        assert_bits(out_nobits.cpu(), ref_out)
    out2, limit2, none = native.weight_dropout(wd, seed, k, D, window=window, limit=limit)  # no selection
    assert none is None and limit2.data_ptr() != limit.data_ptr() and torch.equal(limit2, limit)
    assert_bits(out2.cpu(), ref_out)
    g = grad_like(w, seed)
    ref_g = R.weight_dropout_backward(g, w, ref_limit, seed, D, window=window)
    gd = g.to(device)
    assert_bits(native.weight_dropout_backward(gd, wd, limit, seed, D, window=window).cpu(), ref_g)
    assert_bits(native.weight_dropout_backward(gd, None, None, seed, D, window=window, bits=bits).cpu(), ref_g)


def check_nm(w, seed, n, m, drop, device="cpu", window=None):
    D = R.drop_threshold(drop)
    ref_out, ref_bits = R.nm_dropout(w, seed, n, m, D, window=window, bits=True)
    wd = w.to(device)
    out, bits = native.nm_dropout(wd, seed, n, m, D, window=window, bits=True)
    assert_bits(out.cpu(), ref_out)
    assert_words(bits, ref_bits)
    out2, none = native.nm_dropout(wd, seed, n, m, D, window=window)
    assert none is None
    assert_bits(out2.cpu(), ref_out)
    g = grad_like(w, seed)
    ref_g = R.nm_dropout_backward(g, w, seed, n, m, D, window=window)
    gd = g.to(device)
    assert_bits(native.nm_dropout_backward(gd, wd, seed, n, m, D, window=window).cpu(), ref_g)
    assert_bits(native.nm_dropout_backward(gd, None, seed, n, m, D, window=window, bits=bits).cpu(), ref_g)


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
    out, _, bits = native.weight_dropout(W.to(device), 7, R.count(0.5, 8), R.drop_threshold(0.5), bits=True)
    want = W.clone()
    want[0, [3, 6]] = 0
    want[1, [1, 5, 7]] = 0
    assert_bits(out.cpu(), want)
    assert bits.cpu().tolist() == [[0b10110111], [0b01011101], [0b11101111]]  # row 2: its 0.0 drops
    out, keep = native.unit_dropout(W.to(device), 11, R.count(0.67, 3), R.drop_threshold(0.5))
    assert keep.cpu().tolist() == [True, True, False]
    assert_bits(out.cpu(), torch.cat([W[:2], torch.zeros(1, 8)]))


@pytest.mark.parametrize("device", DEVICES)
def test_spec_nm_example(device):
    w = torch.tensor([[0.5, 0.1, -0.5, 2.0, 0.0, 3.0, -3.0, 1.0]])
    out, bits = native.nm_dropout(w.to(device), 0, 2, 4, R.drop_threshold(1.0), bits=True)
    assert_bits(out.cpu(), torch.tensor([[0, 0, -0.5, 2.0, 0, 3.0, -3.0, 0]]))
    assert bits.cpu().tolist() == [[0b01101100]]


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
    check_weight(w, 0x9E3779B97F4A7C15 >> 1, 0.5, 0.3, device, window=R.Window(1, F + 2))  # rows at every offset


@pytest.mark.parametrize("device", DEVICES)
def test_long_row(device):
    """One row of 10**6: the selection's levels on a long row, the row cut into pieces (each
    owning whole mask words), a window at an odd origin."""
    w = torch.randn(1, 10**6, generator=torch.Generator().manual_seed(1))
    check_weight(w, 123456789, 0.3, 0.5, device, window=R.Window(5, 10**6 + 11))


# ---- windows (SPEC section 12), given limits, N:M (section 11) -------------------------------
# (first global row r0, first global column c0, row_stride - F): aligned and unaligned row
# starts, gaps between rows, and positions past 2**34 (the Philox counter's high word)
WINDOWS = [(0, 0, 0), (0, 1, 1), (2, 3, 5), (1, 6, 7), (2**28, 2, 3), (2**26 + 1, 63, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r0,c0,extra", WINDOWS, ids=str)
def test_window_matches_reference(r0, c0, extra, dtype, device):
    for U, F in ((3, 37), (2, 200), (4, 64)):
        w = torch.randn(U, F, generator=torch.Generator().manual_seed(F + r0 % 97 + c0)).to(dtype)
        window = R.Window(r0 * (F + extra) + c0, F + extra)
        for targ, drop in ((0.5, 0.5), (0.3, 1.0), (1.0, 0.7)):
            check_weight(w, 31 + F, targ, drop, device, window=window)
        if F % 4 == 0:
            check_nm(w, 77, 2, 4, 0.6, device, window=window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_window_block_of_a_global_weight(dtype, device):
    """A block (rows 1.., columns 3..F-2) with the global limits and its window gives the same
    values and mask bits as the same slice of the whole weight (SPEC section 12)."""
    Ug, Fg = 5, 301
    wg = torch.randn(Ug, Fg, generator=torch.Generator().manual_seed(8)).to(dtype)
    seed, k, D = 2**40 + 17, R.count(0.4, Fg), R.drop_threshold(0.6)
    out_g, lim_g, bits_g = native.weight_dropout(wg.to(device), seed, k, D, bits=True)
    r0, c0, c1 = 1, 3, Fg - 2
    blk = wg[r0:, c0:c1].contiguous().to(device)
    out_b, lim_b, bits_b = native.weight_dropout(blk, seed, 0, D, window=R.Window(r0 * Fg + c0, Fg),
                                                 limit=lim_g[r0:].contiguous(), bits=True)
    assert_bits(out_b.cpu(), out_g.cpu()[r0:, c0:c1].contiguous())
    assert torch.equal(lim_b, lim_g[r0:])
    assert torch.equal(R.unpack_bits(bits_b.cpu(), c1 - c0), R.unpack_bits(bits_g.cpu(), Fg)[r0:, c0:c1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_given_limits(dtype, device):
    """Any int32 limits (none, all, in between, NaN-range keys): used as given, no selection."""
    U, F = 6, 150
    w = oracle.make_weight((U, F), dtype, "special", 3)
    keys = R.rank_keys(w)
    lim = torch.tensor([-1, 0x7FFFFFFF, int(keys[2, 7]), int(keys[3, 0]) - 1, 0x7F800000, 0x7FC00000],
                       dtype=torch.int32)
    for drop in (0.5, 1.0, 0.0):
        D = R.drop_threshold(drop)
        for window in (None, R.Window(13 * (F + 2) + 1, F + 2)):
            ref_out, ref_lim, ref_bits = R.weight_dropout(w, 5, 0, D, window=window, limit=lim, bits=True)
            out, got_lim, bits = native.weight_dropout(w.to(device), 5, 0, D, window=window,
                                                       limit=lim.to(device), bits=True)
            assert torch.equal(got_lim.cpu(), lim)
            assert_bits(out.cpu(), ref_out)
            assert_words(bits, ref_bits)


NM = [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 3), (5, 16), (1, 5), (15, 16), (3, 7), (6, 9)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", NM, ids=str)
def test_nm_matches_reference(n, m, dtype, device):
    for U, groups, style in ((3, 1, "normal"), (2, 37, "ties"), (5, 13, "special"), (1, 300, "normal")):
        w = oracle.make_weight((U, groups * m), dtype, style, n * 100 + m)
        for drop in (0.5, 1.0):
            check_nm(w, 2026 + m, n, m, drop, device)


@pytest.mark.parametrize("device", DEVICES)
def test_nm_long_rows_and_pieces(device):
    """Rows longer than one parallel piece (32 * m-column aligned pieces), m not a power of 2."""
    for n, m in ((2, 3), (5, 16)):
        F = 70000 // (32 * m) * (32 * m) + 5 * m  # > 32768: two or more pieces, the last one partial
        w = torch.randn(2, F, generator=torch.Generator().manual_seed(m))
        check_nm(w, 99, n, m, 0.5, device, window=R.Window(7, F + 8))


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
    """1 and 2 threads: the same values and mask words from every entry point, on few long rows
    (selection per row, then pieces across threads) and many short ones (select and apply per
    row), with and without windows."""
    w = torch.randn(5, 70000)
    w2 = torch.randn(300, 700)
    win = R.Window(2 * 70005 + 3, 70005)
    old = torch.get_num_threads()
    try:
        res = []
        for n in (1, 2):
            torch.set_num_threads(n)
            r = []
            for x, window in ((w, None), (w2, None), (w, win)):
                out, lim, bits = native.weight_dropout(x, 9, x.shape[1] // 3, 2**31, window=window, bits=True)
                r += [out, lim, bits, native.weight_dropout_backward(x, x, lim, 9, 2**31, window=window),
                      native.weight_dropout_backward(x, None, None, 9, 2**31, window=window, bits=bits)]
                r += list(native.nm_dropout(x, 9, 3, 4, 2**31, window=window, bits=True))
            res.append(r)
        for a, b in zip(*res):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("mask", ["bits", "recompute"])
def test_public_api_and_autograd(mask):
    w = torch.randn(12, 3, 3, 4, requires_grad=True)
    fns = [lambda x, b: td.targeted_weight_dropout(x, 0.5, 0.4, seed=42, backend=b, mask=mask),
           lambda x, b: td.targeted_nm_dropout(x, 0.5, n=1, m=3, seed=42, backend=b, mask=mask),
           lambda x, b: td.targeted_unit_dropout(x, 0.5, 0.4, seed=42, backend=b)]
    for fn in fns:
        outs, grads = [], []
        for backend in ("native", "reference"):
            y = fn(w, backend)
            (g,) = torch.autograd.grad((y * torch.arange(y.numel()).view_as(y)).sum(), w)
            outs.append(y.detach())
            grads.append(g)
        assert_bits(*outs)
        assert_bits(*grads)
    for prune in (lambda x, b: td.prune_weights(x, 0.5, backend=b), lambda x, b: td.prune_nm(x, n=2, m=4, backend=b)):
        assert_bits(prune(w.detach(), "native"), prune(w.detach(), "reference"))


def test_fake_kernels_and_schemas():
    w = torch.randn(6, 12)
    D = R.drop_threshold(0.5)
    _, limit, bits = native.weight_dropout(w, 1, 3, D, bits=True)
    _, keep = native.unit_dropout(w, 1, 3, D)
    ops = torch.ops.td_kernels_native
    for op, args in [(ops.weight_dropout, (w, 1, 3, D, 0, 12, None, False)),
                     (ops.weight_dropout, (w, 1, 3, D, 5, 20, limit, True)),
                     (ops.weight_dropout_backward, (w, w, limit, 1, D, 0, 12, None)),
                     (ops.weight_dropout_backward, (w, None, None, 1, D, 16, 15, bits)),
                     (ops.nm_dropout, (w, 1, 2, 4, D, 0, 12, True)),
                     (ops.nm_dropout_backward, (w, w, 1, 1, 3, D, 0, 12, None)),
                     (ops.nm_dropout_backward, (w, None, 1, 1, 3, D, 0, 12, bits)),
                     (ops.unit_dropout, (w, 1, 3, D)), (ops.unit_dropout_backward, (w, keep))]:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


def test_build_info():
    assert isinstance(native.BUILD_INFO, str) and native.BUILD_INFO.startswith("cpu: ")
    assert ("cuda: not built" in native.BUILD_INFO) == (not native.WITH_CUDA)


# ---- bad input -> ValueError / TypeError naming the argument --------------------------------
def test_errors_name_the_argument():
    w = torch.randn(4, 6)
    D = 2**31
    ops = torch.ops.td_kernels_native
    with pytest.raises(ValueError, match="w must be contiguous"):
        native.weight_dropout(w.t(), 1, 2, D)
    with pytest.raises(ValueError, match="w must have 2 dimensions"):
        ops.weight_dropout(w.view(-1), 1, 2, D, 0, 24, None, False)
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
    _, limit, bits = native.weight_dropout(w, 1, 2, D, bits=True)
    with pytest.raises(TypeError, match="limit must be Int"):
        native.weight_dropout_backward(w, w, limit.long(), 1, D)
    with pytest.raises(ValueError, match="limit must have shape"):
        native.weight_dropout_backward(w, w, limit[:2], 1, D)
    with pytest.raises(ValueError, match="limit must have shape"):
        native.weight_dropout(w, 1, 2, D, limit=limit[:3])
    with pytest.raises(TypeError, match="limit must be Int"):
        native.weight_dropout(w, 1, 2, D, limit=limit.float())
    with pytest.raises(ValueError, match="grad must have w's shape"):
        native.weight_dropout_backward(w[:2], w, limit, 1, D)
    with pytest.raises(TypeError, match="grad must be"):
        native.weight_dropout_backward(w.double(), w, limit, 1, D)
    with pytest.raises(ValueError, match="w must be given when bits is None"):
        native.weight_dropout_backward(w, None, limit, 1, D)
    with pytest.raises(ValueError, match="limit must be given when bits is None"):
        native.weight_dropout_backward(w, w, None, 1, D)
    with pytest.raises(ValueError, match="bits must have shape"):
        native.weight_dropout_backward(w, None, None, 1, D, bits=torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="bits must be Int"):
        native.nm_dropout_backward(w, None, 1, 1, 2, D, bits=bits.long())
    with pytest.raises(ValueError, match="window"):  # the Python launcher: reference.check_window
        native.weight_dropout(w, 1, 2, D, window=R.Window(3, 7))
    with pytest.raises(ValueError, match="window"):  # the op itself
        ops.weight_dropout(w, 1, 2, D, 3, 7, None, False)
    with pytest.raises(ValueError, match="window origin"):
        ops.nm_dropout(w, 1, 1, 2, D, -1, 6, False)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        ops.weight_dropout_backward(w, w, limit, 1, D, 2**62, 2**62, None)
    with pytest.raises(ValueError, match="must divide the fan-in"):
        native.nm_dropout(w, 1, 2, 4, D)
    with pytest.raises(ValueError, match="must divide the fan-in"):
        ops.nm_dropout(w, 1, 2, 4, D, 0, 6, False)
    with pytest.raises(ValueError, match="1 <= n < m <= 16"):
        ops.nm_dropout_backward(w, w, 1, 3, 3, D, 0, 6, None)
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


@st.composite
def windows(draw, F):
    if draw(st.booleans()):
        return None
    stride = F + draw(st.integers(0, 40))
    return R.Window(draw(st.integers(0, 2**36)) * stride + draw(st.integers(0, stride - F)), stride)


rates = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weights(), rates, rates, st.data())
def test_weight_random(device, ws, targ, drop, data):
    w, seed = ws
    check_weight(w, seed, targ, drop, device, window=data.draw(windows(w.shape[1])))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 8), st.integers(1, 60), st.sampled_from(NM), st.sampled_from(DTYPES),
       st.sampled_from(oracle.STYLES), st.integers(0, 2**63 - 1), rates, st.data())
def test_nm_random(device, U, groups, nm, dtype, style, seed, drop, data):
    n, m = nm
    w = oracle.make_weight((U, groups * m), dtype, style, seed % 2**32)
    check_nm(w, seed, n, m, drop, device, window=data.draw(windows(groups * m)))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 40), st.integers(1, 300), st.sampled_from(DTYPES), st.integers(0, 2**63 - 1), rates, rates)
def test_unit_random(device, U, F, dtype, seed, targ, drop):
    w = distinct_norm_rows(U, F, dtype, seed % 2**32)
    norms = R.unit_norms(w).double()
    srt = norms.sort().values
    assume(bool(((srt[1:] - srt[:-1]) > 1e-5 * srt[1:]).all()) if U > 1 else True)
    assert not math.isnan(float(norms.sum()))
    check_unit(w, seed, targ, drop, device)


def test_avx2_path_without_avx512():
    """TD_KERNELS_AVX512=0 makes a CPU with AVX-512 run the AVX2 loops (selection, Philox
    tiles): the same bits as the reference there too (the host test covers every path's
    kernels; this covers the switch and the glue)."""
    import subprocess
    import sys
    code = ("import torch; from td_kernels import reference as R; from td_kernels.backends import native\n"
            "w = torch.randn(9, 1000, generator=torch.Generator().manual_seed(3))\n"
            "for win in (None, R.Window(3, 1003)):\n"
            "    a = native.weight_dropout(w, 5, 400, 2**31, window=win, bits=True)\n"
            "    b = R.weight_dropout(w, 5, 400, 2**31, window=win, bits=True)\n"
            "    assert torch.equal(a[0].view(torch.int32), b[0].view(torch.int32)) and torch.equal(a[2], b[2])\n"
            "    assert torch.equal(native.nm_dropout(w, 5, 2, 4, 2**31, window=win, bits=True)[1],\n"
            "                       R.nm_dropout(w, 5, 2, 4, 2**31, window=win, bits=True)[1])\n"
            "print(native.BUILD_INFO)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TD_KERNELS_AVX512": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "AVX-512)" not in res.stdout, res.stdout
