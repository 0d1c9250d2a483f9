"""The public API: semantics, reproducibility, gradients, bad input, torch.library and torch.compile.
Backend agreement runs over every backend available here (reference, native, Triton under the
interpreter); each backend's own deep tests live in its own file."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import td_kernels as td
from td_kernels import reference as R

import oracle

CPU_BACKENDS = td.available_backends("cpu")
FUNCS = [td.targeted_weight_dropout, td.targeted_unit_dropout]


def _ref(fn, w, drop_rate, targ_rate, seed):
    return fn(w, drop_rate, targ_rate, seed=seed, backend="reference")


# ---- semantics ---------------------------------------------------------------------------
def test_available_backends_lists_reference():
    assert "reference" in td.available_backends() and set(td.available_backends()) <= {"reference", "triton", "native"}


def test_worked_example_through_api():
    from test_reference import OUT_EXAMPLE, W_EXAMPLE
    for b in CPU_BACKENDS:
        oracle.assert_bits_equal(td.targeted_weight_dropout(W_EXAMPLE, 0.5, 0.5, seed=7, backend=b), OUT_EXAMPLE)
        out = td.targeted_unit_dropout(W_EXAMPLE, 0.5, 0.67, seed=11, backend=b)
        assert out[2].eq(0).all() and torch.equal(out[:2], W_EXAMPLE[:2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(shape=st.sampled_from([(1, 1), (1, 7), (7, 1), (5, 33), (4, 3, 3, 3), (3, 2, 5)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       style=st.sampled_from(oracle.STYLES), data_seed=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**63 - 1),
       drop_rate=st.floats(0, 1), targ_rate=st.floats(0, 1))
@settings(max_examples=25)
def test_backends_agree_with_reference(backend, shape, dtype, style, data_seed, seed, drop_rate, targ_rate):
    w = oracle.make_weight(shape, dtype, style, data_seed)
    for fn in FUNCS:
        got = fn(w, drop_rate, targ_rate, seed=seed, backend=backend)
        oracle.assert_bits_equal(got, _ref(fn, w, drop_rate, targ_rate, seed))


def test_drop_fraction_among_candidates():
    w = torch.randn(256, 512)
    for drop_rate in (0.1, 0.5, 0.9):
        out = td.targeted_weight_dropout(w, drop_rate, 0.5, seed=123)
        cand = R.rank_keys(w) < torch.kthvalue(R.rank_keys(w), 257, dim=1).values[:, None]
        n = int(cand.sum())
        assert n == 256 * 256
        dropped = int((out[cand] == 0).sum())
        sigma = math.sqrt(n * drop_rate * (1 - drop_rate))
        assert abs(dropped - n * drop_rate) < 5 * sigma, (dropped, n * drop_rate)
        assert torch.equal(out[~cand], w[~cand])  # non-candidates are never touched


def test_unit_drop_fraction_among_candidates():
    w = torch.randn(4000, 8)
    out = td.targeted_unit_dropout(w, 0.3, 0.5, seed=5)
    dropped_rows = out.eq(0).all(1)
    norms = w.norm(dim=1)
    cand = norms < norms.kthvalue(2001).values
    assert not dropped_rows[~cand].any()
    n = int(cand.sum())
    assert abs(int(dropped_rows.sum()) - 0.3 * n) < 5 * math.sqrt(n * 0.21)


@pytest.mark.parametrize("fn", FUNCS)
def test_no_rescaling_and_signed_zero(fn):
    w = torch.randn(64, 64)
    out = fn(w, 0.5, 0.5, seed=1)
    kept = out != 0
    assert torch.equal(out[kept], w[kept])
    assert (oracle.bits(out)[~kept] == 0).all()  # dropped values are +0.0


@pytest.mark.parametrize("fn", FUNCS)
def test_eval_is_identity(fn):
    w = torch.randn(8, 9)
    assert fn(w, 1.0, 1.0, training=False) is w


@pytest.mark.parametrize("fn", FUNCS)
def test_seeds_reproduce(fn):
    w = torch.randn(128, 64)
    a, b, c = (fn(w, 0.5, 0.5, seed=s) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = fn(w, 0.5, 0.5)
    e = fn(w, 0.5, 0.5)  # a fresh draw
    torch.manual_seed(0)
    assert torch.equal(d, fn(w, 0.5, 0.5)) and not torch.equal(d, e)


def test_pruning_is_targeting_with_every_candidate_dropped():
    w = torch.randn(16, 40)
    p = td.prune_weights(w, 0.25)
    assert p.eq(0).sum(1).eq(10).all()
    assert torch.equal(p, td.targeted_weight_dropout(w, 1.0, 0.25, seed=99))
    pu = td.prune_units(w, 0.25)
    assert pu.eq(0).all(1).sum() == 4
    norms = w.norm(dim=1)
    assert torch.equal(pu.eq(0).all(1), norms < norms.kthvalue(5).values)


@pytest.mark.parametrize("fn", FUNCS)
def test_layouts(fn):
    conv = torch.randn(6, 5, 3, 3)
    for w in (conv.to(memory_format=torch.channels_last), torch.randn(9, 12).t(), torch.randn(8, 20)[:, ::3]):
        assert not w.is_contiguous()
        out = fn(w, 0.5, 0.5, seed=2)
        assert out.shape == w.shape and out.dtype == w.dtype
        oracle.assert_bits_equal(out.contiguous(), fn(w.contiguous(), 0.5, 0.5, seed=2).contiguous())


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 3), (0, 0)])
def test_empty(fn, shape):
    w = torch.randn(shape, requires_grad=True)
    out = fn(w, 0.5, 0.5, seed=0)
    assert out.shape == w.shape
    out.sum().backward()
    assert w.grad.shape == w.shape


# ---- gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("fn", FUNCS)
def test_gradcheck_float64(fn):
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fn(x, 0.5, 0.5, seed=5), (w,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_is_grad_out_times_keep(backend, dtype):
    w = torch.randn(9, 13).to(dtype).requires_grad_()
    g = torch.randn(9, 13).to(dtype)
    for fn in FUNCS:
        w.grad = None
        out = fn(w, 0.5, 0.5, seed=8, backend=backend)
        out.backward(g)
        keep = _ref(fn, w.detach(), 0.5, 0.5, 8) != 0  # w has no zeros, so out != 0 is keep
        oracle.assert_bits_equal(w.grad, torch.where(keep, g, torch.zeros((), dtype=dtype)))


def _saved_bytes(fn, w):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(w)
    extra = [t for t in saved if t is not w and t.data_ptr() != w.data_ptr()]
    return sum(t.numel() * t.element_size() for t in extra), any(t is w for t in saved)


def test_backward_saves_no_element_mask():
    w = torch.randn(32, 48, requires_grad=True)
    # recompute: per unit a 4-byte limit (weight), per call params (5 int64); the weight itself
    got, keeps_w = _saved_bytes(lambda w: td.targeted_weight_dropout(w, 0.5, 0.5, seed=1, mask="recompute"), w)
    assert got <= 4 * 32 + 40 and keeps_w
    # unit: a 1-byte keep flag per unit, params (3 int64)
    assert _saved_bytes(lambda w: td.targeted_unit_dropout(w, 0.5, 0.5, seed=1), w)[0] <= 32 + 24
    for fn in (lambda w: td.targeted_weight_dropout(w, 0.5, 0.5, seed=1, mask="bits", backend="reference"),
               lambda w: td.targeted_nm_dropout(w, 0.5, seed=1, mask="bits", backend="reference")):
        # bits: 1 bit per element (rows padded to 32 bits) + the limit + params; not the weight
        got, keeps_w = _saved_bytes(fn, w)
        assert got <= 32 * 4 * 2 + 4 * 32 + 40 and not keeps_w


# ---- bad input ---------------------------------------------------------------------------
BAD = [
    (dict(drop_rate=1.5), ValueError, "drop_rate"),
    (dict(drop_rate=-0.1), ValueError, "drop_rate"),
    (dict(drop_rate=float("nan")), ValueError, "drop_rate"),
    (dict(targ_rate=2), ValueError, "targ_rate"),
    (dict(targ_rate=float("nan")), ValueError, "targ_rate"),
    (dict(targ_rate="0.5"), TypeError, "targ_rate"),
    (dict(drop_rate=True), TypeError, "drop_rate"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend=3), TypeError, "backend"),
    (dict(training="yes"), TypeError, "training"),
    (dict(w=torch.randn(5)), ValueError, "w must have at least 2 dimensions"),
    (dict(w=torch.ones(3, 3, dtype=torch.int64)), TypeError, "w must be a real floating-point"),
    (dict(w=torch.ones(3, 3, dtype=torch.complex64)), TypeError, "w must be a real floating-point"),
    (dict(w=[[1.0, 2.0]]), TypeError, "w must be a torch.Tensor"),
]


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("change,exc,msg", BAD, ids=[f"{list(c)[0]}={c[list(c)[0]]!r}"[:40] for c, _, _ in BAD])
def test_bad_input(fn, change, exc, msg):
    args = dict(w=torch.randn(4, 4), drop_rate=0.5, targ_rate=0.5, seed=0, backend="auto", training=True) | change
    w, d, t = args.pop("w"), args.pop("drop_rate"), args.pop("targ_rate")
    with pytest.raises(exc, match=msg):
        fn(w, d, t, **args)


def test_bad_prune_rate():
    for fn in (td.prune_weights, td.prune_units):
        with pytest.raises(ValueError, match="rate"):
            fn(torch.randn(3, 3), 1.01)


@pytest.mark.parametrize("name", ["triton", "native"])
def test_unavailable_backend_says_why(name, monkeypatch):
    from td_kernels import _registry
    monkeypatch.delitem(_registry._BACKENDS, name, raising=False)
    monkeypatch.setitem(_registry._UNAVAILABLE, name, "it was not built; build it with X")
    with pytest.raises(ValueError, match=f"backend '{name}' is not available: it was not built; build it with X"):
        td.targeted_weight_dropout(torch.randn(3, 3), 0.5, 0.5, backend=name)
    assert name not in td.available_backends()


def test_backend_for_absent_device_says_why():
    if not torch.cuda.is_available():
        assert td.available_backends("cuda") == []
        with pytest.raises(ValueError, match="no cuda device"):
            from td_kernels import _registry
            _registry.resolve("reference", torch.device("cuda"), torch.float32)


def test_nan_inf_weights_never_crash():
    w = torch.tensor([[float("nan"), 1.0, float("inf"), -float("inf"), 0.0, 2.0]])
    out = td.targeted_weight_dropout(w, 1.0, 0.5, seed=0)  # k = 3: 0, 1, 2 are below the threshold inf
    assert out[0, 1] == 0 and out[0, 5] == 0 and torch.isnan(out[0, 0]) and out[0, 2] == float("inf")
    u = td.prune_units(torch.tensor([[float("nan")], [1.0], [float("inf")]]), 2 / 3)
    assert u[1, 0] == 0 and u[2, 0] == 0 and torch.isnan(u[0, 0])  # NaN norm ranks above inf


# ---- torch.library and torch.compile -----------------------------------------------------
def _op_samples():
    wparams = torch.tensor([12, 3, 2**31, 0, 8], dtype=torch.int64)   # (seed, k, D, origin, row_stride)
    nparams = torch.tensor([12, 2**31, 8 + 4, 12], dtype=torch.int64)  # (seed, D, origin, row_stride)
    uparams = torch.tensor([12, 3, 2**31], dtype=torch.int64)
    for dtype in (torch.float32, torch.float64):
        w = torch.randn(5, 8, dtype=dtype, requires_grad=True)
        for mask in ("bits", "recompute"):
            yield torch.ops.td_kernels.weight_dropout, (w, wparams, "reference", mask)
            yield torch.ops.td_kernels.nm_dropout, (w, nparams, 2, 4, "reference", mask)
        yield torch.ops.td_kernels.weight_dropout, (w, wparams, "reference", "recompute",
                                                    torch.full((5,), 2**29, dtype=torch.int32))
        yield torch.ops.td_kernels.unit_dropout, (w, uparams, "reference")
    g, w = torch.randn(5, 8), torch.randn(5, 8)
    _, limit, bits = torch.ops.td_kernels.weight_dropout(w, wparams, "reference", "bits")
    yield torch.ops.td_kernels.weight_dropout_backward, (g, w, limit, bits[:0], wparams, "reference", "recompute")
    yield torch.ops.td_kernels.weight_dropout_backward, (g, None, limit, bits, wparams, "reference", "bits")
    _, nbits = torch.ops.td_kernels.nm_dropout(w, nparams, 2, 4, "reference", "bits")
    yield torch.ops.td_kernels.nm_dropout_backward, (g, w, nbits[:0], nparams, 2, 4, "reference", "recompute")
    yield torch.ops.td_kernels.nm_dropout_backward, (g, None, nbits, nparams, 2, 4, "reference", "bits")
    yield torch.ops.td_kernels.unit_dropout_backward, (g, torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool), "reference")


OP_SAMPLES = len(list(_op_samples()))


@pytest.mark.parametrize("i", range(OP_SAMPLES))
def test_opcheck(i):
    op, args = list(_op_samples())[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_no_recompile_on_new_seed():
    import torch._dynamo
    torch._dynamo.reset()
    lin = torch.nn.Linear(16, 8)

    def f(x):  # seed=None: a fresh seed each call is drawn inside the graph, as in training
        w = td.targeted_weight_dropout(lin.weight, 0.5, 0.5)
        w = td.targeted_unit_dropout(w, 0.5, 0.5)
        return torch.nn.functional.linear(x, w, lin.bias)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 16)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [cf(x) for _ in range(4)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])
    torch.manual_seed(3)
    a = cf(x)
    torch.manual_seed(3)
    assert torch.equal(a, f(x))  # the compiled graph draws the seed as eager does
    cf(x).sum().backward()
    assert lin.weight.grad is not None


def test_torch_compile_inductor_seeds():
    """Inductor draws seed=None with its own generator: reproducible under torch.manual_seed; with
    fallback_random it draws exactly as eager does (README, "torch.compile")."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    lin = torch.nn.Linear(16, 8)

    def f(x):
        return torch.nn.functional.linear(x, td.targeted_weight_dropout(lin.weight, 0.5, 0.5), lin.bias)

    x = torch.randn(4, 16)
    for fallback in (False, True):
        torch._dynamo.reset()
        with inductor_config.patch(fallback_random=fallback):
            cf = torch.compile(f, fullgraph=True)
            torch.manual_seed(3)
            a = cf(x)
            torch.manual_seed(3)
            assert torch.equal(a, cf(x))
            if fallback:
                torch.manual_seed(3)
                assert torch.equal(a, f(x))


def test_tensor_rates_equal_float_rates():
    w = torch.randn(7, 33)
    for d, t in [(0.5, 0.29), (1.0, 1.0), (0.0, 0.5), (0.3, 0.0), (0.999, 0.01)]:
        for fn in FUNCS:
            a = fn(w, d, t, seed=4)
            b = fn(w, torch.tensor(d, dtype=torch.float64), torch.tensor(t), seed=4)
            oracle.assert_bits_equal(a, b)
    assert R.count(torch.tensor(0.29, dtype=torch.float64), 100).item() == R.count(0.29, 100) == 29
    with pytest.raises(ValueError, match="drop_rate"):
        td.targeted_weight_dropout(w, torch.tensor(1.5), 0.5)
    with pytest.raises(TypeError, match="targ_rate"):
        td.targeted_weight_dropout(w, 0.5, torch.tensor([0.5]))


def test_default_device_context_does_not_move_the_seed():
    w = torch.randn(4, 6)
    expect = td.targeted_weight_dropout(w, 0.5, 0.5, seed=5)
    with torch.device("meta"):
        oracle.assert_bits_equal(td.targeted_weight_dropout(w, 0.5, 0.5, seed=5), expect)
        torch.manual_seed(2)
        a = td.targeted_weight_dropout(w, 0.5, 0.5)
    torch.manual_seed(2)
    oracle.assert_bits_equal(a, td.targeted_weight_dropout(w, 0.5, 0.5))


def test_sparse_weight_is_refused():
    with pytest.raises(TypeError, match="w must be a dense"):
        td.targeted_weight_dropout(torch.eye(3).to_sparse(), 0.5, 0.5)


def test_ops_refuse_bad_params():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="params"):
        torch.ops.td_kernels.weight_dropout(w, torch.tensor([1, 2]), "reference", "bits")
    with pytest.raises(ValueError, match="params"):
        torch.ops.td_kernels.nm_dropout(w, torch.tensor([1, 2, 3, 4, 5]), 2, 4, "reference", "bits")
    with pytest.raises(ValueError, match="mask"):
        torch.ops.td_kernels.weight_dropout(w, torch.tensor([1, 2, 3, 0, 4]), "reference", "bytes")
    with pytest.raises(ValueError, match="window"):  # a row of 4 does not fit a global row of 3
        torch.ops.td_kernels.weight_dropout(w, torch.tensor([1, 2, 3, 0, 3]), "reference", "bits")


class _Passthrough(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that changes nothing, but sends td_kernels down the custom-op path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", td.available_backends("cpu"))
@pytest.mark.parametrize("kind", ["weight-bits", "weight-recompute", "nm-bits", "nm-recompute", "unit"])
def test_eager_path_matches_the_custom_op(backend, kind, monkeypatch):
    """Plain eager calls skip torch.library's dispatch (an autograd.Function over the same
    impls); anything else takes the op. Both give the same outputs and gradients, bit for bit."""
    from td_kernels import ops
    name, _, mask = kind.partition("-")
    fn = {"weight": lambda w: td.targeted_weight_dropout(w, 0.5, 0.6, seed=7, backend=backend, mask=mask),
          "nm": lambda w: td.targeted_nm_dropout(w, 0.5, n=2, m=4, seed=7, backend=backend, mask=mask),
          "unit": lambda w: td.targeted_unit_dropout(w, 0.5, 0.6, seed=7, backend=backend)}[name]
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(6, 16, generator=gen).round(decimals=1)  # ties
    g = torch.randn(6, 16, generator=gen)
    calls = []
    for op in [f"_{name}_dropout_op", f"_{name}_dropout_backward_op"]:
        real = getattr(ops, op)
        monkeypatch.setattr(ops, op, lambda *a, real=real, op=op: calls.append(op) or real(*a))
    w = w0.clone().requires_grad_()
    out = fn(w)
    (grad,) = torch.autograd.grad(out, w, g)
    assert calls == []  # the eager path
    w = w0.clone().requires_grad_()
    with _Passthrough():
        out_op = fn(w)
        (grad_op,) = torch.autograd.grad(out_op, w, g)
    assert calls == [f"_{name}_dropout_op", f"_{name}_dropout_backward_op"]
    oracle.assert_bits_equal(out, out_op)
    oracle.assert_bits_equal(grad, grad_op)
    assert not torch.equal(out, w0)  # something was dropped: the comparison can fail
