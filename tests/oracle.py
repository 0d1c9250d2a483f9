"""An independent, scalar formulation of SPEC.md for tests: plain Python ints and numpy,
sorting instead of selection, no code shared with td_kernels.reference."""
import numpy as np

M = 0xFFFFFFFF


def philox(c, k):
    c, (k0, k1) = list(c), k
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M, (p0 >> 32) ^ c[3] ^ k1, p0 & M]
    return c


def word(seed, p):
    q = p // 4
    return philox((q & M, q >> 32, 0, 0), (seed & M, seed >> 32))[p % 4]


def keys(row):
    """|float32(x)| bit patterns as Python ints (numpy widens float16 NaNs field by field, as the spec decision says)."""
    return [int(b) for b in np.abs(np.asarray(row).astype(np.float32)).view(np.uint32)]


def to_numpy(w):
    """A weight as numpy without torch's position-dependent float16 NaN widening."""
    import torch
    return w.view(torch.int16).numpy().view(np.float16) if w.dtype == torch.float16 else w.float().numpy()


def count(rate, n):
    return min(n, int(np.floor(rate * n + 1e-6)))


def weight_keep(w2d, seed, drop_rate, targ_rate):
    """Bool numpy [U, F] keep mask by sorting each row's keys."""
    w2d = np.asarray(w2d)
    U, F = w2d.shape
    k, D = count(targ_rate, F), int(np.floor(drop_rate * 2**32))
    keep = np.ones((U, F), dtype=bool)
    for u in range(U):
        ks = keys(w2d[u])
        t = sorted(ks)[k] if 0 < k < F else None
        for j in range(F):
            cand = k == F or (k > 0 and ks[j] < t)
            keep[u, j] = not (cand and word(seed, u * F + j) < D)
    return keep


def unit_keep(norms, seed, drop_rate, targ_rate):
    """Bool numpy [U] keep from float32 norms (NaN ranks above +inf) by sorting."""
    U = len(norms)
    k, D = count(targ_rate, U), int(np.floor(drop_rate * 2**32))
    ks = keys(norms)
    t = sorted(ks)[k] if 0 < k < U else None
    return np.array([not ((k == U or (k > 0 and ks[u] < t)) and word(seed, u) < D) for u in range(U)], dtype=bool)


# ---- test helpers shared by the backend tests ----------------------------------------------
_INT_OF = {2: np.int16, 4: np.int32, 8: np.int64}


def bits(t):
    """A tensor's raw bit patterns, so comparisons see -0 vs +0 and NaN payloads."""
    import torch
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bits_equal(a, b):
    import torch
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    ok = torch.equal(bits(a), bits(b))
    if not ok:
        diff = (bits(a) != bits(b)).nonzero()[:5].tolist()
        raise AssertionError(f"bits differ at {diff} (first 5): {a.flatten()[:8]} vs {b.flatten()[:8]}")


STYLES = ("normal", "ties", "special")


def make_weight(shape, dtype, style, seed):
    """Weights that exercise the ranking: distinct normals, heavy ties (and +-0), or NaN/inf/0 mixed in."""
    import torch
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if style == "normal":
        x = rng.standard_normal(n)
    elif style == "ties":
        x = rng.choice([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0], size=n)
    else:
        x = rng.standard_normal(n)
        special = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, 65504.0], size=n)
        x = np.where(rng.random(n) < 0.3, special, x)
    w = torch.from_numpy(x.reshape(shape)).to(dtype)
    if style == "special" and dtype in (torch.float16, torch.bfloat16):
        # NaNs with payloads, signalling ones too: their keys must not depend on the conversion path
        exp_bits = 0x7C00 if dtype == torch.float16 else 0x7F80
        payload = rng.integers(1, 0x400 if dtype == torch.float16 else 0x80, size=n)
        sign = rng.choice([0, -0x8000], size=n)
        nan_bits = torch.from_numpy((sign + exp_bits + payload).astype(np.int16).reshape(shape))
        w = torch.where(torch.from_numpy(rng.random(shape) < 0.15), nan_bits.view(dtype), w)
    return w


def nm_keep(w2d, seed, drop_rate, n, m, origin=0, row_stride=None):
    """Bool numpy [U, F] keep mask of N:M targeting: sort each group by (key, j), scalar words
    at the global positions origin + u * row_stride + j."""
    w2d = np.asarray(w2d)
    U, F = w2d.shape
    row_stride = F if row_stride is None else row_stride
    D = int(np.floor(drop_rate * 2**32))
    keep = np.ones((U, F), dtype=bool)
    for u in range(U):
        ks = keys(w2d[u])
        for g in range(0, F, m):
            for j in sorted(range(g, g + m), key=lambda j: (ks[j], j))[: m - n]:
                keep[u, j] = not word(seed, origin + u * row_stride + j) < D
    return keep
