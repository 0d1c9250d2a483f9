"""Schedules: the ramp (paper section 5.5) and Xtreme's exact per-unit counts (section 5.6)."""
import numpy as np
import pytest
import torch
from torch import nn

import td_kernels as td
from td_kernels.training.nn import TargetedDropout, apply_targeted_dropout
from td_kernels.reference import count
from td_kernels.training.schedules import RampSchedule, XtremeSchedule, xtreme_targ_rate


def _model():
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Conv1d(1, 6, 5), nn.Flatten(), nn.Linear(6 * 16, 3))


def _targeted(drop=0.8, targ=0.6, mode="weight"):
    m = _model()
    apply_targeted_dropout(m, drop, targ, mode)
    return m


def _rates(m):
    return [(t.drop_rate, t.targ_rate) for _, _, t in td.nn.targeted_dropout_modules(m)]


@pytest.mark.parametrize("step, drop, targ", [
    (0, 0.0, 0.0),
    (2, 0.8 * 2 / 10, 0.6 * 0.95 * 2 / 5),
    (5, 0.8 * 0.5, 0.6 * 0.95),                 # half way: 95% of gamma
    (8, 0.8 * 0.8, 0.6 * (0.95 + 0.05 * 3 / 5)),
    (10, 0.8, 0.6),                             # the end: exactly the final rates
    (13, 0.8, 0.6),                             # then constant
])
def test_ramp_values(step, drop, targ):
    m = _targeted()
    s = RampSchedule(m, 10)
    for _ in range(step):
        s.step()
    for d, t in _rates(m):
        assert d == pytest.approx(drop, abs=1e-15) and t == pytest.approx(targ, abs=1e-15)
    if step >= 10:
        assert _rates(m) == [(0.8, 0.6)] * 2  # bit-exact final values


def test_ramp_is_monotone_and_overrides_final_rates():
    m = _targeted()
    s = RampSchedule(m, 7, drop_rate=0.5, targ_rate=0.9)
    seen = []
    for _ in range(9):
        seen.append(_rates(m)[0])
        s.step()
    assert seen[0] == (0.0, 0.0) and seen[-1] == (0.5, 0.9)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(seen, seen[1:]))


def test_ramp_state_dict_round_trip():
    m = _targeted()
    s = RampSchedule(m, 10)
    for _ in range(4):
        s.step()
    state = s.state_dict()
    m2 = _targeted()
    s2 = RampSchedule(m2, 99)
    s2.load_state_dict(state)
    assert _rates(m2) == _rates(m) and s2.step_count == 4 and s2.total_steps == 10
    s.step(), s2.step()
    assert _rates(m2) == _rates(m)


def test_ramp_takes_modules_and_per_module_finals():
    a, b = TargetedDropout(0.4, 0.2), TargetedDropout(0.6, 0.8, mode="unit")
    s = RampSchedule([a, b], 2)
    assert (a.drop_rate, b.targ_rate) == (0.0, 0.0)
    s.step(), s.step()
    assert (a.drop_rate, a.targ_rate, b.drop_rate, b.targ_rate) == (0.4, 0.2, 0.6, 0.8)


def test_ramp_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        RampSchedule(_targeted(), 0)
    with pytest.raises(TypeError, match="total_steps"):
        RampSchedule(_targeted(), 2.5)
    with pytest.raises(ValueError, match="drop_rate"):
        RampSchedule(_targeted(), 5, drop_rate=1.5)
    with pytest.raises(ValueError, match="targ_rate"):
        RampSchedule(_targeted(), 5, targ_rate=-0.5)
    with pytest.raises(ValueError, match="apply_targeted_dropout"):
        RampSchedule(_model(), 5)
    with pytest.raises(TypeError, match="model_or_modules"):
        RampSchedule([nn.Linear(2, 2)], 5)


# ---- Xtreme ------------------------------------------------------------------------------
KEEPS = (0, 1, 2, 3, 4, 5, 7, 16)


def test_xtreme_rate_is_exact_for_every_fan_in():
    F = np.arange(1, 3001)
    for keep in KEEPS:
        for f in F[F >= keep]:
            f = int(f)
            assert count(xtreme_targ_rate(f, keep), f) == f - keep, (f, keep)


def test_a_float32_rate_would_not_be_exact():
    # the check above can fail: the float32 ratio (as in the authors' code) misses the count
    # for many (F, keep) pairs; xtreme_targ_rate exists to avoid exactly this
    misses = [(f, k) for k in KEEPS for f in range(max(k, 1), 3001)
              if count(float(np.float32((f - k) / f)), f) != f - k]
    assert len(misses) > 100


def test_xtreme_rate_bad_arguments():
    with pytest.raises(ValueError, match="keep"):
        xtreme_targ_rate(9, 10)
    with pytest.raises(ValueError, match="fan_in"):
        xtreme_targ_rate(0, 0)
    with pytest.raises(TypeError, match="keep"):
        xtreme_targ_rate(9, 3.0)


@pytest.mark.parametrize("keep", [1, 3])
def test_xtreme_schedule_ends_with_exactly_keep_weights_per_unit(keep):
    torch.manual_seed(0)
    m = _model()
    apply_targeted_dropout(m, 0.5, 0.5)
    s = XtremeSchedule(m, keep, 4, drop_rate=1.0)
    assert _rates(m) == [(0.0, 0.0)] * 2
    for _ in range(4):
        s.step()
    for name, layer in [("0", m[0]), ("2", m[2])]:
        w = layer.weight
        fan_in = w[0].numel()
        t = layer.targeted_dropout
        assert t.targ_rate == xtreme_targ_rate(fan_in, keep)
        # drop_rate 1 drops every candidate: exactly `keep` survive in each unit (distinct |w|)
        nonzero = (t(w).reshape(w.shape[0], -1) != 0).sum(dim=1)
        assert (nonzero == keep).all(), name


def test_xtreme_bad_arguments():
    m = _targeted()
    with pytest.raises(ValueError, match="keep"):
        XtremeSchedule(m, 6, 10)  # the conv's fan-in is 5
    with pytest.raises(ValueError, match="keep"):
        XtremeSchedule(m, -1, 10)
    with pytest.raises(TypeError, match="keep"):
        XtremeSchedule(m, 2.0, 10)
    with pytest.raises(ValueError, match="mode='weight'"):
        XtremeSchedule(_targeted(mode="unit"), 2, 10)
    with pytest.raises(TypeError, match="model"):
        XtremeSchedule([TargetedDropout(0.5, 0.5)], 2, 10)


def test_xtreme_reads_the_fan_in_along_the_units():
    class Transposed(nn.Module):  # weight [in, out]: units along dim 1, fan-in 7
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(7, 5))

        def forward(self, x):
            return x @ self.weight

    saved = dict(td.nn._LAYERS)
    try:
        td.register_layer(Transposed, unit_dim=1, forward=lambda layer, w, x: x @ w)
        layer = Transposed()
        apply_targeted_dropout(layer, 0.5, 0.5, exclude=())
        s = XtremeSchedule(layer, 2, 1, drop_rate=1.0)
        s.step()
        assert layer.targeted_dropout.targ_rate == xtreme_targ_rate(7, 2)
        assert ((layer.targeted_dropout(layer.weight) != 0).sum(dim=0) == 2).all()
        with pytest.raises(ValueError, match="keep"):
            XtremeSchedule(layer, 8, 1)
    finally:
        td.nn._LAYERS.clear()
        td.nn._LAYERS.update(saved)


def test_ramp_drives_nm_layers_drop_rate_only():
    m = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 2))
    apply_targeted_dropout(m, 0.8, mode="nm", exclude=["1", "2"])
    apply_targeted_dropout(m, 0.6, 0.4, exclude=["0", "2"])
    s = RampSchedule(m, 4, targ_rate=0.5)
    assert _rates(m) == [(0.0, None), (0.0, 0.0)]
    s.step(), s.step()
    assert _rates(m) == [(0.4, None), (0.3, 0.5 * 0.95)]
    state = s.state_dict()
    s.step(), s.step()
    assert _rates(m) == [(0.8, None), (0.6, 0.5)]
    s.load_state_dict(state)
    assert _rates(m) == [(0.4, None), (0.3, 0.5 * 0.95)]
    x = torch.randn(3, 8)
    m(x).sum().backward()  # the nm layer runs at its ramped drop_rate


def test_second_schedule_and_deepcopy_ramp_to_the_given_rates():
    """A schedule sets only the current rates: a second one (a re-run notebook cell, a second
    phase) and one on a deepcopy of a scheduled model ramp to the rates the model was given,
    not to the first ramp's current 0."""
    import copy

    m = _targeted(0.8, 0.6)
    RampSchedule(m, 10)                                  # rates now (0, 0)
    twin = copy.deepcopy(m)
    for model in (m, twin):
        s = RampSchedule(model, 4)
        for _ in range(4):
            s.step()
        assert _rates(model) == [(0.8, 0.6)] * 2
    xs = XtremeSchedule(_targeted(0.5, 0.3), keep=2, total_steps=3)
    second = RampSchedule(xs.modules, 1)
    second.step()
    assert [t.drop_rate for t in xs.modules] == [0.5, 0.5]  # the base drop rate, not the ramp's 0
    assert [t.targ_rate for t in xs.modules] == [0.3, 0.3]  # and the base targ rate, not Xtreme's


def test_rates_set_by_hand_are_the_base_and_a_live_schedule_warns():
    m = _targeted(0.8, 0.6)
    first = RampSchedule(m, 10)
    first.step()
    layer = m[0].targeted_dropout
    layer.drop_rate = 0.4                                # by hand: current and base
    assert (layer.drop_rate, layer.base_drop_rate, layer.base_targ_rate) == (0.4, 0.4, 0.6)
    with pytest.warns(UserWarning, match=r"rates of '0' .*set by hand"):
        first.step()                                     # overwrites it, loudly
    assert layer.drop_rate == pytest.approx(0.8 * 2 / 10)
    second = RampSchedule(m, 2)                          # ramps to the rates set by hand
    second.step(), second.step()
    assert _rates(m)[0] == (0.4, 0.6) and _rates(m)[1] == (0.8, 0.6)
    with pytest.warns(UserWarning, match=r"another schedule steps them too"):
        first.step()                                     # two live schedules on the same layers
    import warnings

    del first
    with pytest.warns(UserWarning, match=r"set by hand, or by a schedule since deleted"):
        second.step()                                    # takes the layers back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.step()                                    # undisturbed: no warning
