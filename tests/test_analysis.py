"""td.delta_e and td.hessian_weight_matrix against an explicitly formed float64 Hessian
(torch.autograd.functional.hessian), d against td.prune_model's own zeros, the Taylor remainder's
order, bad input, and `td-kernels analyse` on a tiny setting."""
import copy
import warnings

import pytest
import torch
from torch import nn

import td_kernels as td

LOSS = nn.CrossEntropyLoss()


def small_model(seed=0):
    # tanh: smooth, so the expansion's remainder is a clean O(|d|^3); fan-ins 8 and 8 take 2:4
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def small_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(23, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    # batches of unequal size: E must weigh them by size to be the mean over all 23 samples
    return X, y, [(X[:10], y[:10]), (X[10:18], y[10:18]), (X[18:], y[18:])]


def explicit(model, names, X, y):
    """(theta, gradient, Hessian) of the mean loss over all of X in the flattened targeted weights."""
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def E(v):
        out, i = {}, 0
        for n in names:
            k = params[n].numel()
            out[n] = v[i:i + k].view_as(params[n])
            i += k
        return LOSS(torch.func.functional_call(model, out, (X,)), y)

    return (theta, torch.autograd.functional.jacobian(E, theta, vectorize=True),
            torch.autograd.functional.hessian(E, theta, vectorize=True))


PRUNINGS = [dict(mode="weight", rate=0.5), dict(mode="unit", rate=0.5), dict(mode="nm", n=2, m=4)]


@pytest.mark.parametrize("pruning", PRUNINGS, ids=lambda p: p["mode"])
def test_delta_e_against_explicit_hessian_and_prune_model(pruning):
    model = small_model()
    X, y, data = small_data()
    r = td.delta_e(model, LOSS, data, **pruning)
    names = list(r.removed)
    assert names == ["0.weight", "2.weight"]  # the output head is excluded, as prune_model excludes it
    # d is exactly what td.prune_model removes: its zeros where the weight was not zero already
    pruned = copy.deepcopy(model)
    td.prune_model(pruned, **pruning)
    for name, p in pruned.named_parameters():
        want = (p == 0) & (dict(model.named_parameters())[name] != 0)
        assert torch.equal(r.removed.get(name, torch.zeros_like(want)), want), name
    assert 0 < r.removed_weights < r.targeted_weights == 96

    theta, g, H = explicit(model, names, X, y)
    d = theta * torch.cat([r.removed[n].reshape(-1) for n in names])
    assert r.samples == 23
    assert r.gradient_term == pytest.approx(-(g @ d).item(), rel=1e-10, abs=1e-14)
    assert r.hessian_term == pytest.approx(0.5 * (d @ H @ d).item(), rel=1e-10, abs=1e-14)
    assert r.estimate == pytest.approx(abs((-(g @ d) + 0.5 * d @ H @ d).item()), rel=1e-10, abs=1e-14)
    with torch.no_grad():
        change = (LOSS(pruned(X), y) - LOSS(model(X), y)).item()
    assert r.actual == pytest.approx(abs(change), rel=1e-10, abs=1e-14)
    assert r.loss == pytest.approx(LOSS(model(X), y).item(), rel=1e-12)


def test_taylor_remainder_is_cubic_in_d():
    # E(theta - s d) - E(theta) minus the two terms is c s^3 + O(s^4): halving s divides it by ~8
    model = small_model(1)
    _, _, data = small_data(1)
    rem = [td.delta_e(model, LOSS, data, rate=0.5, scale=s).remainder for s in (0.2, 0.1, 0.05, 0.025)]
    ratios = [a / b for a, b in zip(rem, rem[1:])]
    assert abs(ratios[-1] - 8) < 0.5, ratios
    assert all(abs(q - 8) < 2 for q in ratios), ratios
    small = td.delta_e(model, LOSS, data, rate=0.5, scale=0.025)
    assert abs(small.remainder) < 1e-3 * abs(small.gradient_term + small.hessian_term)


def test_hessian_weight_matrix_entries_and_order():
    model = small_model(2)
    X, y, data = small_data(2)
    M, order = td.hessian_weight_matrix(model, LOSS, data, important=0.25)
    r = td.delta_e(model, LOSS, data, rate=0.75)
    theta, _, H = explicit(model, list(r.removed), X, y)
    P = theta.numel()
    assert M.shape == (P, P) and M.dtype == torch.float64
    assert sorted(order.tolist()) == list(range(P))
    full = theta[:, None] * H * theta[None, :]
    torch.testing.assert_close(M, full[order][:, order], rtol=1e-10, atol=1e-14)
    # the kept weights (the important quarter of each unit) come first, each part by decreasing |theta|
    removed = torch.cat([m.reshape(-1) for m in r.removed.values()])[order]
    k = P - r.removed_weights
    assert not removed[:k].any() and removed[k:].all()
    mag = theta.abs()[order]
    assert (mag[:k].diff() <= 0).all() and (mag[k:].diff() <= 0).all()
    # the block of the removed weights sums to d^T H d (Figure 1's caption)
    assert 0.5 * M[k:, k:].sum().item() == pytest.approx(r.hessian_term, rel=1e-10)


def test_model_untouched_mode_restored_and_one_pass_data():
    model = small_model().train()
    before = copy.deepcopy(model.state_dict())
    _, _, data = small_data()
    r = td.delta_e(model, LOSS, iter(data), rate=0.5)  # a one-shot iterator: one pass is all it gets
    assert r.samples == 23 and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_float32_and_targeted_dropout_model():
    # float32 works too, and a model carrying targeted dropout is analysed without it (eval mode)
    model = small_model().float()
    td.apply_targeted_dropout(model, 0.5, 0.5)
    X, y, _ = small_data()
    r = td.delta_e(model.train(), LOSS, [(X.float(), y)], rate=0.5)
    td.remove_targeted_dropout(model)
    plain = td.delta_e(model, LOSS, [(X.float(), y)], rate=0.5)
    assert r.hessian_term != 0
    assert (r.gradient_term, r.hessian_term, r.actual) == pytest.approx(
        (plain.gradient_term, plain.hessian_term, plain.actual), rel=1e-6)


def test_bad_input():
    model = small_model()
    X, y, data = small_data()
    with pytest.raises(ValueError, match="no batches"):
        td.delta_e(model, LOSS, [], rate=0.5)
    with pytest.raises(ValueError, match="no samples"):
        td.delta_e(model, LOSS, [(X[:0], y[:0])], rate=0.5)
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        td.delta_e(model, LOSS, [X], rate=0.5)
    with pytest.raises(ValueError, match="found no layer.*output head"):
        td.delta_e(nn.Sequential(nn.Linear(8, 3)).double(), LOSS, data, rate=0.5)
    with pytest.raises(ValueError, match="one-element tensor"):
        td.delta_e(model, nn.CrossEntropyLoss(reduction="none"), data, rate=0.5)
    with pytest.raises(TypeError, match="needs a rate"):
        td.delta_e(model, LOSS, data)
    with pytest.raises(ValueError, match="important has no meaning"):
        td.hessian_weight_matrix(model, LOSS, data, mode="nm")
    with pytest.raises(ValueError, match=r"96 targeted weights \(96 x 96 torch.float64.*max_weights=50; use td.delta_e"):
        td.hessian_weight_matrix(model, LOSS, data, max_weights=50)
    with warnings.catch_warnings():  # m=8 divides no fan-in here but 8: only the first layer is left
        warnings.simplefilter("ignore")
        M, _ = td.hessian_weight_matrix(model, LOSS, data, mode="nm", important=None, n=2, m=8, exclude=("2", "4"))
    assert M.shape == (64, 64)


def test_analyse_cli_tiny(tmp_path, capsys):
    from td_kernels.tools.cli import main

    assert main(["analyse", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "targeted" in text and "±" in text
    for name in ("table1.txt", "table1.csv", "figure1.png", "figure1.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = (tmp_path / "table1.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header, one row per method


def test_hvp_cost_tiny(tmp_path):
    from td_kernels.tools.analyse import hvp_cost

    gpt2 = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    rows = hvp_cost(rounds=1, out=str(tmp_path), gpt2=gpt2, log=open(tmp_path / "log", "w"), device="cpu")
    assert [r["model"] for r in rows] == ["demo mlp", "demo cnn", "GPT-2 (small config)"]
    # the GPT-2's targeted weights: 4 Conv1D per block, its lm_head (tied to wte) left out
    assert rows[2]["targeted_weights"] == 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32
    assert all(r["hvp_ms"] > 0 and r["backward_ms"] > 0 for r in rows)
    assert (tmp_path / "hvp_cost.txt").read_text().count("\n") == 6


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--seeds", "0"), ("--lr", "0"), ("--batch-size", "0"),
                                         ("--device", "nonsense")])
def test_analyse_cli_bad_arguments(flag, value, tmp_path, capsys):
    from td_kernels.tools.cli import main

    with pytest.raises(SystemExit) as e:
        main(["analyse", flag, value, "--out", str(tmp_path), "--no-progress"])
    assert e.value.code == 2
    assert flag.strip("-").replace("-", "_") in capsys.readouterr().err
