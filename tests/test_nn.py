"""td.nn: targeted dropout in the layer's forward (plain classes, plain state_dicts), the layer
registry, N:M mode, the per-layer random stream (data parallel, exact resume), compile, meta."""
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import td_kernels as td
from td_kernels.training.nn import (TargetedDropout, apply_targeted_dropout, get_rng_state, layer_type, register_layer,
                           remove_targeted_dropout, set_rng_state, targeted_dropout_modules)


def _model():
    return nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(),          # [N, 2, 7] -> [N, 4, 5] -> [N, 20]
        nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3),
    )


def _x(n=5):
    return torch.randn(n, 2, 7)


def _seed(layer):
    """The seed the layer's next training forward uses: b + c."""
    b, c = layer.targeted_dropout._rng.tolist()
    return b + c


def test_apply_keeps_classes_and_targets_every_layer_but_the_logits():
    torch.manual_seed(0)
    m = _model()
    keys = list(m.state_dict())
    assert apply_targeted_dropout(m, 0.5, 0.5) == ["0", "3"]
    assert type(m[0]) is nn.Conv1d and type(m[3]) is nn.Linear and type(m[3].weight) is nn.Parameter
    assert "forward" in m[3].__dict__ and "forward" not in m[5].__dict__
    assert [n for n, _, _ in targeted_dropout_modules(m)] == ["0", "3"]
    assert "drop_rate=0.5, targ_rate=0.5, mode='weight'" in repr(m)
    assert list(m.state_dict()) == keys  # no parameter or buffer added, none renamed


@pytest.mark.parametrize("exclude, names", [((), ["0", "3", "5"]), (["0"], ["3", "5"]), ("module", ["0", "5"])])
def test_exclude(exclude, names):
    m = _model()
    if exclude == "module":
        exclude = [m[3]]
    assert apply_targeted_dropout(m, 0.5, 0.5, exclude=exclude) == names


def test_all_conv_kinds():
    m = nn.Sequential(nn.Conv1d(1, 2, 1), nn.Conv2d(1, 2, 1), nn.Conv3d(1, 2, 1), nn.Linear(2, 2), nn.Linear(2, 2))
    assert apply_targeted_dropout(m, 0.5, 0.5) == ["0", "1", "2", "3"]


@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_training_forward_is_the_functional_op_seeded_b_plus_c(mode):
    torch.manual_seed(0)
    layer = nn.Linear(12, 9)
    apply_targeted_dropout(layer, 0.7, 0.6, mode, exclude=())
    w = layer.weight
    fn = td.targeted_weight_dropout if mode == "weight" else td.targeted_unit_dropout
    x = torch.randn(4, 12)
    outs = []
    for c in range(4):
        s = _seed(layer)
        assert layer.targeted_dropout._rng[1] == c
        got = layer(x)
        want = nn.functional.linear(x, fn(w, 0.7, 0.6, seed=s), layer.bias)
        assert torch.equal(got, want)
        outs.append(got)
    assert not torch.equal(outs[0], nn.functional.linear(x, w, layer.bias))  # something was dropped
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # each forward a new seed


def test_eval_is_identity_deterministic_and_does_not_advance_the_stream():
    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 1.0, 0.9)
    m.eval()
    x = _x()
    plain = _model()
    plain.load_state_dict(m.state_dict())
    assert torch.equal(m(x), plain(x)) and torch.equal(m(x), m(x))
    assert get_rng_state(m)[:, 1].tolist() == [0, 0]
    m.train()
    assert not torch.equal(m(x), plain(x))
    assert get_rng_state(m)[:, 1].tolist() == [1, 1]


def test_zero_rates_are_identity_but_still_count_the_forward():
    m = _model()
    apply_targeted_dropout(m, 0.0, 0.9)
    plain = _model()
    plain.load_state_dict(m.state_dict())
    x = _x()
    assert torch.equal(m(x), plain(x))
    assert get_rng_state(m)[:, 1].tolist() == [1, 1]  # compiled and eager runs stay in step


@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_gradient_reaches_the_parameter_masked(mode):
    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 0.6, 0.5, mode)
    x = _x()
    s0, s3 = _seed(m[0]), _seed(m[3])
    m(x).square().sum().backward()
    got = [m[0].weight.grad, m[3].weight.grad]
    # the same computation by hand, with the functional op and the same seeds
    w0 = m[0].weight.detach().clone().requires_grad_()
    w3 = m[3].weight.detach().clone().requires_grad_()
    fn = td.targeted_weight_dropout if mode == "weight" else td.targeted_unit_dropout
    h = nn.functional.conv1d(x, fn(w0, 0.6, 0.5, seed=s0), m[0].bias).relu().flatten(1)
    t3 = fn(w3, 0.6, 0.5, seed=s3)
    out = nn.functional.linear(nn.functional.linear(h, t3, m[3].bias).relu(), m[5].weight, m[5].bias)
    out.square().sum().backward()
    assert torch.equal(got[0], w0.grad) and torch.equal(got[1], w3.grad)
    dropped = (t3 == 0) & (w3 != 0)
    assert dropped.any() and (got[1][dropped] == 0).all()


def _trained(steps=1):
    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 0.5, 0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(steps):
        m(_x()).sum().backward()
        opt.step()
    return m


def test_state_dicts_are_plain_both_ways():
    m = _trained()
    sd = m.state_dict()
    plain = _model()
    assert list(sd) == list(plain.state_dict())
    plain.load_state_dict(sd, strict=True)            # targeted -> plain
    m2 = _model()
    apply_targeted_dropout(m2, 0.5, 0.5)
    m2.load_state_dict(plain.state_dict(), strict=True)  # plain -> targeted
    m.eval(), m2.eval(), plain.eval()
    x = _x()
    assert torch.equal(m(x), plain(x)) and torch.equal(m2(x), plain(x))


def test_remove_restores_the_plain_layer():
    m = _trained()
    raw = m[3].weight.detach().clone()
    param = m[3].weight
    assert remove_targeted_dropout(m) == ["0", "3"]
    assert "forward" not in m[3].__dict__ and "__getstate__" not in m[3].__dict__
    assert not hasattr(m[3], "targeted_dropout") and type(m[3]).forward is nn.Linear.forward
    assert m[3].weight is param and torch.equal(m[3].weight, raw)  # raw, not a masked draw
    x = _x()
    assert torch.equal(m(x), m(x))  # training mode, but nothing is dropped any more
    assert remove_targeted_dropout(m) == []


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_a_targeted_model_pickles_and_copies(how):
    m = _trained()
    if how == "pickle":
        m2 = pickle.loads(pickle.dumps(m))
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        m2 = torch.load(buf, weights_only=False)
    else:
        m2 = copy.deepcopy(m)
    for a, b in [(m[0], m2[0]), (m[3], m2[3])]:
        assert b.forward.__self__ is b and b.forward.__func__ is a.forward.__func__
        assert torch.equal(a.targeted_dropout._rng, b.targeted_dropout._rng)
    x = _x()
    assert torch.equal(m(x), m2(x))  # the same stream: the same masks
    m2 = pickle.loads(pickle.dumps(m2))  # and again
    assert m2[3].forward.__self__ is m2[3]


def test_other_parametrizations_compose():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    m = _model()
    parametrize.register_parametrization(m[3], "weight", Double())
    apply_targeted_dropout(m, 0.5, 0.5, exclude=["0", "5"])
    x = torch.randn(4, 20)
    s = _seed(m[3])
    want = nn.functional.linear(x, td.targeted_weight_dropout(2 * m[3].parametrizations.weight.original, 0.5, 0.5,
                                                                seed=s), m[3].bias)
    assert torch.equal(m[3](x), want)
    remove_targeted_dropout(m)
    assert [type(p) for p in m[3].parametrizations.weight] == [Double]


def test_rates_are_settable_and_checked():
    t = TargetedDropout(0.5, 0.5)
    t.drop_rate, t.targ_rate = 0.25, 1
    assert (t.drop_rate, t.targ_rate) == (0.25, 1.0)
    with pytest.raises(ValueError, match="drop_rate"):
        t.drop_rate = 1.5
    with pytest.raises(ValueError, match="targ_rate"):
        t.targ_rate = -0.1
    with pytest.raises(ValueError, match="targ_rate"):
        t.targ_rate = float("nan")
    with pytest.raises(TypeError, match="drop_rate"):
        t.drop_rate = "0.5"
    with pytest.raises(TypeError, match="targ_rate"):
        t.targ_rate = None
    nm = TargetedDropout(0.5, mode="nm")
    assert (nm.n, nm.m, nm.targ_rate) == (2, 4, None)
    with pytest.raises(ValueError, match="targ_rate has no meaning"):
        nm.targ_rate = 0.5


def test_bad_arguments():
    m = _model()
    with pytest.raises(ValueError, match="mode"):
        TargetedDropout(0.5, 0.5, mode="row")
    with pytest.raises(ValueError, match="drop_rate"):
        apply_targeted_dropout(m, 2.0, 0.5)
    with pytest.raises(ValueError, match="targ_rate"):
        apply_targeted_dropout(m, 0.5, -1)
    with pytest.raises(TypeError, match="targ_rate"):
        apply_targeted_dropout(m, 0.5)
    with pytest.raises(ValueError, match="mode"):
        apply_targeted_dropout(m, 0.5, 0.5, mode="units")
    with pytest.raises(ValueError, match="apply_to"):
        apply_targeted_dropout(m, 0.5, 0.5, mode="weight", apply_to="output")
    with pytest.raises(ValueError, match="apply_to"):
        apply_targeted_dropout(m, 0.5, 0.5, mode="unit", apply_to="input")
    with pytest.raises(ValueError, match="exclude"):
        apply_targeted_dropout(m, 0.5, 0.5, exclude=["nope"])
    with pytest.raises(TypeError, match="exclude"):
        apply_targeted_dropout(m, 0.5, 0.5, exclude=3)
    with pytest.raises(TypeError, match="model"):
        apply_targeted_dropout("model", 0.5, 0.5)
    with pytest.raises(ValueError, match="backend"):
        apply_targeted_dropout(m, 0.5, 0.5, backend="fastest")
    with pytest.raises(ValueError, match="targ_rate has no meaning"):
        apply_targeted_dropout(m, 0.5, 0.5, mode="nm")
    with pytest.raises(ValueError, match="n and m"):
        apply_targeted_dropout(m, 0.5, 0.5, n=2, m=4)
    with pytest.raises(ValueError, match="n < m"):
        apply_targeted_dropout(m, 0.5, mode="nm", n=4, m=4)
    with pytest.raises(TypeError, match="m must be an int"):
        apply_targeted_dropout(m, 0.5, mode="nm", n=2, m=4.0)
    with pytest.raises(ValueError, match="apply_targeted_dropout"):
        get_rng_state(m)  # nothing applied yet (and nothing half-applied by the errors above)
    apply_targeted_dropout(m, 0.5, 0.5)
    with pytest.raises(ValueError, match="already"):
        apply_targeted_dropout(m, 0.5, 0.5)
    with pytest.raises(ValueError, match="backend"):
        TargetedDropout(0.5, 0.5, backend="nope")


def test_a_tensor_seed_is_the_same_seed():
    """td.nn hands the functional ops its seed b + c as a 0-dim int64 CPU tensor."""
    w = torch.randn(6, 8)
    for s in (0, 5, 2**62 + 7):
        t = torch.tensor(s, dtype=torch.int64)
        assert torch.equal(td.targeted_weight_dropout(w, 0.5, 0.5, seed=t), td.targeted_weight_dropout(w, 0.5, 0.5, seed=s))
        assert torch.equal(td.targeted_nm_dropout(w, 0.5, seed=t),
                           td.targeted_nm_dropout(w, 0.5, seed=s))
    with pytest.raises(TypeError, match="seed"):
        td.targeted_weight_dropout(w, 0.5, 0.5, seed=torch.tensor(3.0))
    with pytest.raises(TypeError, match="seed"):
        td.targeted_weight_dropout(w, 0.5, 0.5, seed=torch.tensor([3]))
    with pytest.raises(ValueError, match="seed"):
        td.targeted_weight_dropout(w, 0.5, 0.5, seed=torch.tensor(-1))


def test_nested_tensor_gets_a_clear_type_error():
    for w in (torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)]),
              torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged)):
        _check_nested(w)


def _check_nested(w):
    for fn in (lambda: td.targeted_weight_dropout(w, 0.5, 0.5), lambda: td.targeted_unit_dropout(w, 0.5, 0.5),
               lambda: td.targeted_nm_dropout(w, 0.5), lambda: td.prune_weights(w, 0.5)):
        with pytest.raises(TypeError, match="nested"):
            fn()


# ---- what gets targeted ------------------------------------------------------------------
def test_nothing_to_target_raises():
    with pytest.raises(ValueError, match="no layer"):
        apply_targeted_dropout(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5, 0.5)
    with pytest.raises(ValueError, match="output head '0'"):  # a lone Linear is its own logits layer
        apply_targeted_dropout(nn.Sequential(nn.Linear(4, 2)), 0.5, 0.5)
    assert apply_targeted_dropout(nn.Sequential(nn.Linear(4, 2)), 0.5, 0.5, exclude=()) == ["0"]


class _TiedLM(nn.Module):
    """An embedding tied to the output head, as GPT-2's wte and lm_head."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(self.fc(self.wte(ids)).relu())


def test_tied_weights_are_never_targeted():
    m = _TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_targeted_dropout(m, 0.5, 0.5) == ["fc"]  # the head is excluded anyway: no warning
    m = _TiedLM()
    with pytest.warns(UserWarning, match="'lm_head'.*tied"):
        assert apply_targeted_dropout(m, 0.5, 0.5, exclude=()) == ["fc"]


def test_multihead_attention_out_proj_is_skipped_with_a_warning():
    m = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="'0.out_proj'.*MultiheadAttention"):
        assert apply_targeted_dropout(m, 0.5, 0.5) == ["1"]


# ---- the registry ------------------------------------------------------------------------
class TransposedLinear(nn.Module):
    """A layer storing its weight [in, out], as transformers' Conv1D."""

    def __init__(self, nx, nf):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.fixture
def registry():
    saved = dict(td.nn._LAYERS)
    yield
    td.nn._LAYERS.clear()
    td.nn._LAYERS.update(saved)


@pytest.mark.parametrize("with_forward", [True, False])
def test_register_a_layer_whose_units_are_columns(registry, with_forward):
    fwd = (lambda layer, w, x: x @ w + layer.bias) if with_forward else None
    entry = register_layer(TransposedLinear, unit_dim=1, forward=fwd)
    assert layer_type(TransposedLinear(2, 3)) is entry
    torch.manual_seed(0)
    layer = TransposedLinear(12, 10)
    p = layer.weight
    raw = p.detach().clone()
    apply_targeted_dropout(layer, 0.8, 0.5, exclude=())
    # re-laid once: the same Parameter, shape and values, its units-first view contiguous
    assert layer.weight is p and p.shape == (12, 10) and torch.equal(p, raw) and p.t().is_contiguous()
    x = torch.randn(3, 12)
    s = _seed(layer)
    got = layer(x)
    t = td.targeted_weight_dropout(raw.t(), 0.8, 0.5, seed=s)  # units (columns) are the SPEC's rows
    torch.testing.assert_close(got, x @ t.t() + layer.bias, rtol=0, atol=1e-6)
    got.sum().backward()
    assert torch.equal(p.grad == 0, (t.t() == 0) | (x.sum(0)[:, None].expand(12, 10) == 0))
    assert td.prune_model(layer, 0.5, exclude=()) == [""]
    assert torch.equal(layer.weight, td.prune_weights(raw.t(), 0.5).t())
    r = td.sparsity_report(layer)
    assert r.layers[0].units == 10 and r.layers[0].zeros == 10 * 6
    remove_targeted_dropout(layer)
    assert layer.weight is p and p.is_contiguous()


def test_a_class_is_recognised_by_name_without_importing_its_module(registry):
    cls = type("Conv1D", (TransposedLinear,), {"forward": TransposedLinear.forward})
    cls.__module__, cls.__qualname__ = "transformers.pytorch_utils", "Conv1D"
    layer = cls(8, 6)
    entry = layer_type(layer)
    assert entry.unit_dim == 1 and entry.forward is td.nn._gpt2_conv1d_forward
    apply_targeted_dropout(layer, 0.5, 0.5, exclude=())
    x = torch.randn(2, 4, 8)
    s = _seed(layer)
    t = td.targeted_weight_dropout(layer.weight.t(), 0.5, 0.5, seed=s).t()
    torch.testing.assert_close(layer(x), x @ t + layer.bias, rtol=0, atol=1e-6)


def test_a_subclass_with_its_own_forward_runs_that_forward(registry):
    class Scaled(nn.Linear):
        def forward(self, x):
            return 3 * super().forward(x)

    torch.manual_seed(0)
    layer = Scaled(6, 5)
    assert layer_type(layer).forward is None
    apply_targeted_dropout(layer, 0.9, 0.5, exclude=())
    x = torch.randn(2, 6)
    s = _seed(layer)
    want = 3 * nn.functional.linear(x, td.targeted_weight_dropout(layer.weight, 0.9, 0.5, seed=s), layer.bias)
    assert torch.equal(layer(x), want)
    assert type(layer.weight) is nn.Parameter  # swapped back after the forward


def test_register_layer_bad_arguments(registry):
    with pytest.raises(TypeError, match="cls"):
        register_layer(int)
    with pytest.raises(ValueError, match="QualName"):
        register_layer("Conv1D")
    with pytest.raises(TypeError, match="param"):
        register_layer(TransposedLinear, param=3)
    with pytest.raises(TypeError, match="unit_dim"):
        register_layer(TransposedLinear, unit_dim=-1)
    with pytest.raises(TypeError, match="forward"):
        register_layer(TransposedLinear, forward="F.linear")


# ---- N:M mode ----------------------------------------------------------------------------
def test_nm_mode_is_the_functional_op():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
    assert apply_targeted_dropout(m, 1.0, mode="nm", n=2, m=4) == ["0"]
    assert "n=2, m=4, mode='nm'" in repr(m)
    x = torch.randn(5, 8)
    s = _seed(m[0])
    h = nn.functional.linear(x, td.targeted_nm_dropout(m[0].weight, 1.0, n=2, m=4, seed=s),
                             m[0].bias)
    assert torch.equal(m(x), m[2](h.relu()))
    # drop_rate 1: every forward sees the exact 2:4 pattern; the gradient is masked alike
    m[0].weight.grad = None
    m(x).sum().backward()
    g = m[0].weight.grad.reshape(12, 2, 4)
    assert ((g != 0).sum(-1) <= 2).all()


def test_nm_mode_skips_layers_m_does_not_divide():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="'0'.*m=4 does not divide its fan-in"):
        assert apply_targeted_dropout(m, 0.5, mode="nm") == ["2"]
    with pytest.raises(ValueError, match="no layer"), pytest.warns(UserWarning):
        apply_targeted_dropout(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2)), 0.5, mode="nm")


# ---- the random stream -------------------------------------------------------------------
def test_every_rank_draws_the_same_masks_whatever_else_it_draws():
    """Data parallel: after the same torch.manual_seed, apply_targeted_dropout gives every
    process the same stream, though one rank draws from the default generator and one does not."""
    masks = []
    for rank in range(2):
        torch.manual_seed(1234)
        m = _model()
        apply_targeted_dropout(m, 0.9, 0.7)
        ranks_masks = []
        for _ in range(3):
            if rank == 1:
                torch.rand(100)  # a random augmentation, a dropout elsewhere, ...
            seeds = [_seed(m[0]), _seed(m[3])]
            m(_x()).sum().backward()
            ranks_masks.append(seeds)
        masks.append(ranks_masks)
    assert masks[0] == masks[1]
    assert len({s for step in masks[0] for s in step}) == 6  # every layer, every step: a new seed


def test_rng_state_round_trip_and_checks():
    m = _trained(steps=3)
    st = get_rng_state(m)
    assert st.dtype == torch.int64 and st.shape == (2, 2) and st[:, 1].tolist() == [3, 3]
    assert (st[:, 0] < 2**62).all()
    m2 = _model()
    apply_targeted_dropout(m2, 0.5, 0.5)
    set_rng_state(m2, st)
    assert torch.equal(get_rng_state(m2), st)
    st[0, 1] = 99  # get_rng_state returns a copy
    assert get_rng_state(m)[0, 1] == 3
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        set_rng_state(m2, st[:1])
    with pytest.raises(ValueError, match="int64"):
        set_rng_state(m2, st.float())
    with pytest.raises(TypeError, match="state"):
        set_rng_state(m2, [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="negative"):
        set_rng_state(m2, -st)


def test_the_stream_stays_on_the_cpu_and_out_of_state_dict():
    m = _model()
    with torch.device("meta"):
        t = TargetedDropout(0.5, 0.5)  # a default-device context does not move it either
    assert t._rng.device.type == "cpu" and t._rates.device.type == "cpu"
    apply_targeted_dropout(m, 0.5, 0.5)
    m.to(torch.float64)
    assert m[3].targeted_dropout._rng.dtype == torch.int64
    assert not list(m[3].targeted_dropout.state_dict()) and not list(m[3].targeted_dropout.buffers())


def _resume_run(stop_at=None, total=6):
    """Train `total` steps with a ramp; optionally stop at `stop_at`, checkpoint, rebuild from
    scratch under another torch seed, restore, and go on. Returns the final weights."""
    data = [(torch.randn(8, 2, 7, generator=torch.Generator().manual_seed(i)),) for i in range(total)]

    def build():
        m = _model()
        apply_targeted_dropout(m, 0.8, 0.6)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        sched = td.RampSchedule(m, total_steps=4)
        return m, opt, sched

    torch.manual_seed(0)
    m, opt, sched = build()
    for step in range(total):
        if step == stop_at:
            buf = io.BytesIO()
            torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                        "td_rng": td.get_rng_state(m)}, buf)
            buf.seek(0)
            torch.manual_seed(999)  # a new process: another seed, other base seeds
            m, opt, sched = build()
            ckpt = torch.load(buf)
            m.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["schedule"])
            td.set_rng_state(m, ckpt["td_rng"])
        opt.zero_grad()
        m(*data[step]).square().mean().backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in m.parameters()]


def test_exact_resume_draws_the_masks_of_the_uninterrupted_run():
    full = _resume_run()
    resumed = _resume_run(stop_at=3)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
    # and the check can fail: without set_rng_state the resumed run draws other masks
    import unittest.mock as mock
    with mock.patch.object(td, "set_rng_state", lambda model, state: None):
        other = _resume_run(stop_at=3)
    assert not all(torch.equal(a, b) for a, b in zip(full, other))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_mask(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 0.8, 0.6)
    ref = copy.deepcopy(m)
    x = _x().requires_grad_()
    ref(x).square().sum().backward()
    checkpoint(m, x, use_reentrant=use_reentrant).square().sum().backward()
    assert torch.equal(m[3].weight.grad, ref[3].weight.grad) and torch.equal(m[0].weight.grad, ref[0].weight.grad)
    assert get_rng_state(m)[:, 1].tolist() == [1, 1]  # the recomputation drew no new seed


# ---- the output-side unit variant --------------------------------------------------------
def _pair(make, seed=0):
    torch.manual_seed(seed)
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)  # the same base seeds for both
    apply_targeted_dropout(a, 0.7, 0.6, "unit", exclude=())
    torch.manual_seed(1)
    apply_targeted_dropout(b, 0.7, 0.6, "unit", exclude=(), apply_to="output")
    return a, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d_unbatched"])
def test_output_side_equals_weight_side(kind, bias):
    if kind == "linear":
        def make():
            return nn.Sequential(nn.Linear(6, 16, bias=bias), nn.Tanh(), nn.Linear(16, 12, bias=bias))
        x = torch.randn(9, 6)
    elif kind == "conv2d":
        def make():
            return nn.Sequential(nn.Conv2d(3, 16, 3, bias=bias), nn.Tanh(), nn.Conv2d(16, 10, 1, bias=bias))
        x = torch.randn(2, 3, 6, 6)
    else:
        def make():
            return nn.Conv1d(3, 16, 3, bias=bias)
        x = torch.randn(3, 8)  # unbatched: channels are dim 0
    a, b = _pair(make)
    for step in range(3):
        ya = a(x)
        yb = b(x)
        torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
    pa = dict(a.named_parameters())
    for name, p in b.named_parameters():
        torch.testing.assert_close(p.grad, pa[name].grad, rtol=1e-5, atol=1e-6)
    a.eval(), b.eval()
    assert torch.equal(b(x), b(x))


def test_output_side_keeps_the_bias_of_dropped_units():
    torch.manual_seed(0)
    layer = nn.Linear(5, 40)
    apply_targeted_dropout(layer, 1.0, 0.5, "unit", exclude=(), apply_to="output")
    tdm = layer.targeted_dropout
    assert "apply_to='output'" in repr(tdm)
    x = torch.randn(4, 5)
    s = _seed(layer)
    out = layer(x)
    keep = tdm.unit_keep(layer.weight, s)
    assert int((~keep).sum()) == 20  # drop_rate 1: exactly count(0.5, 40) units dropped
    assert torch.equal(out[:, ~keep], layer.bias[~keep].expand(4, -1))
    assert torch.equal(out[:, keep], nn.functional.linear(x, layer.weight, layer.bias)[:, keep])
    # the keep mask is the functional op's: its rows are zero exactly where keep is False
    rows_kept = (td.targeted_unit_dropout(layer.weight, 1.0, 0.5, seed=s) != 0).any(dim=1)
    assert torch.equal(rows_kept, keep)


def test_output_side_remove_and_state_dict():
    torch.manual_seed(0)
    m = _model()
    keys = list(m.state_dict())
    apply_targeted_dropout(m, 0.5, 0.5, "unit", apply_to="output")
    assert list(m.state_dict()) == keys  # no parameters or buffers added
    assert [n for n, _, t in targeted_dropout_modules(m)] == ["0", "3"]
    assert remove_targeted_dropout(m) == ["0", "3"]
    assert not hasattr(m[3], "targeted_dropout") and "forward" not in m[3].__dict__
    x = _x()
    assert torch.equal(m(x), m(x))  # training mode, but nothing is dropped any more


@pytest.mark.parametrize("targ", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("drop", [0.0, 0.5, 1.0])
def test_unit_keep_is_the_specs_keep(drop, targ):
    from td_kernels import reference as ref

    torch.manual_seed(4)
    w = torch.randn(37, 6)
    w[5] = 0.0
    w[9, 2] = float("nan")  # a NaN norm ranks above +inf
    t = TargetedDropout(drop, targ, mode="unit")
    for seed in [0, 1, 2**40 + 3]:
        want = ref.unit_keep(w, seed, ref.count(targ, 37), ref.drop_threshold(drop))
        assert torch.equal(t.unit_keep(w, seed), want)


# ---- deferred initialisation -------------------------------------------------------------
@pytest.mark.parametrize("mode", ["weight", "unit", "nm"])
def test_meta_model_accepts_targeted_dropout_and_runs_on_meta(mode):
    with torch.device("meta"):
        m = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    args = dict(targ_rate=None, mode="nm") if mode == "nm" else dict(targ_rate=0.5, mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the conv's fan-in 6 is no multiple of 4
        apply_targeted_dropout(m, 0.5, **args)
    assert all(p.is_meta for p in m.parameters())
    x = torch.empty(5, 2, 7, device="meta")
    y = m(x)
    assert y.is_meta and y.shape == (5, 3)
    y.sum().backward()
    assert m[2].weight.grad.is_meta and m[2].weight.grad.shape == (16, 20)
    m.to_empty(device="cpu")  # then materialise, as FSDP2 users do
    m(torch.randn(5, 2, 7)).sum().backward()


# ---- torch.compile -----------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def _compiled_run(model, compile_each, steps, x):
    import torch._dynamo
    import torch._dynamo.testing

    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    if compile_each:
        for blk in model[:-1]:
            blk.compile(backend=cnt, fullgraph=True)
        run = model
    else:
        run = torch.compile(model, backend=cnt, fullgraph=True)
    outs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(steps):
            out = run(x)
            out.sum().backward()
            outs.append(out.detach())
    return cnt.frame_count, outs


@pytest.mark.parametrize("compile_each", [True, False], ids=["per_block", "whole_model"])
def test_identical_blocks_share_one_graph_and_the_counter_advances(compile_each):
    """No recompile per layer (error_on_recompile raises otherwise); the compiled model draws the
    masks eager draws for the same random state: the counter's mutation works under compile."""
    torch.manual_seed(0)
    model = nn.Sequential(*[_Block() for _ in range(4)], nn.Linear(16, 3))
    apply_targeted_dropout(model, 0.6, 0.5)
    start = get_rng_state(model)
    eager = copy.deepcopy(model)
    x = torch.randn(5, 16, requires_grad=True)  # every block then sees an input that needs grad
    frames, outs = _compiled_run(model, compile_each, 3, x)
    assert frames == 1
    assert get_rng_state(model)[:, 1].tolist() == [3] * 8
    assert torch.equal(get_rng_state(model)[:, 0], start[:, 0])
    for out in outs:
        want = eager(x)
        want.sum().backward()
        assert torch.equal(out, want.detach())
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_compiled_model_follows_a_schedule_without_recompiling():
    """Rates changed every step by a schedule reach a compiled model as tensor data."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    td.apply_targeted_dropout(model, 0.5, 0.5)
    eager = copy.deepcopy(model)
    sched, sched_e = td.RampSchedule(model, total_steps=6), td.RampSchedule(eager, total_steps=6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 12)
    layer = model[0].targeted_dropout
    assert torch.equal(compiled(x), eager(x))  # the first compile
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            sched.step(), sched_e.step()
            assert torch.equal(compiled(x), eager(x)), (layer.drop_rate, layer.targ_rate)
    assert layer.drop_rate == 0.5 and layer.targ_rate == 0.5


@pytest.mark.parametrize("mode", ["weight", "nm"])
def test_mask_formats_give_the_same_training(mode):
    """mask="bits" (the default) and mask="recompute" draw the same masks and gradients; only
    what autograd keeps differs (1 bit per element vs the weight and the limit)."""
    runs = []
    for mask in ("bits", "recompute"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        kw = dict(n=2, m=4) if mode == "nm" else dict(targ_rate=0.5)
        td.apply_targeted_dropout(model, 0.5, mode=mode, mask=mask, **kw)
        assert f"mask={mask!r}" in repr(model[0])
        x = torch.randn(8, 16)
        for _ in range(2):
            model(x).square().sum().backward()
        runs.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mask"):
        td.apply_targeted_dropout(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), 0.5, 0.5,
                                  mask="bytes")
