"""backend="auto" by measurement: ``td-kernels tune`` ranks a card's benchmark, ``_measured.CARDS``
keeps the winners, and the ops take them (backend and selection variant) on that card only."""
import csv
import shutil
from pathlib import Path

import pytest
import torch

import td_kernels as td
from td_kernels import _measured, _registry, reference
from td_kernels.tools import cli
from td_kernels.tools.bench import tune
from td_kernels.tools.info import collect

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
NAME = "Test Card 9000"  # a device_name as torch or /proc/cpuinfo writes it


def _row(op, provider, ms, shape="64x64", dtype="float32", mask="bits", mode="fwd+bwd", name=NAME):
    return {"timestamp": "2026-12-03T00:00:00+00:00", "device_type": "cuda", "device_name": name, "torch": "2.11.0",
            "triton": "3.6.0", "git_commit": "abc1234", "op": op, "mode": mode, "shape": shape, "dtype": dtype,
            "provider": provider, "mask": "" if op == "unit" else mask, "drop_rate": "0.5", "targ_rate": "0.5",
            "ms": str(ms)}


def _csv(tmp_path, rows) -> Path:
    path = tmp_path / "bench.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# ---- scoring ------------------------------------------------------------------------------------
def test_score_is_the_geometric_mean_of_time_over_each_groups_best():
    rows = [_row("weight", "triton", 1.0, shape="a"), _row("weight", "native:fused", 2.0, shape="a"),
            _row("weight", "triton", 4.0, shape="b"), _row("weight", "native:fused", 1.0, shape="b"),
            _row("weight", "clone", 0.1, shape="a"), _row("weight", "clone", 0.1, shape="b"),  # a yardstick
            _row("weight", "triton", 0.01, shape="a", mode="fwd")]  # not fwd+bwd
    ranked = tune.score(rows, "weight")
    assert [p for p, *_ in ranked] == ["native:fused", "triton"]
    (_, s_native, w_native, n_native, worst_native), (_, s_triton, w_triton, _, worst_triton) = ranked
    assert s_native == pytest.approx(2 ** 0.5) and s_triton == pytest.approx(2.0)  # sqrt(2*1), sqrt(1*4)
    assert (w_native, n_native, worst_native) == (1, 2, 2.0) and (w_triton, worst_triton) == (1, 4.0)


def test_a_provider_missing_from_a_group_is_not_ranked():
    rows = [_row("nm", "native", 2.0, shape="a"), _row("nm", "triton", 1.0, shape="a"),
            _row("nm", "native", 2.0, shape="b")]  # triton never ran shape b: its 1.0 covers less
    ranked = tune.score(rows, "nm")
    assert ranked[0][:2] == ("native", pytest.approx(1.4142, rel=1e-4)) and ranked[1][0] == "triton"
    assert ranked[1][1] is None
    card, value = tune.entry(rows, "x.csv")
    assert card == "test-card-9000" and value["choices"]["nm"]["backend"] == "native"
    assert set(value["choices"]) == {"nm"}  # kinds without rows get no choice: auto keeps its priority there


def test_entry_records_backend_variant_and_runner_up():
    rows = [_row("weight", "triton", 3.0), _row("weight", "triton:sampled", 2.0), _row("weight", "native", 2.5),
            _row("unit", "native", 1.0), _row("unit", "triton", 1.5)]
    _card, value = tune.entry(rows, "bench/results/x/bench.csv")
    assert value["choices"]["weight"] == {"backend": "triton", "variant": "sampled", "provider": "triton:sampled",
                                          "score": 1.0, "wins": 1, "groups": 1, "next": "native",
                                          "next_score": 1.25}
    assert value["choices"]["unit"]["backend"] == "native" and value["choices"]["unit"]["variant"] is None
    assert value["device_type"] == "cuda" and value["git_commit"] == "abc1234"


def test_a_win_inside_the_margin_keeps_the_priority_orders_choice():
    """On CUDA auto takes triton unmeasured: a rival 2% faster does not move it, 10% faster does;
    a tie goes to the default variant; a plain provider records its default variant by name."""
    for rival, ms, want in [("native", 0.98, ("triton", "radix")), ("native", 0.90, ("native", "two-pass")),
                            ("triton:sampled", 1.0, ("triton", "radix")), ("native:fused", 1.0, ("triton", "radix"))]:
        rows = [_row("weight", "triton", 1.0), _row("weight", rival, ms), _row("weight", "reference", 1.0)]
        c = tune.entry(rows, "x")[1]["choices"]["weight"]
        assert (c["backend"], c["variant"]) == want, (rival, ms, c)
    for rows, want in [([_row("nm", "reference", 1.0), _row("nm", "triton", 1.0)], ["triton", "reference"]),
                       ([_row("nm", "reference", 1.0), _row("nm", "native", 1.0)], ["native", "reference"])]:
        assert [p for p, *_ in tune.score(rows, "nm")] == want  # a tie: the CUDA priority order, whatever
        # this machine built (here native has no CUDA kernels)


def test_bad_csvs_are_refused_with_the_reason(tmp_path, capsys):
    with pytest.raises(ValueError, match="several devices' rows \\(Other, Test Card 9000\\): pass --card"):
        tune.entry([_row("unit", "native", 1.0), _row("unit", "native", 1.0, name="Other")], "x")
    with pytest.raises(ValueError, match="no rows"):
        tune.entry([], "x")
    with pytest.raises(ValueError, match="no fwd\\+bwd rows"):
        tune.entry([_row("unit", "native", 1.0, mode="fwd")], "x")
    for ms in ("nan", "0", "-1", "inf"):
        with pytest.raises(ValueError, match="row native unit fwd\\+bwd 64x64 float32 : ms must be a positive finite"):
            tune.score([_row("unit", "native", ms)], "unit")
    with pytest.raises(ValueError, match="ms must be a number, got ''"):
        tune.score([_row("unit", "native", "")], "unit")
    with pytest.raises(ValueError, match="two fwd\\+bwd rows of native for unit \\{'shape': '64x64', 'dtype'"):
        tune.score([_row("unit", "native", 1.0), _row("unit", "native", 2.0)], "unit")
    with pytest.raises(ValueError, match="backend 'native' has no weight variant 'bogus'"):
        tune.entry([_row("weight", "native:bogus", 1.0)], "x")
    with pytest.raises(SystemExit):
        cli.main(["tune", str(tmp_path / "missing.csv")])
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit):
        cli.main(["tune", str(other)])
    assert "not an op benchmark CSV" in capsys.readouterr().err


def test_tune_ranks_the_committed_cpu_benchmark(capsys, tmp_path):
    """A real CSV, as `td-kernels bench` wrote it: native fastest in every group for every kind
    (the reference, skipped on the large shapes there, is listed but unranked); --write refuses
    a CPU."""
    csv_path = str(ROOT / "bench/results/cpu/bench.csv")
    assert cli.main(["tune", csv_path, "--card", "intel-r-xeon-r-processor-2-50ghz"]) == 0
    out = capsys.readouterr().out
    assert "  weight: native:two-pass (score 1.000, fastest in 12 of 12 groups" in out
    assert "  nm: native (score 1.000" in out and "  unit: native (score 1.000" in out
    assert "reference" in out and "clone" not in out  # listed, never the yardsticks
    with pytest.raises(SystemExit):
        cli.main(["tune", csv_path, "--card", "nvidia-h200"])
    assert "no rows of 'nvidia-h200'" in capsys.readouterr().err
    into = tmp_path / "_measured.py"
    shutil.copy(_measured.__file__, into)
    with pytest.raises(SystemExit):
        cli.main(["tune", csv_path, "--write", "--into", str(into)])
    assert "the table is for GPU cards" in capsys.readouterr().err
    assert into.read_text() == Path(_measured.__file__).read_text()


def test_write_through_the_cli(tmp_path, capsys):
    into = tmp_path / "_measured.py"
    shutil.copy(_measured.__file__, into)
    path = _csv(tmp_path, [_row("weight", "native:fused", 1.0), _row("weight", "native", 1.5),
                           _row("weight", "triton", 2.0)])
    assert cli.main(["tune", str(path), "--write", "--into", str(into)]) == 0
    assert f"written to {into}" in capsys.readouterr().out
    ns = {}
    exec(compile(into.read_text(), str(into), "exec"), ns)
    c = ns["CARDS"]["test-card-9000"]["choices"]["weight"]
    assert (c["backend"], c["variant"], c["next"]) == ("native", "fused", "native")


def test_write_replaces_the_cards_entry_and_keeps_the_module(tmp_path):
    path = tmp_path / "_measured.py"
    shutil.copy(_measured.__file__, path)
    rows = [_row("unit", "native", 1.0), _row("unit", "triton", 2.0)]
    tune.write_entry(*tune.entry(rows, "a.csv"), path=path)
    rows[0]["ms"] = "3.0"
    tune.write_entry(*tune.entry(rows, "b.csv"), path=path)
    ns = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)
    assert list(ns["CARDS"]) == ["test-card-9000"]  # replaced, not added twice
    assert ns["CARDS"]["test-card-9000"]["choices"]["unit"]["backend"] == "triton"
    assert ns["CARDS"]["test-card-9000"]["source"] == "b.csv"
    assert ns["__doc__"] == _measured.__doc__
    before = path.read_text()
    with pytest.raises(ValueError, match="does not read back"):  # would break `import td_kernels`
        tune.write_entry("bad", {"score": float("inf")}, path=path)
    assert path.read_text() == before


# ---- the table and the registry -----------------------------------------------------------------
def test_the_packaged_table_names_backends_kinds_and_variants_that_exist():
    variants = {"reference": (), "native": ("two-pass", "fused"), "triton": ("radix", "sampled")}
    for name, b in _registry._BACKENDS.items():
        assert tuple(b.variants.get("weight", ())) == variants[name]
    # a plain provider ran the module default: tune records it as the first variant
    if "native" in _registry._BACKENDS:
        from td_kernels.backends import native
        assert native.WEIGHT_FORWARD == native.WEIGHT_FORWARDS[0]
    if "triton" in _registry._BACKENDS:
        from td_kernels.backends.triton import weight_dropout as twd
        assert twd.SELECT == twd.SELECTS[0]
    for card, value in _measured.CARDS.items():
        assert card == _registry.card_slug(value["device_name"]) and value["device_type"] in ("cuda", "cpu")
        for kind, c in value["choices"].items():
            assert kind in _registry.KINDS and c["backend"] in variants
            assert c["variant"] is None or (kind == "weight" and c["variant"] in variants[c["backend"]])


def _measure_here(monkeypatch, choices: dict):
    """Make this machine's CPU a measured card with ``choices``."""
    card = _registry.card_name(CPU)
    monkeypatch.setitem(_measured.CARDS, card, {"device_type": "cpu", "device_name": card, "source": "test.csv",
                                                "git_commit": "abc1234", "choices": choices})
    return card


def _spy(monkeypatch, backend: str, launcher: str) -> list:
    calls = []
    b = _registry._BACKENDS[backend]
    fn = getattr(b, launcher)

    def spy(*args, **kwargs):
        calls.append(kwargs.get("variant"))
        return fn(*args, **kwargs)
    monkeypatch.setitem(_registry._BACKENDS, backend, b.__class__(**{**b.__dict__, launcher: spy}))
    return calls


def test_auto_takes_the_measured_backend_per_kind(monkeypatch):
    if "native" not in _registry._BACKENDS:
        pytest.skip("the native extension is not built")
    _measure_here(monkeypatch, {"unit": {"backend": "reference", "variant": None}})
    unit = _spy(monkeypatch, "reference", "unit_dropout")
    unit_bwd = _spy(monkeypatch, "reference", "unit_dropout_backward")
    weight = _spy(monkeypatch, "reference", "weight_dropout")
    w = torch.randn(8, 16, requires_grad=True)
    out = td.targeted_unit_dropout(w, 0.5, 0.5, seed=3)
    out.sum().backward()
    assert unit == [None] and len(unit_bwd) == 1  # both directions on the measured backend
    td.targeted_weight_dropout(w, 0.5, 0.5, seed=3)
    assert weight == []  # weight targeting was not measured: the priority order's native
    ref, _ = reference.unit_dropout(w.detach(), 3, reference.count(0.5, 8), reference.drop_threshold(0.5))
    assert torch.equal(out, ref)


def test_auto_passes_the_measured_variant_and_explicit_backends_ignore_the_table(monkeypatch):
    if "native" not in _registry._BACKENDS:
        pytest.skip("the native extension is not built")
    _measure_here(monkeypatch, {"weight": {"backend": "native", "variant": "fused"}})
    calls = _spy(monkeypatch, "native", "weight_dropout")
    w = torch.randn(8, 16)
    a = td.targeted_weight_dropout(w, 0.5, 0.5, seed=3)
    b = td.targeted_weight_dropout(w, 0.5, 0.5, seed=3, backend="native")
    assert calls == ["fused", None] and torch.equal(a, b)  # the same bits whatever the variant
    assert _registry.choose("auto", CPU, torch.float32, "weight")[1] == "fused"
    assert _registry.choose("native", CPU, torch.float32, "weight")[1] is None


def test_a_measured_backend_that_cannot_serve_falls_back_to_the_priority(monkeypatch):
    _measure_here(monkeypatch, {"nm": {"backend": "triton", "variant": None}})
    monkeypatch.delitem(_registry._BACKENDS, "triton", raising=False)
    assert _registry.resolve("auto", CPU, torch.float32, "nm") is _registry.resolve("auto", CPU, torch.float32)
    _measure_here(monkeypatch, {"nm": {"backend": "reference", "variant": None}})
    assert _registry.resolve("auto", CPU, torch.float64, "nm").name == "reference"
    assert _registry.resolve("auto", CPU, torch.float32, "nm").name == "reference"


def test_another_card_and_an_entry_this_library_cannot_use(monkeypatch):
    monkeypatch.setitem(_measured.CARDS, "some-other-cpu", {"device_type": "cpu", "device_name": "Some Other CPU",
                                                            "choices": {"unit": {"backend": "reference"}}})
    assert _registry.measured_choice(CPU, "unit") is None  # the table is per card, not per device type
    monkeypatch.setattr(_registry, "_WARNED", set())
    default = _registry.resolve("auto", CPU, torch.float32)
    for bad in ({"backend": "reference", "variant": "fast"}, {"backend": "cutlass", "variant": None}, {}):
        _measure_here(monkeypatch, {"weight": bad})
        _registry._WARNED.clear()
        with pytest.warns(RuntimeWarning, match="backend='auto' uses the priority order there"):
            assert _registry.choose("auto", CPU, torch.float32, "weight") == (default, None)
        td.targeted_weight_dropout(torch.randn(4, 8), 0.5, 0.5, seed=1)  # warned once: no error, no new warning


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_launchers_check_the_variant(backend):
    if backend not in _registry._BACKENDS:
        pytest.skip(f"{backend} is not available here")
    b = _registry._BACKENDS[backend]
    with pytest.raises(ValueError, match=f"variant of backend '{backend}'.s weight forward must be one of"):
        b.weight_dropout(torch.randn(4, 8), 0, 2, 0, variant="bogus")


def test_info_says_what_auto_takes_per_kind(monkeypatch):
    card = _registry.card_name(CPU)
    assert collect()["backend='auto' picks"]["cpu"].endswith(f"(by priority: {card} was not measured)")
    _measure_here(monkeypatch, {"unit": {"backend": "reference", "variant": None}})
    picks = collect()["backend='auto' picks"]["cpu"]
    first = _registry.available_backends("cpu")[0]
    assert picks == (f"weight: {first} (by priority), nm: {first} (by priority), unit: reference (measured); "
                     "tuned from test.csv at commit abc1234")


@pytest.mark.parametrize("backend,knob,variants", [("native", "WEIGHT_FORWARD", ("two-pass", "fused")),
                                                   ("triton", "SELECT", ("radix", "sampled"))])
def test_the_variant_argument_overrides_the_module_default(monkeypatch, backend, knob, variants):
    """A bad default is refused, and a variant given per call never reads it; every variant gives
    the reference's bits (the sampled one is swept in tests/test_triton.py)."""
    if backend not in _registry._BACKENDS or _registry._BACKENDS[backend].why_not("cpu") is not None:
        pytest.skip(f"{backend} does not run CPU tensors here")
    import importlib
    mod = importlib.import_module({"native": "td_kernels.backends.native",
                                   "triton": "td_kernels.backends.triton.weight_dropout"}[backend])
    launch = _registry._BACKENDS[backend].weight_dropout
    w = torch.randn(3, 40)
    ref = reference.weight_dropout(w, 7, 20, 2 ** 31, bits=True)
    monkeypatch.setattr(mod, knob, "bogus")
    with pytest.raises(ValueError, match=knob):
        launch(w, 7, 20, 2 ** 31)
    for v in variants:
        out = launch(w, 7, 20, 2 ** 31, bits=True, variant=v)
        assert all(torch.equal(a, b) for a, b in zip(out, ref)), v
