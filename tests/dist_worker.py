"""The checks of tests/test_distributed.py, run inside ONE 2-process gloo group on CPU.

``python tests/dist_worker.py RANK STORE_FILE OUT_PREFIX`` joins the group through a FileStore,
runs every check of ``CHECKS`` in order on both ranks and writes, after each one,
``OUT_PREFIX.RANK.json``: ``{name: {"status": "pass"|"skip"|"fail", "detail": ..., "s": secs}}``.
The pytest side turns each name into a test item. A check does all its collectives before it
compares anything, so a failing assertion on one rank never leaves the other in a collective.

Every check compares a DTensor result with the single-process function on the full tensor,
same seed, bit for bit (``oracle.assert_bits_equal``), forward and backward.
"""
from __future__ import annotations

import datetime
import functools
import itertools
import json
import math
import os
import sys
import time
import traceback

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: before triton is imported

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import TorchDispatchMode

import td_kernels as td
from td_kernels import _registry
from td_kernels.reference import Window

import oracle

WORLD = 2
BACKENDS = td.available_backends("cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MASKS = ("bits", "recompute")
# 5 rows over 2 ranks, fan-in 7 (uneven both ways); a rank with no rows (1, 3) or no columns (3, 1);
# conv weights [out, in, kh, kw], in = 5 split 3/2 (fan-in columns 12/8)
SHAPES = ((8, 12), (5, 7), (1, 3), (3, 1), (6, 4, 3, 3), (3, 5, 2, 2))
PLACEMENTS = (Shard(0), Shard(1), Replicate())
RATES = ((0.5, 0.5), (0.7, 0.3), (1.0, 0.0), (0.4, 1.0), (1.0, 0.61))  # targ 0 and 1: no selection at all
NM_CASES = {  # placement -> (shape, n, m): Shard(1) cases keep every shard on group boundaries
    Shard(0): (((5, 8), 2, 4), ((1, 8), 1, 2), ((7, 4, 2), 3, 8), ((4, 2, 2, 2), 2, 4)),
    Shard(1): (((4, 16), 2, 4), ((3, 5, 4), 2, 4), ((4, 2, 2, 2), 1, 4), ((2, 6, 2), 1, 2)),
    Replicate(): (((5, 8), 2, 4), ((3, 12), 5, 6)),
}

CHECKS: dict = {}


class Skip(Exception):
    pass


def check(name, registry=None):
    """Register ``fn(ctx)`` as check ``name`` in ``registry`` (default: this file's CHECKS)."""
    def register(fn):
        (CHECKS if registry is None else registry)[name] = fn
        return fn
    return register


def per_backend(name):
    """Register ``fn(ctx, backend)`` once per CPU backend: ``name[backend]``."""
    def register(fn):
        for b in BACKENDS:
            CHECKS[f"{name}[{b}]"] = lambda ctx, fn=fn, b=b: fn(ctx, b)
        return fn
    return register


# ---- capability probe --------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def missing_capability(backend: str, kind: str):
    """None when ``backend``'s launchers serve what the sharded path asks of ``kind`` (windows,
    given limits, bit masks), else the launcher's NotImplementedError. Only NotImplementedError
    counts as "not yet": any other error is left to fail the checks."""
    if kind == "unit":  # the sharded path runs only the plain unit op
        return None
    b = _registry.resolve(backend, torch.device("cpu"), torch.float32)
    w = torch.randn(3, 8)
    win, D = Window(11, 20), 2**31
    try:
        if kind == "weight":
            _out, lim, bits = b.weight_dropout(w, 5, 3, D, window=win, limit=torch.zeros(3, dtype=torch.int32),
                                               bits=True)
            b.weight_dropout_backward(w, w, lim, 5, D, window=win)
            b.weight_dropout_backward(w, None, None, 5, D, window=win, bits=bits)
        else:
            _out, bits = b.nm_dropout(w, 5, 2, 4, D, window=Window(12, 20), bits=True)
            b.nm_dropout_backward(w, w, 5, 2, 4, D, window=Window(12, 20))
            b.nm_dropout_backward(w, None, 5, 2, 4, D, window=Window(12, 20), bits=bits)
    except NotImplementedError as e:
        return f"backend {backend!r} cannot serve sharded {kind} targeting yet: {e}"
    return None


def require(backend, kind):
    why = missing_capability(backend, kind)
    if why is not None:
        raise Skip(why)


# ---- helpers -----------------------------------------------------------------------------
class Context:
    def __init__(self, rank):
        self.rank = rank
        self.cases = 0  # compare() calls so far in this check, the same on both ranks
        self.failures = []  # compare() mismatches in this check
        self.mesh = init_device_mesh("cpu", (WORLD,))
        # 2-D meshes of 2 ranks: every code path that combines mesh dims, with one dim of size 1
        self.mesh21 = init_device_mesh("cpu", (2, 1), mesh_dim_names=("a", "b"))
        self.mesh12 = init_device_mesh("cpu", (1, 2), mesh_dim_names=("a", "b"))


def dtypes_of(backend):
    return [d for d in DTYPES if d in _registry.resolve(backend, torch.device("cpu"), torch.float32).dtypes]


def grad_out(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def compare(ctx, case, fn, w_full, mesh, placements, grad):
    """``fn`` on the DTensor of ``w_full`` (forward, and backward with ``grad`` sharded alike)
    against ``fn`` on ``w_full`` itself, bit for bit; mesh, placements, shape, stride and local
    shapes of the results. Collectives first. Both ranks see the same full tensors, so the
    single-process side runs on one rank per case, in turn (the two share 2 cores). A mismatch
    is recorded in ``ctx.failures``, not raised: the check goes on in step with the other rank
    (whose collectives would otherwise wait), and fails at its end."""
    w_dt = distribute_tensor(w_full, mesh, placements).requires_grad_()
    out_dt = fn(w_dt)
    (gw_dt,) = torch.autograd.grad(out_dt, w_dt, distribute_tensor(grad, mesh, placements))
    sharded = (out_dt.full_tensor(), gw_dt.full_tensor())
    ctx.cases += 1
    try:
        assert isinstance(out_dt, DTensor) and isinstance(gw_dt, DTensor)
        assert out_dt.device_mesh == w_dt.device_mesh, "mesh"
        assert out_dt.placements == w_dt.placements == gw_dt.placements, (out_dt.placements, gw_dt.placements)
        assert out_dt.shape == w_dt.shape and out_dt.dtype == w_dt.dtype
        assert out_dt.stride() == torch.empty(w_dt.shape, device="meta").stride()
        assert out_dt.to_local().shape == w_dt.to_local().shape
        if ctx.cases % WORLD == ctx.rank:
            w = w_full.clone().requires_grad_()
            out = fn(w)
            (gw,) = torch.autograd.grad(out, w, grad)
            oracle.assert_bits_equal(sharded[0], out.detach())
            oracle.assert_bits_equal(sharded[1], gw)
    except AssertionError as e:
        ctx.failures.append(f"{case}: {e}")


def thinned(backend, i):
    """Whether case ``i`` of a check runs on ``backend``: every case on the reference; on the
    others (whose windows are tested against the reference in their own tests) every third,
    rotating; under the Triton interpreter (CPU), which is slow, cases 4 and 17 only (of 18:
    (5, 7) float16 and the conv (3, 5, 2, 2) bfloat16 in :func:`cases`)."""
    if backend == "reference":
        return True
    if backend == "triton":
        return i % 13 == 4
    return i % 3 == (i // 3) % 3


def cases(backend):
    """(case number, shape, dtype, style, mask, rates, seed): every shape x dtype, rotating
    styles, masks and rates so that every style x mask pair occurs (18 cases; thinned: each
    shape once)."""
    for i, (shape, dtype) in enumerate(itertools.product(SHAPES, DTYPES)):
        if thinned(backend, i):
            yield i, shape, dtype, oracle.STYLES[i % 3], MASKS[i % 2], RATES[i % len(RATES)], 2**62 + 7919 * i


class Comms(TorchDispatchMode):
    """Records every c10d collective: (op name, shape, dtype) of its first tensor."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("c10d::"):
            t = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
            self.calls.append((name.split("::")[1], tuple(t.shape), t.dtype))
        return func(*args, **(kwargs or {}))


# ---- forward and backward against the single process --------------------------------------
def _kind_check(kind, ctx, backend, placement):
    require(backend, kind)
    for n_case, shape, dtype, style, mask, (drop, targ), seed in cases(backend):
        if dtype not in dtypes_of(backend):
            continue
        if kind == "weight":
            def fn(w):
                return td.targeted_weight_dropout(w, drop, targ, seed=seed, backend=backend, mask=mask)
        else:
            def fn(w):
                return td.targeted_unit_dropout(w, drop, targ, seed=seed, backend=backend)
        w = oracle.make_weight(shape, dtype, style, n_case)
        compare(ctx, f"{kind} {placement} {shape} {dtype} {style} mask={mask} rates={drop, targ}", fn, w, ctx.mesh,
                [placement], grad_out(shape, dtype, n_case))


for _kind in ("weight", "unit"):
    for _pl in PLACEMENTS:
        per_backend(f"{_kind}/{_pl!r}")(lambda ctx, b, k=_kind, p=_pl: _kind_check(k, ctx, b, p))


def _nm_check(ctx, backend, placement):
    require(backend, "nm")
    for i, ((shape, n, m), dtype) in enumerate(itertools.product(NM_CASES[placement], DTYPES)):
        if dtype not in dtypes_of(backend) or not thinned(backend, i):
            continue
        style, mask, (drop, _) = oracle.STYLES[i % 3], MASKS[i % 2], RATES[i % len(RATES)]

        def fn(w):
            return td.targeted_nm_dropout(w, drop, n=n, m=m, seed=31 * i, backend=backend, mask=mask)
        w = oracle.make_weight(shape, dtype, style, i)
        compare(ctx, f"nm {n}:{m} {placement} {shape} {dtype} {style} mask={mask} drop={drop}", fn, w, ctx.mesh,
                [placement], grad_out(shape, dtype, i))


for _pl in PLACEMENTS:
    per_backend(f"nm/{_pl!r}")(lambda ctx, b, p=_pl: _nm_check(ctx, b, p))


@per_backend("prune")
def _prune(ctx, backend):
    fns = {"weight": lambda w: td.prune_weights(w, 0.4, backend=backend),
           "unit": lambda w: td.prune_units(w, 0.4, backend=backend),
           "nm": lambda w: td.prune_nm(w, n=2, m=4, backend=backend)}
    for kind, fn in fns.items():
        if missing_capability(backend, kind):
            continue
        for i, (shape, pl) in enumerate(itertools.product(((6, 8), (5, 4, 2, 2), (3, 16)), PLACEMENTS)):
            if not thinned(backend, i):
                continue
            w = oracle.make_weight(shape, torch.float32, oracle.STYLES[i % 3], i)
            compare(ctx, f"prune {kind} {pl} {shape}", fn, w, ctx.mesh, [pl], grad_out(shape, torch.float32, i))


@per_backend("2d-mesh")
def _mesh2d(ctx, backend):
    """Placements on two mesh dims (one of size 1), e.g. rows and fan-in both sharded."""
    S0, S1, R = Shard(0), Shard(1), Replicate()
    layouts = [(ctx.mesh21, [S0, S1]), (ctx.mesh21, [S1, S0]), (ctx.mesh12, [S0, S1]), (ctx.mesh12, [S1, S0]),
               (ctx.mesh21, [S1, R]), (ctx.mesh12, [R, S1]), (ctx.mesh21, [S0, S0]), (ctx.mesh12, [S1, S1]),
               (ctx.mesh12, [R, R])]
    kinds = [k for k in ("weight", "unit", "nm") if not missing_capability(backend, k)]
    for i, ((mesh, pls), kind) in enumerate(itertools.product(layouts, kinds)):
        if not thinned(backend, i):
            continue
        shape, dtype = ((5, 8) if i % 2 else (3, 5, 4)), DTYPES[i % 3]
        if dtype not in dtypes_of(backend):
            dtype = torch.float32
        fn = {"weight": lambda w: td.targeted_weight_dropout(w, 0.6, 0.45, seed=i, backend=backend, mask=MASKS[i % 2]),
              "unit": lambda w: td.targeted_unit_dropout(w, 0.6, 0.45, seed=i, backend=backend),
              "nm": lambda w: td.targeted_nm_dropout(w, 0.6, seed=i, backend=backend, mask=MASKS[i % 2])}[kind]
        w = oracle.make_weight(shape, dtype, oracle.STYLES[i % 3], i)
        compare(ctx, f"{kind} mesh {tuple(mesh.shape)} {pls} {shape} {dtype}", fn, w, mesh, pls,
                grad_out(shape, dtype, i))


@check("random[reference]")
def _random(ctx):
    """40 random cases (seeded: both ranks draw the same): shapes up to 4-D with dims 1..9 or a
    long fan-in (histograms with many keys per digit), any placement on the 1-D and 2-D meshes,
    every kind, dtype, style, mask, rates and seed."""
    rng = torch.Generator().manual_seed(2026)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (), generator=rng))]
    S0, S1, R = Shard(0), Shard(1), Replicate()
    layouts = [(ctx.mesh, [S0]), (ctx.mesh, [S1]), (ctx.mesh, [R]), (ctx.mesh21, [S0, S1]), (ctx.mesh12, [S0, S1]),
               (ctx.mesh21, [S1, S0])]
    for i in range(40):
        ndim = pick([2, 2, 3, 4])
        shape = tuple(int(d) for d in torch.randint(1, 10, (ndim,), generator=rng))
        if i % 5 == 0:
            shape = (shape[0], pick([257, 300, 1000]))
        mesh, pls = pick(layouts)
        kind, dtype, style, mask = pick(["weight", "unit", "nm"]), pick(DTYPES), pick(oracle.STYLES), pick(MASKS)
        drop, targ = float(torch.rand((), generator=rng)), pick([0.0, 1.0, float(torch.rand((), generator=rng))])
        seed = int(torch.randint(0, 2**62, (), generator=rng)) * 2 + i % 2
        if kind == "nm":  # every shard's fan-in on group boundaries: m divides the kernel size, or 2-D halves
            m = pick([2, 4, 8])
            if len(shape) == 2:
                shape = (shape[0], 2 * m * pick([1, 2, 3]))
            elif math.prod(shape[2:]) % m:
                shape = shape[:-1] + (shape[-1] * m,)
            n = int(torch.randint(1, m, (), generator=rng))

            def fn(w):
                return td.targeted_nm_dropout(w, drop, n=n, m=m, seed=seed, backend="reference", mask=mask)
        elif kind == "weight":
            def fn(w):
                return td.targeted_weight_dropout(w, drop, targ, seed=seed, backend="reference", mask=mask)
        else:
            def fn(w):
                return td.targeted_unit_dropout(w, drop, targ, seed=seed, backend="reference")
        w = oracle.make_weight(shape, dtype, style, 1000 + i)
        compare(ctx, f"random case {i}: {kind} mesh {tuple(mesh.shape)} {pls} {shape} {dtype} {style} mask={mask} "
                f"rates={drop, targ} seed={seed}", fn, w, mesh, pls, grad_out(shape, dtype, i))


# ---- seeds -------------------------------------------------------------------------------
@check("seed-none")
def _seed_none(ctx):
    """Ranks whose default generators differ agree on the draw of the mesh's first rank, and
    each rank's generator advances by one draw, as a single process's would. (The seed logic
    does not depend on the backend.)"""
    calls = {"weight": lambda w: td.targeted_weight_dropout(w, 0.5, 0.5, backend="reference"),
             "unit": lambda w: td.targeted_unit_dropout(w, 0.5, 0.5, backend="reference"),
             "nm": lambda w: td.targeted_nm_dropout(w, 0.5, backend="reference")}
    layouts = ((ctx.mesh, [Shard(1)]), (ctx.mesh, [Replicate()]), (ctx.mesh12, [Shard(0), Shard(1)]),
               (ctx.mesh21, [Shard(0), Replicate()]))
    for (mesh, pls), (kind, fn) in itertools.product(layouts, calls.items()):
        w = oracle.make_weight((6, 8), torch.float32, "normal", 3)
        torch.manual_seed(100 + ctx.rank)
        got = fn(distribute_tensor(w, mesh, pls)).full_tensor()
        after = torch.randint(0, 2**62, (4,))
        torch.manual_seed(100)  # the mesh's first rank is global rank 0 here
        want = fn(w)
        torch.manual_seed(100 + ctx.rank)
        td._params._seed_tensor(None)  # the one draw a single-process call makes
        want_after = torch.randint(0, 2**62, (4,))
        oracle.assert_bits_equal(got, want)
        assert torch.equal(after, want_after), f"{kind} {pls}: the default generator advanced by more than one draw"


# ---- collectives -------------------------------------------------------------------------
@check("collectives")
def _collectives(ctx):
    """What each call exchanges (docs/distributed.md): no gather of W, ever; nothing in
    the backward; the counts and sizes below."""
    w8 = oracle.make_weight((6, 8), torch.float32, "normal", 0)

    def wd(targ=.5, **kw):
        return lambda w: td.targeted_weight_dropout(w, .5, targ, backend="reference", **kw)

    def ud(w):
        return td.targeted_unit_dropout(w, .5, .5, seed=1, backend="reference")
    S0, S1, R, f32, f16, bf16 = Shard(0), Shard(1), Replicate(), torch.float32, torch.float16, torch.bfloat16
    hist = ("allreduce_", (6, 256), torch.int32)  # one radix round: [U_local, 256] digit counts
    expect = [  # (what, placement, dtype, call, [(op, shape, dtype)])
        ("weight rows whole", S0, f32, wd(seed=1), []),
        ("weight replicated", R, f32, wd(seed=1), []),
        ("weight split f32", S1, f32, wd(seed=1), [hist] * 4),
        ("weight split f16", S1, f16, wd(seed=1), [hist] * 3),
        ("weight split bf16", S1, bf16, wd(seed=1), [hist] * 2),
        ("weight split k=F", S1, f32, wd(targ=1.0, seed=1), []),
        ("weight split k=0", S1, f32, wd(targ=0.0, seed=1), []),
        ("weight split seed=None", S1, bf16, wd(), [("broadcast_", (1,), torch.int64)] + [hist] * 2),
        ("unit rows", S0, f32, ud, [("allreduce_", (6,), torch.float64)]),
        ("unit fan-in", S1, f32, ud, [("allreduce_", (6,), torch.float64)]),
        ("unit replicated", R, f32, ud, []),
        ("nm", S1, f32, lambda w: td.targeted_nm_dropout(w, .5, seed=1, backend="reference"), []),
        ("prune split", S1, f32, lambda w: td.prune_weights(w, .5, backend="reference"), [hist] * 4),
    ]
    seen = []
    for what, pl, dtype, fn, want in expect:
        w_dt = distribute_tensor(w8.to(dtype), ctx.mesh, [pl]).requires_grad_()
        g_dt = distribute_tensor(torch.ones(6, 8, dtype=dtype), ctx.mesh, [pl])
        with Comms() as fwd:
            out = fn(w_dt)
        with Comms() as bwd:
            torch.autograd.grad(out, w_dt, g_dt)
        seen.append((what, fwd.calls, bwd.calls, want))
    for what, fwd, bwd, want in seen:
        assert fwd == want, f"{what}: forward exchanged {fwd}, expected {want}"
        assert bwd == [], f"{what}: backward exchanged {bwd}"


# ---- bad input ---------------------------------------------------------------------------
ALL_FUNCS = {
    "targeted_weight_dropout": lambda w: td.targeted_weight_dropout(w, .5, .5, seed=1, backend="reference"),
    "targeted_unit_dropout": lambda w: td.targeted_unit_dropout(w, .5, .5, seed=1, backend="reference"),
    "targeted_nm_dropout": lambda w: td.targeted_nm_dropout(w, .5, seed=1, backend="reference"),
    "prune_weights": lambda w: td.prune_weights(w, .5, backend="reference"),
    "prune_units": lambda w: td.prune_units(w, .5, backend="reference"),
    "prune_nm": lambda w: td.prune_nm(w, backend="reference"),
}


def expect_error(fn, w_dt, *needles):
    try:
        fn(w_dt)
    except ValueError as e:
        msg = str(e)
        assert all(s in msg for s in needles), f"error {msg!r} does not name {needles}"
        return msg
    raise AssertionError(f"no ValueError for placements {w_dt.placements} (wanted one naming {needles})")


@check("bad-placements")
def _bad_placements(ctx):
    """Every public function refuses what it cannot serve exactly, on every rank, before any
    collective, naming the placement."""
    conv = torch.randn(4, 4, 2, 2)
    cases = [
        (distribute_tensor(conv, ctx.mesh, [Shard(2)]), ("Shard(dim=2)", "mesh dim 0", "splits dim 2")),
        (distribute_tensor(conv, ctx.mesh, [Shard(3)]), ("Shard(dim=3)",)),
        (DTensor.from_local(torch.randn(4, 8), ctx.mesh, [Partial()], run_check=False), ("Partial(sum)", "unreduced")),
        (DTensor.from_local(torch.randn(4, 8), ctx.mesh21, [Replicate(), Partial("max")], run_check=False),
         ("Partial(max)", "mesh dim 1")),
        (DTensor.from_local(torch.randn(2, 8), ctx.mesh, [_StridedShard(0, split_factor=2)], run_check=False,
                            shape=(4, 8), stride=(8, 1)), ("_StridedShard", "not contiguous")),
    ]
    with Comms() as comms:
        for w_dt, needles in cases:
            for name, fn in ALL_FUNCS.items():
                try:
                    expect_error(fn, w_dt, *needles)
                except AssertionError as e:
                    raise AssertionError(f"{name}: {e}") from None
    assert comms.calls == [], f"collectives before the error: {comms.calls}"


@check("nm-misaligned")
def _nm_misaligned(ctx):
    """N:M groups cut by a shard boundary: a ValueError naming the placement and m on BOTH ranks
    (every shard is checked, not only the own one)."""
    for shape, m, coord in (((3, 6, 4), 8, "(0,)"), ((2, 10), 2, "(0,)"), ((2, 6, 2), 4, "(0,)")):
        w_dt = distribute_tensor(torch.randn(shape), ctx.mesh, [Shard(1)])
        with Comms() as comms:
            for fn in (lambda w: td.targeted_nm_dropout(w, .5, n=1, m=m, seed=1, backend="reference"),
                       lambda w: td.prune_nm(w, n=1, m=m, backend="reference")):
                expect_error(fn, w_dt, "Shard(dim=1)", f"m={m}", f"mesh coordinate {coord}")
        assert comms.calls == [], comms.calls


@check("misc")
def _misc(ctx):
    w = oracle.make_weight((6, 8), torch.float32, "normal", 5)
    w_dt = distribute_tensor(w, ctx.mesh, [Shard(1)])
    # eval mode returns the DTensor itself
    assert td.targeted_weight_dropout(w_dt, .5, .5, training=False) is w_dt
    # rates given as 0-dim CPU tensors (td.nn's schedules pass them so)
    rate = torch.tensor(0.375, dtype=torch.float64)
    got = [td.targeted_weight_dropout(w_dt, rate, rate, seed=9, backend="reference").full_tensor(),
           td.targeted_unit_dropout(w_dt, rate, rate, seed=9, backend="reference").full_tensor()]
    # a rank outside the mesh takes part in nothing and gets an empty shard
    solo = DeviceMesh("cpu", [0])
    solo_out = td.targeted_weight_dropout(distribute_tensor(w, solo, [Shard(1)]) if ctx.rank == 0 else
                                          DTensor.from_local(torch.empty(0), solo, [Shard(1)], run_check=False,
                                                             shape=w.shape, stride=w.stride()),
                                          .5, .5, seed=9, backend="reference")
    # backend checks run on the shard's dtype, alike on every rank (rank 1 of (1, 8) has no rows)
    w64 = distribute_tensor(torch.randn(1, 8, dtype=torch.float64), ctx.mesh, [Shard(0)])
    for b in BACKENDS:
        if torch.float64 not in _registry.resolve(b, torch.device("cpu"), torch.float32).dtypes:
            try:
                td.targeted_weight_dropout(w64, .5, .5, seed=1, backend=b)
                raise AssertionError(f"{b} accepted float64")
            except TypeError as e:
                assert "float64" in str(e), e
    oracle.assert_bits_equal(got[0], td.targeted_weight_dropout(w, rate, rate, seed=9, backend="reference"))
    oracle.assert_bits_equal(got[1], td.targeted_unit_dropout(w, rate, rate, seed=9, backend="reference"))
    if ctx.rank == 0:
        oracle.assert_bits_equal(solo_out.to_local(), td.targeted_weight_dropout(w, .5, .5, seed=9, backend="reference"))
    else:
        assert solo_out.to_local().numel() == 0


@check("non-contiguous")
def _non_contiguous(ctx):
    """A transposed DTensor (Shard(0) seen as Shard(1), local shards not contiguous)."""
    b = oracle.make_weight((6, 8), torch.float32, "ties", 8)
    a_dt = distribute_tensor(b, ctx.mesh, [Shard(0)]).requires_grad_()
    outs, grads = [], []
    for mask in MASKS:
        out_dt = td.targeted_weight_dropout(a_dt.t(), .5, .5, seed=3, backend="reference", mask=mask)
        (g_dt,) = torch.autograd.grad(out_dt, a_dt, distribute_tensor(torch.ones(8, 6), ctx.mesh, [Shard(1)]))
        outs.append(out_dt.full_tensor())
        grads.append(g_dt.full_tensor())
    assert out_dt.placements == (Shard(1),) and out_dt.stride() == (6, 1), (out_dt.placements, out_dt.stride())
    w = b.t().requires_grad_()
    want = td.targeted_weight_dropout(w, .5, .5, seed=3, backend="reference")
    (want_g,) = torch.autograd.grad(want, w, torch.ones(8, 6))
    for out, g in zip(outs, grads):
        oracle.assert_bits_equal(out, want.detach())
        oracle.assert_bits_equal(g, want_g.t())


@check("meta")
def _meta(ctx):
    """Deferred initialisation: a DTensor whose shards are on the meta device (FSDP2 before
    materialising) gives meta shards of the right shapes, forward and backward, and exchanges
    nothing."""
    local_shapes = {Shard(0): (3, 8), Shard(1): (6, 4), Replicate(): (6, 8)}
    funcs = [lambda w: td.targeted_weight_dropout(w, .5, .5), lambda w: td.targeted_unit_dropout(w, .5, .5),
             lambda w: td.targeted_nm_dropout(w, .5, mask="bits"), lambda w: td.prune_weights(w, .5)]
    with Comms() as comms:
        for (pl, shape), fn in itertools.product(local_shapes.items(), funcs):
            def meta_dt():
                return DTensor.from_local(torch.empty(shape, device="meta"), ctx.mesh, [pl], run_check=False,
                                          shape=(6, 8), stride=(8, 1))
            w_dt = meta_dt().requires_grad_()
            out = fn(w_dt)
            (g,) = torch.autograd.grad(out, w_dt, meta_dt())
            for t in (out, g):
                assert t.placements == (pl,) and t.shape == (6, 8), (pl, t.placements, t.shape)
                assert t.to_local().device.type == "meta" and t.to_local().shape == shape, (pl, t.to_local())
    assert comms.calls == [], comms.calls


# ---- the process ---------------------------------------------------------------------------
def main(rank: int, store_file: str, out_prefix: str, checks=None) -> None:
    """Run ``checks`` (default: this file's CHECKS) in order; see the module docstring."""
    imported = time.time()  # the parent reports the start-up (interpreter, imports) from it
    torch.set_num_threads(1)  # 2 processes on 2 shared cores
    dist.init_process_group("gloo", store=dist.FileStore(store_file, WORLD), rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    ctx = Context(rank)
    results = {"__imported__": {"status": "info", "detail": "time.time() when main() began", "s": imported}}
    for name, fn in (CHECKS if checks is None else checks).items():
        t0 = time.perf_counter()
        torch.manual_seed(0)
        ctx.cases, ctx.failures = 0, []
        try:
            fn(ctx)
            if ctx.failures:
                raise AssertionError(f"{len(ctx.failures)} mismatches; the first:\n" + "\n".join(ctx.failures[:5]))
            status, detail = "pass", ""
        except Skip as e:
            status, detail = "skip", str(e)
        except Exception:
            status, detail = "fail", traceback.format_exc()
        results[name] = {"status": status, "detail": detail, "s": round(time.perf_counter() - t0, 3)}
        with open(f"{out_prefix}.{rank}.json", "w") as f:
            json.dump(results, f)
        dist.barrier()  # the next check starts together on both ranks
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
