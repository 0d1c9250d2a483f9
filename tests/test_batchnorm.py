"""td.recalibrate_batchnorm: BatchNorm statistics of the network as evaluated (full weights)."""
import pytest
import torch
from torch import nn

import td_kernels as td


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
                         nn.BatchNorm1d(16, momentum=None), nn.Linear(16, 3))


def test_statistics_of_the_full_weights_over_all_the_data_and_state_kept():
    model = _net()
    with pytest.warns(UserWarning, match="BatchNorm"):
        td.apply_targeted_dropout(model, 0.9, 0.9)
    x = torch.randn(70, 2, 6, 6) * 3 + 1
    model.train()
    model(x[:8])                                          # a targeted training forward: c = 1
    model[3].eval()                                       # mixed flags must come back as they were
    flags = [m.training for m in model.modules()]
    rng = td.get_rng_state(model)
    data = [(x[:32], 0), (x[32:64], 1), (x[64:], 2)]      # unequal batches, (inputs, targets)
    names = td.recalibrate_batchnorm(model, data)

    assert names == ["1", "5", "8"]
    with torch.no_grad():                                 # by hand: the first BatchNorm's input with the full weights
        a = nn.functional.conv2d(x, model[0].weight, model[0].bias, padding=1).double()
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, a.mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, a.var((0, 2, 3)).float(), rtol=1e-5, atol=1e-5)  # unbiased, all 70
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1 and model[8].momentum is None
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(td.get_rng_state(model), rng)


def test_prune_model_recalibrates_and_bad_input():
    model = _net().eval()
    x = torch.randn(64, 2, 6, 6)
    before = model[1].running_mean.clone()
    with pytest.raises(TypeError, match="recalibrate"):
        td.prune_model(model, 0.5, recalibrate=x)         # one tensor is not an iterable of batches
    assert not (model[0].weight == 0).any()               # refused before pruning
    td.prune_model(model, 0.5, recalibrate=[x])
    with torch.no_grad():
        a = model[0](x)
    torch.testing.assert_close(model[1].running_mean, a.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert not torch.equal(model[1].running_mean, before) and not model.training
    with pytest.raises(ValueError, match="no BatchNorm"):
        td.recalibrate_batchnorm(nn.Sequential(nn.Linear(2, 2)), [torch.randn(3, 2)])
    with pytest.raises(ValueError, match="no batch"):
        td.recalibrate_batchnorm(model, [])
    stats = model[1].running_var.clone()
    with pytest.raises(RuntimeError):
        td.recalibrate_batchnorm(model, [x, torch.randn(4, 5)])  # fails on the second batch
    assert torch.equal(model[1].running_var, stats) and not model.training
