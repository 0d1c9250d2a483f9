"""The Triton backend against the reference, bit for bit (SPEC.md).

Without CUDA these run Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before td_kernels imports); with CUDA they run the compiled kernels on the
GPU.  The interpreter is slow (one 60 ms Python program per row), so shapes stay small; the
streamed (multi-pass) path of the weight forward is reached on small rows by lowering the
module's knobs.  Not checkable on CPU: that a new seed reuses the compiled kernel (the
interpreter compiles nothing) -- test_new_seed_does_not_recompile runs on CUDA only; that every
kernel compiles for sm_80/sm_90 without spills is tests/test_triton_aot.py.
"""
import importlib

import numpy as np

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

import td_kernels  # noqa: E402,F401  (registers the backends)
from td_kernels import _registry, reference as R  # noqa: E402

tb = importlib.import_module("td_kernels.backends.triton")
common = importlib.import_module("td_kernels.backends.triton._common")
wd = importlib.import_module("td_kernels.backends.triton.weight_dropout")
ud = importlib.import_module("td_kernels.backends.triton.unit_dropout")
nd = importlib.import_module("td_kernels.backends.triton.nm_dropout")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and not common.INTERPRETED,
                                reason="no CUDA and TRITON_INTERPRET=1 was not set before import")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
D_HALF = 2**31  # drop_rate 0.5
D_ALL = 2**32   # drop_rate 1: every candidate drops


def assert_bits(a, b):
    """Same shape, dtype and bits (so +0.0 / -0.0 and NaN payloads count)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype in BITS:
        a, b = a.view(BITS[a.dtype]), b.view(BITS[b.dtype])
    assert torch.equal(a, b), (a, b)


def check_weight(w, seed, k, D, window=None, limit=None, recompute=True):
    """Forward (out, limit, packed bits) and both backwards against the reference, bit for bit
    (``recompute=False`` skips the slowest to interpret, the recompute backward)."""
    out, lim, bits = wd.weight_dropout(w, seed, k, D, window=window, limit=limit, bits=True)
    ref_out, ref_lim, ref_bits = R.weight_dropout(w, seed, k, D, window=window, limit=limit, bits=True)
    assert_bits(out, ref_out)
    assert lim.dtype == torch.int32 and torch.equal(lim, ref_lim)
    assert bits.dtype == torch.int32 and torch.equal(bits, ref_bits)
    grad = torch.randn(w.shape, device=w.device).to(w.dtype)
    ref_grad = R.weight_dropout_backward(grad, w, ref_lim, seed, D, window=window)
    if recompute:
        assert_bits(wd.weight_dropout_backward(grad, w, lim, seed, D, window=window), ref_grad)
    assert_bits(wd.weight_dropout_backward(grad, None, None, seed, D, window=window, bits=bits), ref_grad)
    return out


def check_nm(w, seed, n, m, D, window=None):
    out, bits = nd.nm_dropout(w, seed, n, m, D, window=window, bits=True)
    ref_out, ref_bits = R.nm_dropout(w, seed, n, m, D, window=window, bits=True)
    assert_bits(out, ref_out)
    assert torch.equal(bits, ref_bits)
    grad = torch.randn(w.shape, device=w.device).to(w.dtype)
    ref_grad = R.nm_dropout_backward(grad, w, seed, n, m, D, window=window)
    assert_bits(nd.nm_dropout_backward(grad, w, seed, n, m, D, window=window), ref_grad)
    assert_bits(nd.nm_dropout_backward(grad, None, seed, n, m, D, window=window, bits=bits), ref_grad)
    return out


def check_unit(w, seed, k, D):
    out, keep = ud.unit_dropout(w, seed, k, D)
    ref_out, ref_keep = R.unit_dropout(w, seed, k, D)
    assert keep.dtype == torch.bool and torch.equal(keep, ref_keep)
    assert_bits(out, ref_out)
    grad = torch.randn(w.shape, device=w.device).to(w.dtype)
    assert_bits(ud.unit_dropout_backward(grad, keep), R.unit_dropout_backward(grad, ref_keep))
    return keep


# NaNs with payloads (quiet, signalling, negative): their keys sit above +inf, in payload order
NAN_BITS = {torch.float32: [0x7FC00001, 0x7F800001, -0x003EDCBB, 0x7FFFFFFF],
            torch.float16: [0x7C01, 0x7E00, -0x01FF, 0x7FFF],
            torch.bfloat16: [0x7F81, 0x7FC0, -0x003F, 0x7FFF]}


def special_rows(U, F, dtype, gen):
    """Random values salted with ties, +-0, +-inf, NaNs with payloads and subnormals."""
    w = torch.randn(U, F, generator=gen)
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, float("inf"), float("-inf"), float("nan"),
                         torch.finfo(dtype).tiny / 4, -torch.finfo(dtype).tiny / 2])
    salt = torch.rand(U, F, generator=gen) < 0.4
    w[salt] = pool[torch.randint(len(pool), (int(salt.sum()),), generator=gen)]
    w = w.to(dtype)
    nan = torch.rand(U, F, generator=gen) < 0.05
    payloads = torch.tensor(NAN_BITS[dtype], dtype=BITS[dtype])
    w.view(BITS[dtype])[nan] = payloads[torch.randint(len(payloads), (int(nan.sum()),), generator=gen)]
    return w.to(DEVICE)


def shard_window(F, extra, c0, r0=1):
    """Local rows of F columns at global column c0 of rows of F + extra, from global row r0."""
    assert 0 <= c0 <= extra
    return R.Window(r0 * (F + extra) + c0, F + extra)


# ---- the random stream ---------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _words_kernel(out_ptr, seed: tl.int64, q_start: tl.int64, BLOCK_Q: tl.constexpr):
    q = q_start + tl.arange(0, BLOCK_Q)
    i = tl.arange(0, BLOCK_Q)[:, None] * 4 + tl.arange(0, 4)[None, :]
    tl.store(out_ptr + i, common._lane_words(seed, q).to(tl.int64))


@pytest.mark.parametrize("seed", [2026, 0, 2**32 + 5, 2**63 - 1])
@pytest.mark.parametrize("q_start", [0, 2**32 - 2, 2**38 + 3])
def test_philox_words_match_spec(seed, q_start):
    out = torch.empty(8 * 4, dtype=torch.int64, device=DEVICE)
    _words_kernel[(1,)](out, seed, q_start, BLOCK_Q=8)
    q = torch.arange(q_start, q_start + 8, dtype=torch.int64)
    zero = torch.zeros_like(q)
    lanes = R.philox4x32_10(q & R.MASK32, q >> 32, zero, zero, seed & R.MASK32, seed >> 32)
    assert torch.equal(out.cpu(), torch.stack(lanes, 1).reshape(-1))
    if seed == 2026 and q_start == 0:  # SPEC section 5 stream check
        assert out[:8].tolist() == [0x6E5B28E3, 0x85B7BE5B, 0xB3CEB6B8, 0x4BE9BF2C,
                                    0xFCFFF50E, 0x594F0D6A, 0x7012BD01, 0xD17E9724]


# ---- the rank key ------------------------------------------------------------------------
@triton.jit
def _keys_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, common._key(tl.load(x_ptr + i, mask=i < N)), mask=i < N)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_every_half_bit_pattern(dtype):
    """All 2**16 float16/bfloat16 patterns (subnormals, signalling NaNs); float32 sampled."""
    if dtype == torch.float32:
        bits = torch.randint(-2**31, 2**31 - 1, (2**16,), generator=torch.Generator().manual_seed(1),
                             dtype=torch.int32)
        bits[:8] = torch.tensor([0, -2**31, 1, 0x7F800000, 0x7F800001, 0x7FC00000, -1, 0x00800000])
    else:
        bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).to(DEVICE)
    out = torch.empty(x.numel(), dtype=torch.int32, device=DEVICE)
    _keys_kernel[(x.numel() // 4096,)](x, out, x.numel(), BLOCK=4096)
    assert torch.equal(out, R.rank_keys(x).to(torch.int32))


# ---- SPEC section 10 worked example --------------------------------------------------------
W_EXAMPLE = [[0.5, -1.25, 2.0, -0.125, 3.5, 0.75, -0.25, 1.5],
             [-2.5, 0.375, -0.0625, 1.0, -3.0, 0.875, 2.25, -0.625],
             [1.75, -0.5, 0.25, -1.5, 0.0, 2.75, -0.875, 0.125]]


def test_spec_worked_example():
    w = torch.tensor(W_EXAMPLE, device=DEVICE)
    out, _, bits = wd.weight_dropout(w, 7, R.count(0.5, 8), R.drop_threshold(0.5))
    assert bits is None
    expect = torch.tensor(W_EXAMPLE, device=DEVICE)
    expect[0, 3] = expect[0, 6] = 0
    expect[1, 1] = expect[1, 5] = expect[1, 7] = 0
    assert_bits(out, expect)
    uout, keep = ud.unit_dropout(w, 11, R.count(0.67, 3), R.drop_threshold(0.5))
    assert keep.tolist() == [True, True, False]
    assert_bits(uout, torch.where(keep[:, None], w, torch.zeros((), device=DEVICE)))


# ---- weight targeting ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("U,F", [(1, 1), (4, 7), (5, 13), (2, 67)])
def test_weight_matches_reference(dtype, U, F):
    gen = torch.Generator().manual_seed(U * 1000 + F)
    w = special_rows(U, F, dtype, gen)
    ks = sorted({0, 1 % (F + 1), F // 2, max(F - 1, 0), F})
    for i, k in enumerate(ks):  # drop rates 0, 1/2 and 1 each meet several k
        check_weight(w, 2026 + k, k, (0, D_HALF + 12345, D_ALL)[i % 3])
    check_weight(w, 7, F // 2, D_ALL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_ties_and_zeros(dtype):
    w = torch.tensor([[0.0, -0.0, 0.0, 1.0, -1.0, 1.0, 2.0],
                      [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
                      [float("nan"), float("inf"), -float("inf"), float("nan"), 0.0, -1.0, 1.0]],
                     dtype=dtype, device=DEVICE)
    for k in range(8):
        out = check_weight(w, 5, k, D_ALL, recompute=k in (0, 4, 7))
        if k < 7:
            assert (out[1] == 3.0).all()  # all tied: t_u = 3 and key < t_u holds for none
    # strict comparison: the three 1.0s tie at the threshold (position 4), so only the
    # three zeros are candidates
    out, limit, _ = wd.weight_dropout(w, 5, 4, D_ALL)
    assert limit[0] == 0x3F800000 - 1 and (out[0, 3:] != 0).all() and (out[0, :3] == 0).all()


STREAMED_KNOBS = (wd.MIN_GROUPS, wd.MIN_GROUPS, wd.MIN_GROUPS)  # 32-column chunks


def set_knobs(monkeypatch, knobs):
    for name, v in zip(("MAX_ONE_PASS_GROUPS", "CHUNK_GROUPS", "BACKWARD_GROUPS"), knobs):
        monkeypatch.setattr(wd, name, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_streamed_path(dtype, monkeypatch):
    """Rows longer than a program holds: chunked histogram passes give the same bits, also in
    a window with unaligned row starts and with a given limit."""
    gen = torch.Generator().manual_seed(3)
    w = special_rows(3, 45, dtype, gen)
    ks = (5, 45)
    resident = [wd.weight_dropout(w, 99, k, D_HALF, bits=True) for k in ks]
    set_knobs(monkeypatch, STREAMED_KNOBS)
    for (out, limit, bits), k in zip(resident, ks):
        streamed = check_weight(w, 99, k, D_HALF)
        assert_bits(streamed, out)
    check_weight(w, 99, 30, D_HALF, window=shard_window(45, 10, 3))
    check_weight(w, 99, 0, D_HALF, window=shard_window(45, 3, 1), limit=resident[0][1])


def test_weight_long_row():
    """A row past MAX_ONE_PASS_GROUPS takes the streamed path with the default knobs."""
    F = 4 * wd.MAX_ONE_PASS_GROUPS + 1001
    w = torch.randn(2, F, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    w[1, ::3] = 0.25  # many ties
    check_weight(w, 2**40 + 17, F // 3, D_HALF)


def test_one_pass_tiles_fit_the_row():
    """Issue 13: F = 4096 gets a full 1024-group tile (not a half-masked 2048 one), F = 8192
    stays one pass; tiles always hold whole 32-column mask words."""
    assert wd._block_groups(triton.cdiv(4096, 4), wd.MAX_ONE_PASS_GROUPS) == 1024
    assert triton.cdiv(8192, 4) <= wd.MAX_ONE_PASS_GROUPS
    assert wd._block_groups(triton.cdiv(8193, 4), wd.CHUNK_GROUPS) == wd.CHUNK_GROUPS
    assert wd._block_groups(1, wd.MAX_ONE_PASS_GROUPS) * 4 % 32 == 0


@pytest.mark.skipif(not CUDA, reason="a 10**6-element row is minutes in the interpreter")
def test_weight_million_row_cuda():
    w = torch.randn(3, 10**6 + 3, device="cuda")
    check_weight(w, 1, 600_000, D_HALF)


@settings(deadline=None, max_examples=20)
@given(U=st.integers(1, 4), F=st.integers(1, 70), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**63 - 1), targ=st.floats(0, 1), drop=st.floats(0, 1),
       streamed=st.booleans(), data=st.data())
def test_weight_hypothesis(U, F, dtype, seed, targ, drop, streamed, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    w = special_rows(U, F, dtype, gen)
    window = None
    if data.draw(st.booleans()):  # a shard: any column offset, any global row length
        extra = data.draw(st.integers(0, 9))
        window = shard_window(F, extra, data.draw(st.integers(0, extra)), data.draw(st.integers(0, 2**40)))
    saved = (wd.MAX_ONE_PASS_GROUPS, wd.CHUNK_GROUPS, wd.BACKWARD_GROUPS)
    if streamed:
        wd.MAX_ONE_PASS_GROUPS, wd.CHUNK_GROUPS, wd.BACKWARD_GROUPS = STREAMED_KNOBS
    try:
        check_weight(w, seed, R.count(targ, F), R.drop_threshold(drop), window=window,
                     recompute=data.draw(st.booleans()))
    finally:
        wd.MAX_ONE_PASS_GROUPS, wd.CHUNK_GROUPS, wd.BACKWARD_GROUPS = saved


# ---- the sample-bracketed selection (variant="sampled", or weight_dropout.SELECT) --------------
def _sampled_limits(w, k):
    """The forward's limits with the sampled selection (the launcher's variant, as backend="auto"
    passes it on a card where it was measured fastest), checked against the reference."""
    out, lim, bits = wd.weight_dropout(w, 3, k, D_HALF, bits=True, variant="sampled")
    ref_out, ref_lim, ref_bits = R.weight_dropout(w, 3, k, D_HALF, bits=True)
    assert torch.equal(lim, ref_lim), (lim, ref_lim)
    assert_bits(out, ref_out)
    assert torch.equal(bits, ref_bits)


@settings(deadline=None, max_examples=12)
@given(U=st.integers(1, 3), F=st.integers(2, 150), dtype=st.sampled_from(DTYPES), targ=st.floats(0.01, 0.99),
       data=st.data())
def test_weight_sampled_select_hypothesis(U, F, dtype, targ, data):
    """Random rows salted with ties, +-0, inf, NaNs with payloads, subnormals, odd F: every
    outcome of the sample (rank k at lo, at hi, in the band, outside it) gives the reference's
    limits and bits."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    w = special_rows(U, F, dtype, gen)
    _sampled_limits(w, max(1, min(F - 1, R.count(targ, F))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_sampled_select_misjudged_and_ties(dtype):
    """Row 0: the sampled positions hold the largest values, so the sample brackets the wrong
    end and the full radix rounds run; row 1: all but a few values tie (rank k at lo or hi);
    row 2: two values only."""
    F = 200
    w = torch.randn(3, F).abs()
    pos = (2 * torch.arange(64) + 1) * F // 128
    w[0, pos] = 1e4 + torch.arange(64.0)
    w[1] = 0.5
    w[1, :5] = torch.tensor([0.1, 2.0, 3.0, 0.2, 7.0])
    w[2] = torch.where(torch.arange(F) % 3 == 0, 1.0, -2.0)
    _sampled_limits(w.to(dtype).to(DEVICE), 20)


# ---- windows (SPEC section 12), given limits, bit masks (section 7) --------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F,extra,c0", [(8, 0, 0), (8, 8, 4), (13, 6, 3), (40, 24, 5), (67, 1, 1)])
def test_weight_windows(dtype, F, extra, c0):
    """Shards of a global weight: rows at aligned and unaligned stream positions (row_stride
    > F), the local block's own thresholds; and the whole global weight split by columns with
    the global limits gives the global op's output and bits."""
    gen = torch.Generator().manual_seed(F * 31 + extra)
    w = special_rows(3, F, dtype, gen)
    window = shard_window(F, extra, c0, r0=5)
    assert (window.origin % 4 == 0 and window.row_stride % 4 == 0) == common.aligned(*window)
    for k in (0, F // 3, F):
        check_weight(w, 2026 + k, k, D_HALF + 77, window=window)
    if extra:  # the global weight [3, F + extra] against two column shards with its limits
        g = special_rows(3, F + extra, dtype, gen)
        out, limit, bits = wd.weight_dropout(g, 8, (F + extra) // 2, D_HALF, bits=True)
        for a, b in ((0, c0), (c0, c0 + F)):
            if a == b:
                continue
            blk = g[:, a:b].contiguous()
            o, lim, bb = wd.weight_dropout(blk, 8, 0, D_HALF, window=R.Window(a, F + extra), limit=limit,
                                           bits=True)
            assert_bits(o, out[:, a:b])
            assert lim is limit or torch.equal(lim, limit)
            assert torch.equal(R.unpack_bits(bb, b - a), R.unpack_bits(bits, F + extra)[:, a:b])


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_given_limit(dtype):
    """A given limit skips the selection (k unused) and is returned: arbitrary limits, -1 and
    KEY_MAX, NaN-key limits."""
    gen = torch.Generator().manual_seed(12)
    w = special_rows(4, 21, dtype, gen)
    limits = torch.tensor([-1, 0x3F000000, 0x7F800000, 0x7FFFFFFF], dtype=torch.int32, device=DEVICE)
    for window in (None, shard_window(21, 2, 1)):
        check_weight(w, 31, 0, D_ALL, window=window, limit=limits)
        _, lim, bits = wd.weight_dropout(w, 31, 3, D_ALL, window=window, limit=limits)
        assert torch.equal(lim, limits) and bits is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_bits_words(dtype):
    """The packed mask is reference.pack_bits of the keep mask: every word, padding bits 0,
    F at and around multiples of 32."""
    gen = torch.Generator().manual_seed(13)
    for F in (1, 31, 32, 33, 64, 95):
        w = special_rows(2, F, dtype, gen)
        for k, D in ((F // 2, D_HALF), (F, D_ALL), (0, D_ALL), (F, 0)):
            out, limit, bits = wd.weight_dropout(w, 3, k, D, bits=True)
            keep = R.weight_keep(w, R.weight_limits(w, k), 3, D)
            assert bits.shape == (2, (F + 31) // 32) and torch.equal(bits, R.pack_bits(keep))
            assert_bits(out, torch.where(keep, w, torch.zeros((), dtype=dtype, device=DEVICE)))


# ---- N:M targeting (SPEC section 11) -------------------------------------------------------
NM_PAIRS = [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (7, 8), (8, 16), (15, 16),   # fast path
            (2, 3), (1, 5), (3, 6), (6, 7), (4, 9), (5, 12), (14, 15)]          # general path


@pytest.mark.parametrize("n,m", NM_PAIRS)
def test_nm_matches_reference(n, m):
    dtype = DTYPES[(n + m) % 3]
    gen = torch.Generator().manual_seed(n * 100 + m)
    groups = max(1, 40 // m)
    w = special_rows(3, groups * m, dtype, gen)
    w[0, :m] = 0.5   # a whole group tied
    w[1, :m] = -0.0
    for window, D in ((None, D_HALF), (shard_window(groups * m, 2 * m, m), D_ALL),
                      (shard_window(groups * m, 3, 3), D_HALF)):  # aligned and unaligned rows
        check_nm(w, 2026 + m, n, m, D, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_spec_example_and_dtypes(dtype):
    w = torch.tensor([[0.5, 0.1, -0.5, 2.0, 0, 3, -3, 1]], dtype=dtype, device=DEVICE)
    out = check_nm(w, 0, 2, 4, D_ALL)
    assert_bits(out, torch.tensor([[0, 0, -0.5, 2.0, 0, 3, -3, 0]], dtype=dtype, device=DEVICE))
    w = special_rows(4, 48, dtype, torch.Generator().manual_seed(48))
    for n, m in ((2, 4), (5, 8), (2, 3), (10, 12), (1, 16)):
        check_nm(w, 5, n, m, D_HALF)
    check_nm(w, 5, 1, 2, 0)                   # drop_rate 0: W unchanged
    check_nm(w[:1].contiguous(), 5, 3, 4, D_ALL)  # U = 1


def test_nm_long_rows_and_many_chunks(monkeypatch):
    """Rows of several program chunks (lowered NM_GROUPS): groups of non-power-of-two m then
    straddle chunk boundaries."""
    monkeypatch.setattr(nd, "NM_GROUPS", 8)
    w = special_rows(2, 7 * 15, torch.float32, torch.Generator().manual_seed(7))
    for n, m in ((3, 7), (9, 15)):
        check_nm(w, 11, n, m, D_HALF, window=shard_window(w.shape[1], 1, 1))
    w = special_rows(2, 96, torch.bfloat16, torch.Generator().manual_seed(8))
    for n, m in ((1, 16), (5, 6)):
        check_nm(w, 11, n, m, D_HALF)


@settings(deadline=None, max_examples=15)
@given(nm=st.sampled_from(NM_PAIRS), U=st.integers(1, 3), groups=st.integers(1, 6),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**63 - 1), drop=st.floats(0, 1),
       data=st.data())
def test_nm_hypothesis(nm, U, groups, dtype, seed, drop, data):
    n, m = nm
    F = groups * m
    w = special_rows(U, F, dtype, torch.Generator().manual_seed(data.draw(st.integers(0, 2**31))))
    window = None
    if data.draw(st.booleans()):
        extra = data.draw(st.integers(0, 2 * m))
        window = shard_window(F, extra, data.draw(st.integers(0, extra)), data.draw(st.integers(0, 2**40)))
    check_nm(w, seed, n, m, R.drop_threshold(drop), window=window)


# ---- unit targeting ------------------------------------------------------------------------
def distinct_norm_rows(U, F, dtype, gen):
    """Rows whose float32 norms are at least 1% apart: far from the SPEC's 1e-6 near-tie case."""
    w = torch.randn(U, F, generator=gen).double() + 0.1
    target = (1.02 ** torch.randperm(U, generator=gen).double())[:, None]
    w = (w * target / w.norm(dim=1, keepdim=True)).to(dtype).to(DEVICE)
    n = torch.sort(R.unit_norms(w)).values
    assert U < 2 or (n[1:] / n[:-1]).min() > 1.01
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("U,F", [(1, 1), (1, 9), (6, 1), (7, 13), (12, 40)])
def test_unit_matches_reference(dtype, U, F):
    w = distinct_norm_rows(U, F, dtype, torch.Generator().manual_seed(U * 100 + F))
    for k in sorted({0, U // 2, max(U - 1, 0), U}):
        for D in (0, D_HALF, D_ALL):
            check_unit(w, 11 + k, k, D)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unit_special_norms(dtype):
    """Exact ties (equal rows), zero rows, inf and NaN norms: computed identically everywhere."""
    w = distinct_norm_rows(8, 5, dtype, torch.Generator().manual_seed(8))
    w[1] = w[2]          # exact tie
    w[3] = 0.0           # zero norm
    w[4] = -0.0
    w[5, 0] = float("inf")
    w[6, 1] = float("nan")
    w[7, 2] = -float("inf")
    for k in range(9):
        keep = check_unit(w, 3, k, D_ALL)
        if 0 < k < 8:  # NaN ranks above +inf: row 6 is never a candidate unless k == U
            assert keep[6]


def test_unit_many_units(monkeypatch):
    """The one-program keep kernel streaming its selection and coins over several chunks."""
    monkeypatch.setattr(ud, "KEEP_GROUPS", 2)
    U = 4 * ud.KEEP_GROUPS * 3 + 7
    w = distinct_norm_rows(U, 2, torch.float32, torch.Generator().manual_seed(5))
    check_unit(w, 2**62 + 1, U // 3, D_HALF)


@settings(deadline=None, max_examples=25)
@given(U=st.integers(1, 12), F=st.integers(1, 30), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**63 - 1), targ=st.floats(0, 1), drop=st.floats(0, 1),
       data=st.data())
def test_unit_hypothesis(U, F, dtype, seed, targ, drop, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    w = torch.randn(U, F, generator=gen).to(dtype).to(DEVICE)
    k = R.count(targ, U)
    if 0 < k < U:  # SPEC section 10: skip norms within 1e-6 relative at the threshold
        n = torch.sort(R.unit_norms(w).double()).values
        t = n[k]
        assume(((n - t).abs() > 1e-6 * t).sum() == U - 1)
    assert_bits(ud.unit_norms(w), R.unit_norms(w))  # float64 sums: the norms agree bit for bit
    check_unit(w, seed, k, R.drop_threshold(drop))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unit_norms_equal_reference(dtype):
    """Squares summed in float64 and rounded once: the reference's float32 norms, bit for bit
    (summation orders differ, but float64 sums agree far below a float32 ulp)."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(6, 3000, generator=gen) * torch.logspace(-4, 4, 6)[:, None]
    w = w.to(dtype).to(DEVICE)
    assert_bits(ud.unit_norms(w), R.unit_norms(w))


def test_unit_long_rows_rank_like_the_reference():
    """F = 2**16: row 1's norm lies 5e-6 relative below row 0's, so targ_rate 0.5 and
    drop_rate 1 must drop row 1 only. Equal magnitudes with random signs: a float32 running
    sum stalls there and ties the two rows (dropping nothing); float64 sums rank them."""
    F, a = 2**16, 0.7
    gen = torch.Generator().manual_seed(16)
    signs = torch.where(torch.rand(2, F, generator=gen) < 0.5, -1.0, 1.0)
    w = signs * torch.tensor([[a], [a * (1 - 5e-6)]], dtype=torch.float32)
    n = R.unit_norms(w).double()
    assert 4.9e-6 < 1 - float(n[1] / n[0]) < 5.1e-6
    seq32 = [np.sqrt(np.add.accumulate((r * r).numpy(), dtype=np.float32)[-1]) for r in w]
    assert seq32[1] >= seq32[0]  # float32 sequential accumulation mis-ranks: the case discriminates
    w = w.to(DEVICE)
    assert_bits(ud.unit_norms(w), R.unit_norms(w))
    for rows, want in (([0, 1], [True, False]), ([1, 0], [False, True])):
        keep = check_unit(w[rows].contiguous(), 5, 1, D_ALL)
        assert keep.tolist() == want


@pytest.mark.parametrize("dtype", DTYPES)
def test_unit_nan_norms_tie(dtype):
    """Rows holding NaNs of different payloads: every NaN norm is the canonical NaN 0x7FC00000
    (which payload a sum propagates depends on its order), so they tie above +inf."""
    w = torch.randn(4, 100, generator=torch.Generator().manual_seed(4))
    nans = torch.tensor([0x7FC00001, 0x7FA00000, -0x003EDCBB], dtype=torch.int32).view(torch.float32)
    for u, j in ((1, 3), (2, 50), (3, 99)):
        w[u, j] = nans[u - 1]
        w[u, (j * 7) % 100] = nans[3 - u]
    w = w.to(dtype).to(DEVICE)
    assert ud.unit_norms(w)[1:].view(torch.int32).tolist() == [0x7FC00000] * 3
    assert ud.unit_dropout(w, 1, 2, D_ALL)[1].tolist() == [False, True, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e19, 1e-25])
def test_unit_huge_and_tiny_rows(scale, dtype):
    """Squares of 1e30 overflow float32 and those of 1e-30 underflow it; float64 sums keep the
    norms finite, nonzero and ordered (float32 sums gave inf or 0 for every row: a tie)."""
    w = torch.full((3, 300), scale)
    w[1] *= 2
    w[2] *= 1.5
    w[:, ::3] *= -1
    w = w.to(dtype).to(DEVICE)
    n = ud.unit_norms(w)
    assert_bits(n, R.unit_norms(w))
    assert bool(torch.isfinite(n).all()) and bool((n > 0).all()) and n[0] < n[2] < n[1]
    for k in range(4):
        check_unit(w, 77, k, D_ALL)
    assert ud.unit_dropout(w, 77, 2, D_ALL)[1].tolist() == [False, True, False]


# ---- registration, gate, argument checks ---------------------------------------------------
def test_registered_with_gate(monkeypatch):
    b = _registry.resolve("triton", torch.device(DEVICE), torch.float32)
    assert b.priority == {"cuda": 20, "cpu": 0}
    assert b.weight_dropout is wd.weight_dropout and b.unit_dropout_backward is ud.unit_dropout_backward
    assert b.nm_dropout is nd.nm_dropout and b.nm_dropout_backward is nd.nm_dropout_backward
    assert "triton" in _registry.available_backends(DEVICE)
    monkeypatch.setattr(tb, "INTERPRETED", False)
    assert "TRITON_INTERPRET=1" in b.why_not("cpu")
    if not CUDA:
        assert "cuda" in b.why_not("cuda")


@pytest.mark.parametrize("mask", ["bits", "recompute"])
def test_public_api_with_autograd(mask):
    w = torch.randn(4, 3, 5, device=DEVICE, requires_grad=True)
    w2 = torch.randn(3, 2, 6, device=DEVICE, requires_grad=True)
    outs = {}
    for backend in ("triton", "reference"):
        w.grad = w2.grad = None
        out = td_kernels.targeted_weight_dropout(w, 0.5, 0.4, seed=123, backend=backend, mask=mask)
        out.backward(torch.arange(60.0, device=DEVICE).view(4, 3, 5))
        nm = td_kernels.targeted_nm_dropout(w2, 0.7, n=1, m=3, seed=9, backend=backend, mask=mask)
        nm.backward(torch.arange(36.0, device=DEVICE).view(3, 2, 6))
        outs[backend] = (out.detach(), w.grad.clone(), nm.detach(), w2.grad.clone())
    for a, b in zip(outs["triton"], outs["reference"]):
        assert_bits(a, b)


def test_bad_arguments():
    w = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="k"):
        wd.weight_dropout(w, 1, 5, 0)
    with pytest.raises(ValueError, match="k"):
        ud.unit_dropout(w, 1, 4, 0)
    with pytest.raises(ValueError, match="seed"):
        wd.weight_dropout(w, -1, 1, 0)
    with pytest.raises(TypeError, match="seed"):
        ud.unit_dropout(w, 1.5, 1, 0)
    with pytest.raises(ValueError, match="drop_threshold"):
        wd.weight_dropout(w, 1, 1, 2**32 + 1)
    with pytest.raises(TypeError, match="w2d"):
        wd.weight_dropout(w.double(), 1, 1, 0)
    with pytest.raises(ValueError, match="contiguous"):
        wd.weight_dropout(w.t(), 1, 1, 0)
    with pytest.raises(ValueError, match="limit"):
        wd.weight_dropout_backward(w, w, torch.zeros(3, dtype=torch.int64, device=DEVICE), 1, 0)
    with pytest.raises(ValueError, match="keep"):
        ud.unit_dropout_backward(w, torch.ones(4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="window"):
        wd.weight_dropout(w, 1, 1, 0, window=R.Window(2, 5))
    with pytest.raises(TypeError, match="window"):
        nd.nm_dropout(w, 1, 1, 2, 0, window=(0.5, 4))
    with pytest.raises(ValueError, match="limit"):
        wd.weight_dropout(w, 1, 1, 0, limit=torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="limit"):
        wd.weight_dropout(w, 1, 1, 0, limit=torch.zeros(4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="bits"):
        wd.weight_dropout_backward(w, None, None, 1, 0, bits=torch.zeros(3, 2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="bits"):
        nd.nm_dropout_backward(w, None, 1, 1, 2, 0, bits=torch.zeros(3, 1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="m=3 must divide"):
        nd.nm_dropout(w, 1, 1, 3, 0)
    with pytest.raises(ValueError, match="1 <= n < m <= 16"):
        nd.nm_dropout(w, 1, 2, 2, 0)
    with pytest.raises(ValueError, match="grad2d"):
        nd.nm_dropout_backward(w.half(), w, 1, 1, 2, 0)


def test_empty():
    for shape in [(0, 5), (3, 0), (0, 0)]:
        w = torch.empty(shape, device=DEVICE)
        out, limit, bits = wd.weight_dropout(w, 1, 0, D_ALL, bits=True)
        assert out.shape == shape and torch.equal(limit, R.weight_limits(w, 0))
        assert bits.shape == (shape[0], 0 if shape[1] == 0 else 1)
        assert wd.weight_dropout_backward(w, w, limit, 1, D_ALL).shape == shape
        assert wd.weight_dropout_backward(w, None, None, 1, D_ALL, bits=bits).shape == shape
        out, keep = ud.unit_dropout(w, 1, 0, D_ALL)
        assert out.shape == shape and torch.equal(keep, R.unit_keep(w, 1, 0, D_ALL))
    w = torch.empty(0, 4, device=DEVICE)
    out, bits = nd.nm_dropout(w, 1, 2, 4, D_ALL, bits=True)
    assert out.shape == (0, 4) and bits.shape == (0, 1)


@pytest.mark.skipif(not CUDA, reason="the interpreter compiles nothing: recompilation is a GPU matter")
def test_new_seed_does_not_recompile():
    w = torch.randn(8, 100, device="cuda")
    wd.weight_dropout(w, 1, 30, D_HALF)
    ud.unit_dropout(w, 1, 3, D_HALF)
    nd.nm_dropout(w, 1, 2, 4, D_HALF, window=R.Window(1, 101))
    kernels = [wd._weight_dropout_kernel, ud._unit_keep_kernel, nd._nm_kernel]
    dev = torch.cuda.current_device()
    sizes = [len(k.device_caches[dev][0]) for k in kernels]
    for seed in (2, 16, 2**31 + 1, 2**40, 2**63 - 1):
        for D in (1, 16, 2**31 + 3, 2**32):
            wd.weight_dropout(w, seed, 30, D)
            ud.unit_dropout(w, seed, 3, D)
            nd.nm_dropout(w, seed, 2, 4, D, window=R.Window(seed % 97 * 101 + 1, 101))
    assert [len(k.device_caches[dev][0]) for k in kernels] == sizes
