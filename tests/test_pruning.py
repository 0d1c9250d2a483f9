"""Post hoc pruning through torch.nn.utils.prune, and the sparsity report."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import td_kernels as td
from td_kernels import reference as ref
from td_kernels.nn import apply_targeted_dropout
from td_kernels.pruning import TargetedPruning, prune_model, sparsity_report


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 30), nn.ReLU(),
                         nn.Linear(30, 10))


RATES = [0.0, 0.1, 0.33, 0.5, 0.8, 0.9, 1.0]


@pytest.mark.parametrize("mode", ["weight", "unit"])
@pytest.mark.parametrize("rate", RATES)
def test_prune_model_equals_the_functional_prune_per_layer(mode, rate):
    m = _model()
    orig = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    assert prune_model(m, rate, mode) == ["0", "3"]
    fn = td.prune_weights if mode == "weight" else td.prune_units
    for name in ["0", "3"]:
        layer = m.get_submodule(name)
        assert isinstance(layer.weight_orig, nn.Parameter) and hasattr(layer, "weight_mask")
        assert torch.equal(layer.weight_orig, orig[name])
        want = fn(orig[name], rate)
        assert torch.equal(layer.weight, want)
        prune.remove(layer, "weight")
        assert type(layer.weight) is nn.Parameter and torch.equal(layer.weight, want)
        assert not hasattr(layer, "weight_mask")
    assert torch.equal(m[5].weight, orig["5"])  # the logits layer is left alone
    assert m[3].bias is not None and not (m[3].bias == 0).all()  # biases are not pruned


def _weight_with_zeros():
    torch.manual_seed(1)
    w = torch.randn(6, 10)
    w[0, :2] = 0.0       # 2 zeros: fewer than k, they are candidates
    w[1, :7] = 0.0       # 7 zeros: more than k = count(0.5, 10) = 5, a tie at the threshold: none pruned
    w[2, 3] = -0.0
    w[3] = 0.0           # an all-zero row
    w[4, :5] = 0.0       # exactly k zeros
    return w


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.7, 1.0])
def test_weight_mask_is_exactly_not_candidate_even_for_zeros(rate):
    w = _weight_with_zeros()
    layer = nn.Linear(10, 6)
    with torch.no_grad():
        layer.weight.copy_(w)
    TargetedPruning.apply(layer, "weight", rate)
    limit = ref.weight_limits(w, ref.count(rate, 10))
    candidate = ref.rank_keys(w) <= limit.to(torch.int64)[:, None]
    assert torch.equal(layer.weight_mask.bool(), ~candidate)
    assert torch.equal(layer.weight, td.prune_weights(w, rate))


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.6, 1.0])
def test_unit_mask_is_exactly_not_candidate_even_for_zero_rows(rate):
    torch.manual_seed(2)
    w = torch.randn(8, 5)
    w[[1, 4]] = 0.0  # two zero-norm units tie at the bottom
    layer = nn.Linear(5, 8)
    with torch.no_grad():
        layer.weight.copy_(w)
    TargetedPruning.apply(layer, "weight", rate, "unit")
    keep = ref.unit_keep(w, 0, ref.count(rate, 8), ref.drop_threshold(1.0))
    assert torch.equal(layer.weight_mask.bool(), keep[:, None].expand_as(w))


def test_pruning_twice_composes():
    # the rate is the fraction of each unit pruned in all, not of what is left: the zeros of the
    # first pass are the smallest keys, so they are the first candidates of the second
    m = _model()
    w = m[3].weight.detach().clone()
    prune_model(m, 0.5, exclude=["0", "5"])
    prune_model(m, 0.8, exclude=["0", "5"])
    assert torch.equal(m[3].weight, td.prune_weights(td.prune_weights(w, 0.5), 0.8))
    assert torch.equal(m[3].weight, td.prune_weights(w, 0.8))
    assert (m[3].weight_mask.sum(dim=1) == 96 - 76).all()  # count(0.8, 96) = 76 pruned per unit
    prune_model(m, 0.5, exclude=["0", "5"])  # a lower rate prunes nothing more
    assert torch.equal(m[3].weight, td.prune_weights(w, 0.8))
    prune.remove(m[3], "weight")


def test_sparsity_report():
    m = _model()
    prune_model(m, 0.5, "unit")
    r = sparsity_report(m)
    assert [s.name for s in r.layers] == ["0", "3", "5"]
    conv, fc, logits = r.layers
    assert (conv.zeros, conv.numel, conv.zero_units, conv.units) == (3 * 18, 6 * 18, 3, 6)
    assert (fc.zeros, fc.zero_units) == (15 * 96, 15)
    assert logits.zeros == 0 and logits.sparsity == 0.0
    assert r.zeros == 54 + 1440 and r.numel == 108 + 2880 + 300
    assert r.sparsity == pytest.approx(1494 / 3288)
    text = str(r)
    assert "total" in text and "50.0%" in text and "3/6" in text


def test_sparsity_report_reads_the_raw_weight_under_targeted_dropout():
    m = _model()
    apply_targeted_dropout(m, 1.0, 0.9)
    r = sparsity_report(m)  # not one random targeted draw
    assert r.zeros == 0


def test_bad_arguments():
    m = _model()
    with pytest.raises(ValueError, match="rate"):
        prune_model(m, 1.5)
    with pytest.raises(TypeError, match="rate"):
        prune_model(m, "half")
    with pytest.raises(ValueError, match="mode"):
        prune_model(m, 0.5, mode="filter")
    with pytest.raises(ValueError, match="exclude"):
        prune_model(m, 0.5, exclude=["9"])
    apply_targeted_dropout(m, 0.5, 0.5)
    with pytest.raises(ValueError, match="remove_targeted_dropout"):
        prune_model(m, 0.5)
    with pytest.raises(TypeError, match="model"):
        sparsity_report(None)
