"""td.nn: the TargetedDropout parametrization, apply/remove, and the output-side unit variant."""
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import td_kernels as td
from td_kernels.nn import TargetedDropout, apply_targeted_dropout, remove_targeted_dropout, targeted_dropout_modules


def _model():
    return nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(),          # [N, 2, 7] -> [N, 4, 5] -> [N, 20]
        nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3),
    )


def _x(n=5):
    return torch.randn(n, 2, 7)


def test_apply_parametrizes_every_layer_but_the_logits():
    torch.manual_seed(0)
    m = _model()
    assert apply_targeted_dropout(m, 0.5, 0.5) == ["0", "3"]
    assert parametrize.is_parametrized(m[0], "weight") and parametrize.is_parametrized(m[3], "weight")
    assert not parametrize.is_parametrized(m[5])
    assert [n for n, _, _ in targeted_dropout_modules(m)] == ["0", "3"]
    assert "drop_rate=0.5, targ_rate=0.5, mode='weight'" in repr(m)


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
def test_training_forward_is_the_functional_op_with_a_fresh_seed(mode):
    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 0.7, 0.6, mode)
    layer = m[3]
    w = layer.parametrizations.weight.original
    fn = td.targeted_weight_dropout if mode == "weight" else td.targeted_unit_dropout
    torch.manual_seed(123)
    got = layer.weight
    torch.manual_seed(123)  # seed=None draws from torch's default generator: same draw
    assert torch.equal(got, fn(w, 0.7, 0.6))
    assert not torch.equal(got, w)  # something was dropped
    # each forward draws a new seed
    draws = [layer.weight for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_eval_is_identity_and_deterministic():
    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 1.0, 0.9)
    m.eval()
    assert torch.equal(m[3].weight, m[3].parametrizations.weight.original)
    x = _x()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m[3].weight, m[3].parametrizations.weight.original)


def test_zero_rates_are_identity():
    m = _model()
    apply_targeted_dropout(m, 0.0, 0.9)
    assert torch.equal(m[3].weight, m[3].parametrizations.weight.original)


@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_gradient_reaches_the_original_parameter_masked(mode):
    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 0.6, 0.5, mode)
    x = _x()
    torch.manual_seed(7)
    m(x).square().sum().backward()
    got = [m[0].parametrizations.weight.original.grad, m[3].parametrizations.weight.original.grad]
    # the same computation by hand, with the functional op and the same seeds
    w0 = m[0].parametrizations.weight.original.detach().clone().requires_grad_()
    w3 = m[3].parametrizations.weight.original.detach().clone().requires_grad_()
    fn = td.targeted_weight_dropout if mode == "weight" else td.targeted_unit_dropout
    torch.manual_seed(7)
    h = nn.functional.conv1d(x, fn(w0, 0.6, 0.5), m[0].bias).relu().flatten(1)
    t3 = fn(w3, 0.6, 0.5)
    out = nn.functional.linear(nn.functional.linear(h, t3, m[3].bias).relu(), m[5].weight, m[5].bias)
    out.square().sum().backward()
    assert torch.equal(got[0], w0.grad) and torch.equal(got[1], w3.grad)
    dropped = (t3 == 0) & (w3 != 0)
    assert dropped.any() and (got[1][dropped] == 0).all()


def test_round_trip_train_state_dict_remove():
    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 0.5, 0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(_x()).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = _model()
    apply_targeted_dropout(m2, 0.5, 0.5)
    m2.load_state_dict(torch.load(buf))
    m.eval(), m2.eval()
    x = _x()
    assert torch.equal(m(x), m2(x))
    raw = m[3].parametrizations.weight.original.detach().clone()
    assert remove_targeted_dropout(m) == ["0", "3"]
    assert not parametrize.is_parametrized(m[3])
    assert type(m[3].weight) is nn.Parameter and torch.equal(m[3].weight, raw)  # raw, not a masked draw
    assert set(m.state_dict()) == set(_model().state_dict())
    assert torch.equal(m(x), m2(x))
    assert remove_targeted_dropout(m) == []


def test_remove_keeps_other_parametrizations():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    m = _model()
    parametrize.register_parametrization(m[3], "weight", Double())
    apply_targeted_dropout(m, 0.5, 0.5, exclude=["0", "5"])
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


def test_bad_arguments():
    m = _model()
    with pytest.raises(ValueError, match="mode"):
        TargetedDropout(0.5, 0.5, mode="row")
    with pytest.raises(ValueError, match="drop_rate"):
        apply_targeted_dropout(m, 2.0, 0.5)
    with pytest.raises(ValueError, match="targ_rate"):
        apply_targeted_dropout(m, 0.5, -1)
    with pytest.raises(ValueError, match="mode"):
        apply_targeted_dropout(m, 0.5, 0.5, mode="units")
    with pytest.raises(ValueError, match="apply_to"):
        apply_targeted_dropout(m, 0.5, 0.5, mode="weight", apply_to="output")
    with pytest.raises(ValueError, match="exclude"):
        apply_targeted_dropout(m, 0.5, 0.5, exclude=["nope"])
    with pytest.raises(TypeError, match="exclude"):
        apply_targeted_dropout(m, 0.5, 0.5, exclude=3)
    with pytest.raises(TypeError, match="model"):
        apply_targeted_dropout("model", 0.5, 0.5)
    apply_targeted_dropout(m, 0.5, 0.5)
    with pytest.raises(ValueError, match="already"):
        apply_targeted_dropout(m, 0.5, 0.5)
    with pytest.raises(ValueError, match="backend"):
        TargetedDropout(0.5, 0.5, backend="nope").forward(torch.randn(3, 4))


# ---- the output-side unit variant --------------------------------------------------------
def _pair(make, seed=0):
    torch.manual_seed(seed)
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    apply_targeted_dropout(a, 0.7, 0.6, "unit", exclude=())
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
        torch.manual_seed(100 + step)  # both variants draw one seed per layer, in layer order
        ya = a(x)
        torch.manual_seed(100 + step)
        yb = b(x)
        torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
    pa = dict(a.named_parameters())
    for name, p in b.named_parameters():
        key = name if name in pa else name.replace("weight", "parametrizations.weight.original")
        torch.testing.assert_close(p.grad, pa[key].grad, rtol=1e-5, atol=1e-6)
    a.eval(), b.eval()
    assert torch.equal(b(x), b(x))


def test_output_side_keeps_the_bias_of_dropped_units():
    torch.manual_seed(0)
    layer = nn.Linear(5, 40)
    apply_targeted_dropout(layer, 1.0, 0.5, "unit", exclude=(), apply_to="output")
    tdm = layer.targeted_dropout
    x = torch.randn(4, 5)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    keep = tdm.unit_keep(layer.weight)
    assert int((~keep).sum()) == 20  # drop_rate 1: exactly count(0.5, 40) units dropped
    assert torch.equal(out[:, ~keep], layer.bias[~keep].expand(4, -1))
    assert torch.equal(out[:, keep], nn.functional.linear(x, layer.weight, layer.bias)[:, keep])
    # the keep mask is the functional op's: its rows are zero exactly where keep is False
    torch.manual_seed(3)
    rows_kept = (td.targeted_unit_dropout(layer.weight, 1.0, 0.5) != 0).any(dim=1)
    assert torch.equal(rows_kept, keep)


def test_output_side_remove_and_state_dict():
    torch.manual_seed(0)
    m = _model()
    keys = set(m.state_dict())
    apply_targeted_dropout(m, 0.5, 0.5, "unit", apply_to="output")
    assert set(m.state_dict()) == keys  # no parameters or buffers added
    assert [n for n, _, t in targeted_dropout_modules(m)] == ["0", "3"]
    assert remove_targeted_dropout(m) == ["0", "3"]
    assert not hasattr(m[3], "targeted_dropout") and not m[3]._forward_hooks
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


def test_compiled_model_follows_a_schedule_without_recompiling():
    """Rates changed every step by a schedule reach a compiled model as tensor data."""
    import torch._dynamo
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    td.apply_targeted_dropout(model, 0.5, 0.5)
    sched = td.RampSchedule(model, total_steps=6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 12)
    layer = model[0].parametrizations.weight[0]
    compiled(x)  # the first compile
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            sched.step()
            torch.manual_seed(1)
            got = compiled(x)
            torch.manual_seed(1)
            assert torch.equal(got, model(x)), (layer.drop_rate, layer.targ_rate)
    assert layer.drop_rate == 0.5 and layer.targ_rate == 0.5
