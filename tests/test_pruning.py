"""Post hoc pruning: plain checkpoints with zeros that fine-tuning keeps, torch.nn.utils.prune's
reparametrization on request, N:M, and the sparsity report."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import td_kernels as td
from td_kernels import reference as ref
from td_kernels.training.nn import apply_targeted_dropout
from td_kernels.training.pruning import TargetedPruning, prune_model, sparsity_report


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def _x(n=4):
    return torch.randn(n, 2, 6, 6)


RATES = [0.0, 0.1, 0.33, 0.5, 0.8, 0.9, 1.0]
PRUNE = {"weight": td.prune_weights, "unit": td.prune_units}


@pytest.mark.parametrize("mode", ["weight", "unit"])
@pytest.mark.parametrize("rate", RATES)
def test_prune_model_equals_the_functional_prune_and_stays_plain(mode, rate):
    m = _model()
    keys = list(m.state_dict())
    params = {n: p for n, p in m.named_parameters()}
    orig = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    assert prune_model(m, rate, mode) == ["0", "3"]
    assert list(m.state_dict()) == keys  # plain keys, no weight_orig / weight_mask
    assert all(p is params[n] for n, p in m.named_parameters())  # the same Parameter objects
    for name in ["0", "3"]:
        layer = m.get_submodule(name)
        assert type(layer.weight) is nn.Parameter
        assert torch.equal(layer.weight, PRUNE[mode](orig[name], rate))
    assert torch.equal(m[5].weight, orig["5"])  # the logits layer is left alone
    assert m[3].bias is not None and not (m[3].bias == 0).all()  # biases are not pruned
    plain = _model()
    plain.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(plain[3].weight, m[3].weight)


@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_not_permanent_leaves_torchs_reparametrization(mode):
    m = _model()
    orig = m[3].weight.detach().clone()
    prune_model(m, 0.5, mode, permanent=False)
    layer = m[3]
    assert isinstance(layer.weight_orig, nn.Parameter) and hasattr(layer, "weight_mask")
    assert torch.equal(layer.weight_orig, orig) and torch.equal(layer.weight, PRUNE[mode](orig, 0.5))
    assert "3.weight_orig" in m.state_dict() and "3.weight_mask" in m.state_dict()
    prune.remove(layer, "weight")
    assert type(layer.weight) is nn.Parameter and torch.equal(layer.weight, PRUNE[mode](orig, 0.5))


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


@pytest.mark.parametrize("permanent", [True, False])
def test_pruning_twice_composes(permanent):
    # the rate is the fraction of each unit pruned in all, not of what is left: the zeros of
    # the first pass are the smallest keys, so they are the first candidates of the second
    m = _model()
    w = m[3].weight.detach().clone()
    prune_model(m, 0.5, exclude=["0", "5"], permanent=permanent)
    prune_model(m, 0.8, exclude=["0", "5"], permanent=permanent)
    assert torch.equal(m[3].weight, td.prune_weights(td.prune_weights(w, 0.5), 0.8))
    assert torch.equal(m[3].weight, td.prune_weights(w, 0.8))
    assert ((m[3].weight != 0).sum(dim=1) == 96 - 76).all()  # count(0.8, 96) = 76 pruned per unit
    prune_model(m, 0.5, exclude=["0", "5"], permanent=permanent)  # a lower rate prunes nothing more
    assert torch.equal(m[3].weight, td.prune_weights(w, 0.8))
    if not permanent:  # then a permanent pass folds torch's reparametrization in
        prune_model(m, 0.8, exclude=["0", "5"])
        assert set(m.state_dict()) == set(_model().state_dict())  # (torch re-adds weight after bias)
        assert torch.equal(m[3].weight, td.prune_weights(w, 0.8))


# ---- fine-tuning keeps the zeros ---------------------------------------------------------
@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
], ids=["sgd_momentum_wd", "adamw"])
@pytest.mark.parametrize("mode", ["weight", "unit", "nm"])
def test_fine_tuning_keeps_the_zeros(make_opt, mode):
    m = _model()
    kw = dict() if mode == "nm" else dict(rate=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nm: the conv's fan-in 18 is no multiple of 4
        names = prune_model(m, mode=mode, **kw)
    pruned = {n: (m.get_submodule(n).weight == 0).clone() for n in names}
    opt = make_opt(m.parameters())  # created after pruning
    for _ in range(5):
        opt.zero_grad()
        m(_x()).square().mean().backward()
        opt.step()
    for n in names:
        w = m.get_submodule(n).weight
        assert (w[pruned[n]] == 0).all(), n
        assert not torch.equal(w != 0, ~pruned[n]) or (w[~pruned[n]] != 0).all()  # the rest trains
    assert not torch.equal(m[5].weight, _model()[5].weight)  # the unpruned head trained too


def test_an_optimizer_with_state_from_before_pruning_moves_the_zeros():
    """Documented: momentum accumulated before pruning still moves pruned weights; create the
    optimizer after pruning (or clear its state)."""
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    m(_x()).square().mean().backward()
    opt.step()
    prune_model(m, 0.6)
    pruned = m[3].weight == 0
    opt.zero_grad()
    m(_x()).square().mean().backward()
    opt.step()
    assert (m[3].weight[pruned] != 0).any()


def test_a_reloaded_model_gets_the_same_masks_by_pruning_again():
    m = _model()
    prune_model(m, 0.7)
    sd = copy.deepcopy(m.state_dict())
    fresh = _model()
    fresh.load_state_dict(sd)
    prune_model(fresh, 0.7)  # the zeros are the smallest keys: the same masks
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        fresh(_x()).square().mean().backward()
        opt.step()
    assert torch.equal(fresh[3].weight == 0, sd["3.weight"] == 0)


def test_pruning_under_targeted_dropout():
    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 0.5, 0.5)
    w = m[3].weight.detach().clone()
    assert prune_model(m, 0.5) == ["0", "3"]
    assert torch.equal(m[3].weight, td.prune_weights(w, 0.5))
    m(_x()).sum().backward()  # still targeted, still plain keys
    assert list(m.state_dict()) == list(_model().state_dict())


# ---- N:M ---------------------------------------------------------------------------------
def test_prune_model_nm_leaves_the_exact_pattern():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 4))
    w0, w2 = m[0].weight.detach().clone(), m[2].weight.detach().clone()
    with pytest.warns(UserWarning, match="'0'.*does not divide"):  # conv fan-in 18
        assert prune_model(m, mode="nm", n=2, m=4) == ["2"]
    assert torch.equal(m[2].weight, td.prune_nm(w2, n=2, m=4))
    assert torch.equal(m[0].weight, w0)
    r = sparsity_report(m)
    assert [s.nm_ok for s in r.layers] == [None, True, False]
    assert "2:4" in str(r) and "n/a" in str(r)
    # 1:8 on the same layer, through torch.nn.utils.prune, and the report's own pattern
    m2 = nn.Linear(16, 5)
    TargetedPruning.apply(m2, "weight", mode="nm", n=1, m=8)
    assert torch.equal(m2.weight, td.prune_nm(m2.weight_orig, n=1, m=8))
    assert sparsity_report(m2, nm=(1, 8)).layers[0].nm_ok and not sparsity_report(m2, nm=(1, 16)).layers[0].nm_ok


# ---- the report --------------------------------------------------------------------------
def test_sparsity_report():
    m = _model()
    prune_model(m, 0.5, "unit")
    r = sparsity_report(m)
    assert [s.name for s in r.layers] == ["0", "3", "5"]
    conv, fc, logits = r.layers
    assert (conv.zeros, conv.numel, conv.zero_units, conv.units) == (3 * 18, 6 * 18, 3, 6)
    assert (fc.zeros, fc.zero_units) == (16 * 96, 16)
    assert logits.zeros == 0 and logits.sparsity == 0.0
    assert r.zeros == 54 + 1536 and r.numel == 108 + 3072 + 320
    assert r.sparsity == pytest.approx(1590 / 3500)
    text = str(r)
    assert "total" in text and "50.0%" in text and "3/6" in text and "2:4" in text
    assert "2:4" not in str(sparsity_report(m, nm=None))


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
    with pytest.raises(TypeError, match="rate"):
        prune_model(m)
    with pytest.raises(ValueError, match="rate has no meaning"):
        prune_model(m, 0.5, mode="nm")
    with pytest.raises(ValueError, match="mode"):
        prune_model(m, 0.5, mode="filter")
    with pytest.raises(ValueError, match="exclude"):
        prune_model(m, 0.5, exclude=["9"])
    with pytest.raises(TypeError, match="permanent"):
        prune_model(m, 0.5, permanent="yes")
    with pytest.raises(ValueError, match="no layer"):
        prune_model(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(TypeError, match="model"):
        sparsity_report(None)
    with pytest.raises(ValueError, match="n < m"):
        sparsity_report(m, nm=(4, 4))
    assert torch.equal(m[3].weight, _model()[3].weight)  # nothing was touched by the errors
