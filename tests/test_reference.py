"""The reference against SPEC.md: Philox known answers, the worked example, and an independent
sort-based formulation (tests/oracle.py) over random shapes, dtypes, ties, zeros and NaN."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from td_kernels import reference as R

import oracle

KAT = [  # Random123 kat_vectors: counter, key -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
STREAM_2026 = [0x6E5B28E3, 0x85B7BE5B, 0xB3CEB6B8, 0x4BE9BF2C, 0xFCFFF50E, 0x594F0D6A, 0x7012BD01, 0xD17E9724]

W_EXAMPLE = torch.tensor([
    [0.5, -1.25, 2.0, -0.125, 3.5, 0.75, -0.25, 1.5],
    [-2.5, 0.375, -0.0625, 1.0, -3.0, 0.875, 2.25, -0.625],
    [1.75, -0.5, 0.25, -1.5, 0.0, 2.75, -0.875, 0.125]])
OUT_EXAMPLE = torch.tensor([
    [0.5, -1.25, 2.0, 0, 3.5, 0.75, 0, 1.5],
    [-2.5, 0, -0.0625, 1.0, -3.0, 0, 2.25, 0],
    [1.75, -0.5, 0.25, -1.5, 0, 2.75, -0.875, 0.125]])


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = R.philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in counter], *key)
    assert tuple(int(o) for o in out) == expected
    assert tuple(oracle.philox(counter, key)) == expected  # the oracle is checked too


def test_philox_stream_check():
    assert R.philox_words(2026, 8).tolist() == STREAM_2026


@given(seed=st.integers(0, 2**63 - 1), start=st.integers(0, 2**40))
def test_philox_words_high_counter_bits(seed, start):
    # counters past 2**32 use the second counter word; check lanes against the scalar oracle
    q = torch.tensor([start], dtype=torch.int64)
    z = torch.zeros_like(q)
    lanes = R.philox4x32_10(q & R.MASK32, q >> 32, z, z, seed & R.MASK32, seed >> 32)
    assert [int(x) for x in lanes] == [oracle.word(seed, 4 * start + i) for i in range(4)]


def test_worked_example_weight():
    out, _, _ = R.weight_dropout(W_EXAMPLE, 7, R.count(0.5, 8), R.drop_threshold(0.5))
    oracle.assert_bits_equal(out, OUT_EXAMPLE)


def test_worked_example_unit():
    out, keep = R.unit_dropout(W_EXAMPLE, 11, R.count(0.67, 3), R.drop_threshold(0.5))
    assert keep.tolist() == [True, True, False]
    oracle.assert_bits_equal(out[:2], W_EXAMPLE[:2])
    assert torch.equal(oracle.bits(out[2]), torch.zeros(8, dtype=torch.int32))  # +0.0, not -0.0


def test_count():
    assert R.count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in float64
    assert R.count(1.0, 7) == 7 and R.count(0.0, 7) == 0 and R.count(0.5, 7) == 3
    assert [R.count(r / 10, 10) for r in range(11)] == list(range(11))
    assert R.drop_threshold(1.0) == 2**32 and R.drop_threshold(0.5) == 2**31 and R.drop_threshold(0.0) == 0


def test_rank_keys_order():
    x = torch.tensor([-0.0, 0.0, 1e-45, -1.0, 1.0, float("inf"), float("-inf"), float("nan")])
    k = R.rank_keys(x).tolist()
    assert k[0] == k[1] == 0 and k[3] == k[4] and k[5] == k[6] == 0x7F800000
    assert k[0] < k[2] < k[3] < k[5] < k[7]
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # widening is exact
        assert R.rank_keys(x.to(dtype)).tolist() == R.rank_keys(x.to(dtype).float()).tolist()


def test_float64_nan_keys_keep_the_payload_on_every_device():
    """A float64 NaN's key: quiet bit set, top 23 payload bits kept (csrc/td_core.h key_f64),
    whatever the device's conversion to float32 does with it (CUDA's returns the canonical NaN)."""
    bits = torch.tensor([0x7FF0000020000001, 0x7FF8000000000001, -0x0008000000012345, 0x7FFFFFFFFFFFFFFF,
                         0x7FF0000000000000, 0x3FF0000000000000])  # 2 sNaNs, qNaN, -qNaN, full payload, inf, 1.0
    x = bits.view(torch.float64)
    expected = [0x7FC00001, 0x7FC00000, 0x7FFFFFFF, 0x7FFFFFFF, 0x7F800000, 0x3F800000]
    assert R.rank_keys(x).tolist() == expected
    cuda_like = torch.where(x.isnan(), 0x7FC00000, R.rank_keys(x))  # the canonical NaN's key
    assert R._float64_nan_keys(x, cuda_like).tolist() == expected


def test_float16_keys_every_pattern_position_independent():
    pats = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = pats.view(torch.float16)
    got = R.rank_keys(x)
    assert got.tolist() == oracle.keys(x.view(torch.int16).numpy().view(np.float16))
    for i in (0, 1, 17, 20):  # torch's scalar-tail conversion differs; the key must not
        assert R.rank_keys(x[i::21]).tolist() == got[i::21].tolist()
    bf = pats.view(torch.bfloat16)
    assert R.rank_keys(bf).tolist() == ((pats.to(torch.int64) & 0x7FFF) << 16).tolist()


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@given(U=st.integers(1, 6), F=st.integers(1, 40), dtype=st.sampled_from(DTYPES), style=st.sampled_from(oracle.STYLES),
       data_seed=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**63 - 1),
       drop_rate=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0, 1),
       targ_rate=st.sampled_from([0.0, 0.3, 0.5, 1.0]) | st.floats(0, 1))
def test_weight_dropout_matches_oracle(U, F, dtype, style, data_seed, seed, drop_rate, targ_rate):
    w = oracle.make_weight((U, F), dtype, style, data_seed)
    out, limit, _ = R.weight_dropout(w, seed, R.count(targ_rate, F), R.drop_threshold(drop_rate))
    keep = torch.from_numpy(oracle.weight_keep(oracle.to_numpy(w), seed, drop_rate, targ_rate))
    oracle.assert_bits_equal(out, torch.where(keep, w, torch.zeros((), dtype=dtype)))
    grad = torch.randn(U, F, dtype=torch.float64).to(dtype)
    g = R.weight_dropout_backward(grad, w, limit, seed, R.drop_threshold(drop_rate))
    oracle.assert_bits_equal(g, torch.where(keep, grad, torch.zeros((), dtype=dtype)))


@given(U=st.integers(1, 12), F=st.integers(1, 20), dtype=st.sampled_from(DTYPES[:3]),
       style=st.sampled_from(oracle.STYLES), data_seed=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**63 - 1),
       drop_rate=st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 1), targ_rate=st.floats(0, 1))
def test_unit_dropout_matches_oracle(U, F, dtype, style, data_seed, seed, drop_rate, targ_rate):
    w = oracle.make_weight((U, F), dtype, style, data_seed)
    norms = np.sqrt((w.double().numpy() ** 2).sum(axis=1)).astype(np.float32)  # float64 sums, then float32
    ref_norms = R.unit_norms(w).numpy()
    # SPEC 10: the norm's summation order may move it by an ulp; compare only where that cannot matter
    assert np.allclose(norms, ref_norms, rtol=1e-5, equal_nan=True)
    out, keep = R.unit_dropout(w, seed, R.count(targ_rate, U), R.drop_threshold(drop_rate))
    expect = oracle.unit_keep(ref_norms, seed, drop_rate, targ_rate)
    assert keep.tolist() == expect.tolist()
    oracle.assert_bits_equal(out, torch.where(keep[:, None], w, torch.zeros((), dtype=dtype)))


def test_reference_handles_4096_square():
    g = torch.Generator().manual_seed(0)
    n = 4096 * 4096  # distinct magnitudes (exact in float32 below 2**24), random signs and order
    w = ((torch.randperm(n, generator=g) + 1).float() * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)).view(4096, 4096)
    out, limit, _ = R.weight_dropout(w, 3, R.count(0.5, 4096), R.drop_threshold(0.5))
    cand = R.rank_keys(w) <= limit.long()[:, None]
    assert cand.sum(1).eq(2048).all()  # distinct keys: exactly k candidates per unit
    frac = (out[cand] == 0).float().mean().item()
    assert abs(frac - 0.5) < 0.002 and torch.equal(out[~cand], w[~cand])


# ---- windows (SPEC section 12), bit-packed masks (section 7), N:M (section 11) -------------
@given(U=st.integers(1, 5), F=st.integers(1, 40), r0=st.integers(0, 7), extra=st.integers(0, 9),
       c0=st.integers(0, 9), seed=st.integers(0, 2**63 - 1))
def test_window_words_are_the_global_stream(U, F, r0, extra, c0, seed):
    Fg = F + c0 + extra
    got = R.window_words(seed, U, F, R.Window(r0 * Fg + c0, Fg))
    glob = R.philox_words(seed, (r0 + U) * Fg).view(r0 + U, Fg)
    assert torch.equal(got, glob[r0:, c0:c0 + F])


@pytest.mark.parametrize("window,err", [((0, 3), ValueError), ((5, 8), ValueError), ((-1, 10), ValueError),
                                        ((0.0, 10), TypeError), ([0, 10], TypeError), ((2**62, 10), ValueError)])
def test_window_checks(window, err):
    with pytest.raises(err, match="window"):
        R.check_window(window, 2, 4)


@given(U=st.integers(0, 4), F=st.integers(0, 70), data_seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_bits(U, F, data_seed):
    keep = torch.from_numpy(np.random.default_rng(data_seed).random((U, F)) < 0.5)
    bits = R.pack_bits(keep)
    assert bits.dtype == torch.int32 and bits.shape == (U, (F + 31) // 32)
    assert torch.equal(R.unpack_bits(bits, F), keep)
    for u in range(U):  # bit j % 32 of word j // 32, padding zero
        for w in range(bits.shape[1]):
            val = int(bits[u, w]) & 0xFFFFFFFF
            assert val == sum(int(keep[u, j]) << (j - 32 * w) for j in range(32 * w, min(F, 32 * w + 32)))


@given(shape=st.sampled_from([(3, 8), (5, 33), (4, 64), (2, 7)]), style=st.sampled_from(oracle.STYLES),
       data_seed=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**63 - 1), drop_rate=st.floats(0, 1),
       targ_rate=st.floats(0, 1))
def test_weight_window_and_bits_match_the_global_op(shape, style, data_seed, seed, drop_rate, targ_rate):
    w = oracle.make_weight(shape, torch.float32, style, data_seed)
    U, F = shape
    k, D = R.count(targ_rate, F), R.drop_threshold(drop_rate)
    out, limit, bits = R.weight_dropout(w, seed, k, D, bits=True)
    assert torch.equal(R.unpack_bits(bits, F), torch.from_numpy(oracle.weight_keep(w.numpy(), seed, drop_rate,
                                                                                   targ_rate)))
    # rows 1.. and columns 2..F-1 as a shard with the global thresholds: the same bits
    c0, c1 = min(2, F - 1), F - 1 if F > 3 else F
    blk, lim, b2 = R.weight_dropout(w[1:, c0:c1].contiguous(), seed, 0, D, window=R.Window(F + c0, F),
                                    limit=limit[1:], bits=True)
    oracle.assert_bits_equal(blk, out[1:, c0:c1])
    assert torch.equal(lim, limit[1:])
    assert torch.equal(R.unpack_bits(b2, c1 - c0), R.unpack_bits(bits, F)[1:, c0:c1])
    g = torch.randn(shape)
    assert torch.equal(R.weight_dropout_backward(g, None, None, seed, D, bits=bits),
                       R.weight_dropout_backward(g, w, limit, seed, D))


def test_nm_spec_example():
    w = torch.tensor([[0.5, 0.1, -0.5, 2.0, 0.0, 3.0, -3.0, 1.0]])
    out, _ = R.nm_dropout(w, 0, 2, 4, R.drop_threshold(1.0))
    oracle.assert_bits_equal(out, torch.tensor([[0, 0, -0.5, 2.0, 0, 3.0, -3.0, 0]]))


@given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 3), (5, 16), (1, 5)]),
       U=st.integers(1, 4), groups=st.integers(1, 5), dtype=st.sampled_from([torch.float32, torch.float16,
                                                                              torch.bfloat16]),
       style=st.sampled_from(oracle.STYLES), data_seed=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**63 - 1),
       drop_rate=st.floats(0, 1), r0=st.integers(0, 3), c0g=st.integers(0, 2))
def test_nm_against_oracle(nm, U, groups, dtype, style, data_seed, seed, drop_rate, r0, c0g):
    n, m = nm
    F = groups * m
    w = oracle.make_weight((U, F), dtype, style, data_seed)
    Fg = F + (c0g + 1) * m
    window = R.Window(r0 * Fg + c0g * m, Fg)
    out, bits = R.nm_dropout(w, seed, n, m, R.drop_threshold(drop_rate), window=window, bits=True)
    keep = oracle.nm_keep(oracle.to_numpy(w), seed, drop_rate, n, m, window.origin, Fg)
    assert torch.equal(R.unpack_bits(bits, F), torch.from_numpy(keep))
    oracle.assert_bits_equal(out, torch.where(torch.from_numpy(keep), w, torch.zeros((), dtype=dtype)))
    if drop_rate == 1.0:  # pruning: at most n non-zeros per group, exactly m - n dropped
        assert (~torch.from_numpy(keep)).view(U, groups, m).sum(2).eq(m - n).all()


@pytest.mark.parametrize("n,m,F,err", [(2, 4, 6, ValueError), (4, 4, 8, ValueError), (0, 4, 8, ValueError),
                                       (2, 17, 34, ValueError), (2.0, 4, 8, TypeError), (2, True, 8, TypeError)])
def test_nm_checks(n, m, F, err):
    with pytest.raises(err):
        R.check_nm(n, m, F)
