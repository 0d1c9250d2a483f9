"""Fast tests of the benchmark harness (td_kernels/tools/bench/ops.py): the bytes model, the
saved-for-backward accounting, the CSV schema, --compare, and one tiny run of the CLI path."""
import csv

import pytest
import torch

import td_kernels as td
from td_kernels.tools.bench import ops as tb
from td_kernels.tools.bench.common import Timing


def test_op_bytes_model():
    U, F, N = 4, 40, 160
    bits = 4 * U * 2  # ceil(40 / 32) = 2 words per unit
    assert tb.op_bytes("weight", "fwd", U, F, 4) == 2 * N * 4 + 4 * U    # read W, write out, write limit
    assert tb.op_bytes("weight", "bwd", U, F, 4) == 3 * N * 4 + 4 * U    # read grad, W, limit; write grad_w
    assert tb.op_bytes("weight", "fwd", U, F, 4, "bits") == 2 * N * 4 + 4 * U + bits  # + write the bits
    assert tb.op_bytes("weight", "bwd", U, F, 4, "bits") == 2 * N * 4 + bits          # read grad, bits; write
    assert tb.op_bytes("nm", "fwd", U, F, 2) == 2 * N * 2 and tb.op_bytes("nm", "bwd", U, F, 2) == 3 * N * 2
    assert tb.op_bytes("nm", "bwd", U, F, 2, "bits") == 2 * N * 2 + bits
    assert tb.op_bytes("unit", "fwd", U, F, 2) == 2 * N * 2 + U          # read W, write out, write keep
    assert tb.op_bytes("unit", "bwd", U, F, 2) == 2 * N * 2 + U          # read grad, keep; write grad_w
    for op in tb.OPS:
        for mask in tb.MASKS:
            assert tb.op_bytes(op, "fwd+bwd", U, F, 4, mask) == \
                tb.op_bytes(op, "fwd", U, F, 4, mask) + tb.op_bytes(op, "bwd", U, F, 4, mask)
    assert tb.copy_bytes("fwd", N, 4) == 2 * N * 4 and tb.copy_bytes("fwd+bwd", N, 4) == 4 * N * 4
    with pytest.raises(ValueError, match="op"):
        tb.op_bytes("row", "fwd", U, F, 4)
    with pytest.raises(ValueError, match="mask"):
        tb.op_bytes("weight", "fwd", U, F, 4, "bytes")


def test_providers_exclude_triton_interpreter_on_cpu():
    names = tb.provider_names("cpu")
    assert "triton" not in names and names[0] == "reference"
    assert names[-3:] == ["torch-kthvalue", "dropout", "clone"]


def _at_most_a_bit(w) -> float:
    """What an op may keep for backward: 1 bit per element (mask="bits"), the per-unit limit
    (4 bytes per unit) and the int64 params."""
    return w.numel() / 8 + 4 * w.shape[0] + 64


@pytest.mark.parametrize("op", tb.OPS)
def test_backends_keep_at_most_a_bit_per_element(op):
    w = torch.randn(64, 96, requires_grad=True)
    N = w.numel()
    for backend in td.available_backends("cpu"):  # the Triton interpreter too: memory, not speed
        for mask in tb.masks_for(backend, op):
            saved = tb.saved_bytes(tb.make_fn(backend, op, 0.5, 0.5, mask=mask), w)
            assert 0 < saved <= _at_most_a_bit(w), (backend, mask, saved)
    # the yardsticks: a per-element mask must show up, a copy keeps nothing
    if op != "unit":
        assert tb.saved_bytes(tb.make_fn("torch-kthvalue", op, 0.5, 0.5), w) == N  # bool mask
    assert tb.saved_bytes(tb.make_fn("dropout", op, 0.5, 0.5), w) >= N
    assert tb.saved_bytes(tb.make_fn("clone", op, 0.5, 0.5), w) == 0


def test_saved_bytes_sees_ctx_attributes_and_skips_the_weight():
    class Stash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            ctx.mask = torch.ones(w.shape, dtype=torch.uint8)  # kept outside save_for_backward
            ctx.save_for_backward(w)                           # the parameter itself: free
            return w * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    w = torch.randn(8, 16, requires_grad=True)
    assert tb.saved_bytes(Stash.apply, w) == 8 * 16


def test_peak_bytes_cpu_counts_live_allocations():
    w = torch.randn(256, 256, requires_grad=True)
    g = torch.randn(256, 256)
    fn = tb.make_bench_fn("clone", "weight", "fwd+bwd", w, g, 0.5, 0.5)  # two clones alive at once
    peak = tb.peak_bytes(fn, torch.device("cpu"))
    assert 2 * w.numel() * 4 <= peak < 3 * w.numel() * 4


def _row(ms, **kw):
    r = dict(device_type="cpu", device_name="cpuA", threads=2, op="weight", mode="fwd", shape="8x8",
             dtype="float32", provider="native", mask="bits", drop_rate=0.5, targ_rate=0.5, ms=ms)
    r.update(kw)
    return r


def test_compare_flags_slowdowns_on_the_same_key_only():
    old = [_row(1.0), _row(1.0, mode="bwd"), _row(1.0, provider="triton"), _row(1.0, device_name="cpuB")]
    new = [_row(1.05), _row(1.2, mode="bwd"), _row(0.5, provider="triton"), _row(9.0, device_name="cpuC"),
           _row(9.0, threads=1), _row(9.0, mask="recompute")]  # another device, thread count, mask: not comparable
    regressions, matched = tb.compare_rows(old, new, threshold=0.10)
    assert matched == 3
    assert [(r["mode"], r["provider"]) for r, _, _ in regressions] == [("bwd", "native")]
    assert regressions[0][2] == pytest.approx(1.2)
    # on CUDA the host thread count is not part of the key
    gpu = dict(device_type="cuda", device_name="H100")
    assert tb.compare_rows([_row(1.0, **gpu)], [_row(2.0, threads=16, **gpu)])[1] == 1


def test_cli_tiny_run_table_csv_plot_and_compare(tmp_path, capsys):
    args = ["--device", "cpu", "--shapes", "16x32", "--dtypes", "float32", "--min-time", "0.01",
            "--modes", "fwd,bwd", "--out", str(tmp_path), "--providers", "reference,dropout"]
    assert tb.main(args) == 0
    out = capsys.readouterr().out
    providers = ["reference", "dropout", "clone"]
    for p in providers:
        assert f" {p} " in out
    assert "GB/s" in out and "saved B/el" in out
    with open(tmp_path / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == tb.COLUMNS
        rows = list(reader)
    # per op and mode: the reference once per mask format (weight, nm) or once (unit), dropout, clone
    assert len(rows) == 2 * sum(len(tb.masks_for("reference", op)) + 2 for op in tb.OPS)
    assert {r["mask"] for r in rows if r["provider"] == "reference" and r["op"] != "unit"} == set(tb.MASKS)
    assert {r["device_name"] for r in rows} == {tb.device_name(torch.device("cpu"))}
    for r in rows:
        assert float(r["gbps"]) == pytest.approx(int(r["bytes"]) / float(r["ms"]) / 1e6)
        assert float(r["ms_p20"]) <= float(r["ms"]) <= float(r["ms_p80"])
        if r["provider"] == "clone":
            assert float(r["frac_copy"]) == pytest.approx(1.0)
        if r["provider"] == "reference":
            assert float(r["speedup_vs_reference"]) == pytest.approx(1.0)
    for op in tb.OPS:
        assert (tmp_path / f"bench_{op}.png").stat().st_size > 0

    # an "old" run 100x faster: every matching row regresses
    for r in rows:
        r["ms"] = float(r["ms"]) / 100
    old = tmp_path / "old.csv"
    tb.write_csv(rows, old, tb.COLUMNS)
    fast = ["--device", "cpu", "--shapes", "16x32", "--dtypes", "float32", "--min-time", "0.01", "--modes", "fwd",
            "--ops", "weight", "--providers", "dropout", "--no-memory", "--compare", str(old)]
    assert tb.main(fast) == 0
    assert tb.main(fast + ["--fail-on-regression"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION weight fwd 16x32 float32 dropout" in out and "2 regressions" in out  # dropout and clone


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backends_keep_at_most_a_bit_and_peak_is_measured():
    w = torch.randn(256, 1024, device="cuda", requires_grad=True)
    g = torch.randn_like(w)
    N = w.numel()
    assert "triton" in tb.provider_names("cuda") or "native" in tb.provider_names("cuda")
    for backend in td.available_backends("cuda"):
        for op in tb.OPS:
            for mask in tb.masks_for(backend, op):
                saved = tb.saved_bytes(tb.make_fn(backend, op, 0.5, 0.5, mask=mask), w)
                assert 0 < saved <= _at_most_a_bit(w), (backend, op, mask, saved)
            peak = tb.peak_bytes(tb.make_bench_fn(backend, op, "fwd+bwd", w, g, 0.5, 0.5), w.device)
            assert peak >= 2 * N * 4  # out and grad_w exist at once
    assert tb.saved_bytes(tb.make_fn("dropout", "weight", 0.5, 0.5), w) >= N  # a per-element mask


# ---- the training-step benchmark (td_kernels/tools/bench/step.py) -------------------------------
def test_step_variants_regularise_what_they_say():
    from td_kernels.tools.bench import step as bs
    x_out = {}
    for variant in bs.VARIANTS:
        case = bs.build("cnn", variant, "cpu")
        targeted = [n for n, m in case.model.named_modules() if hasattr(m, "targeted_dropout")]
        if variant.startswith("td-"):
            assert targeted, variant
            if variant == "td-weight-recompute":
                assert all(case.model.get_submodule(n).targeted_dropout.mask == "recompute" for n in targeted)
        else:
            assert not targeted, variant
        torch.manual_seed(1)
        bs.step_fn(case)()  # one training step runs
        torch.manual_seed(1)
        x_out[variant] = case.model(case.inputs).detach()
    for variant, out in x_out.items():  # every regulariser changes the training forward; none does not
        assert torch.equal(out, x_out["none"]) == (variant == "none"), variant


def test_step_cli_writes_table_csv_and_plot(tmp_path, capsys):
    assert tb.main(["--step", "--models", "cnn", "--variants", "td-weight,kthvalue", "--min-time", "0.01",
                    "--rounds", "2", "--slow-runs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "x none" in out and "td-weight" in out and "kthvalue" in out
    with open(tmp_path / "step.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["none", "td-weight", "kthvalue"]
    assert float(rows[0]["overhead"]) == 1.0 and all(float(r["ms"]) > 0 for r in rows)
    assert all(r["rounds"] == "2" for r in rows)
    assert (tmp_path / "step.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        tb.main(["--step", "--rounds", "0"])


def test_step_csv_is_written_after_each_model(tmp_path, monkeypatch):
    """bench/gpu.sh stops a stage with SIGINT: the models finished before it stay in step.csv."""
    from td_kernels.tools.bench import step as bs
    build = bs.build

    def build_or_stop(name, *args, **kwargs):
        if name == "mlp-b32":
            raise KeyboardInterrupt
        return build(name, *args, **kwargs)

    monkeypatch.setattr(bs, "build", build_or_stop)
    with pytest.raises(KeyboardInterrupt):
        tb.main(["--step", "--models", "cnn,mlp-b32", "--variants", "td-weight", "--min-time", "0.01",
                 "--rounds", "1", "--slow-runs", "1", "--out", str(tmp_path)])
    with open(tmp_path / "step.csv", newline="") as f:
        assert [(r["model"], r["variant"]) for r in csv.DictReader(f)] == [("cnn", "none"), ("cnn", "td-weight")]


def test_step_ratios_are_per_round_medians(monkeypatch):
    """A machine that slows down mid-run: per-round ratios cancel what back-to-back timing cannot."""
    from td_kernels.tools.bench import step as bs
    slow = {"n": 0}

    def fake_time(fn, device, args):  # every call 1 ms, times 1 + the number of calls so far
        slow["n"] += 1
        ms = float(slow["n"])
        return Timing(ms, ms, ms, 1, "fake")
    monkeypatch.setattr(bs.bench, "time_fn", fake_time)  # step times through common
    args = bs.build_parser().parse_args(["--models", "cnn", "--variants", "none,td-weight", "--rounds", "3"])
    rows = bs.run(args)
    # rounds time (none, td) = (1, 2), then (td, none) = (3, 4), then (none, td) = (5, 6):
    # ratios 2, 0.75, 1.2 -> median 1.2; back-to-back (none then td) would say 2
    assert [r["variant"] for r in rows] == ["none", "td-weight"]
    assert rows[1]["overhead"] == pytest.approx(1.2) and rows[0]["overhead"] == 1.0
    assert rows[1]["ms"] == 3.0 and rows[0]["ms"] == 4.0


def test_op_rounds_interleave_and_report_medians(monkeypatch):
    """Each provider's row is the median over interleaved rounds, not its first timing."""
    calls = {"n": 0}

    def fake_time(fn, device, args):  # the n-th timing takes n ms: a machine slowing down
        calls["n"] += 1
        return Timing(float(calls["n"]), 0.0, 0.0, 1, "fake")
    monkeypatch.setattr(tb, "time_fn", fake_time)
    args = tb.build_parser().parse_args(["--device", "cpu", "--shapes", "4x8", "--dtypes", "float32", "--ops",
                                         "weight", "--modes", "fwd", "--providers", "dropout,clone",
                                         "--rounds", "3", "--no-memory"])
    rows = tb.run(args)
    # rounds time (first, second) = (1, 2), (second, first) = (3, 4), (first, second) = (5, 6)
    assert sorted(r["ms"] for r in rows) == [3.0, 4.0] and all(r["rounds"] == 3 for r in rows)
    assert calls["n"] == 6
    with pytest.raises(SystemExit):
        tb.main(["--rounds", "0"])


def test_variant_providers():
    """"backend:variant" sets its knob for the call only, runs weight targeting only, and gives the
    backend's bits (the native CPU kernels ignore the CUDA forward's choice)."""
    from td_kernels.backends import native
    from td_kernels.backends.triton import weight_dropout as twd
    with tb.variant("triton:sampled") as backend:
        assert backend == "triton" and twd.SELECT == "sampled"
    assert twd.SELECT == "radix" and native.WEIGHT_FORWARD == "two-pass"
    assert tb.masks_for("native:fused", "nm") == () and tb.masks_for("native:fused", "weight") == tb.MASKS
    w = torch.randn(8, 40)
    out = tb.make_fn("native:fused", "weight", 0.5, 0.5)(w)
    assert torch.equal(out, tb.make_fn("native", "weight", 0.5, 0.5)(w)) and not torch.equal(out, w)
    assert native.WEIGHT_FORWARD == "two-pass"
    assert not any(":" in p for p in tb.provider_names("cpu"))  # the variants are CUDA kernels' choices
