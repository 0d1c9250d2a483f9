"""The trainer callbacks (td_kernels.integrations): transformers' Trainer on GPT-2 and Llama built
from small configs (no download) and a Lightning MLP, on generated data, on the CPU.

Each run checks that the targeted layers really multiply by a targeted weight during training
(a forward hook recomputes the plain output), that the logged rates follow the ramp, that a run
stopped at a checkpoint and resumed ends with parameters bit-identical to the uninterrupted run
(and, as the control, differs when the targeted dropout state is left out of the checkpoint),
that prune_at_end leaves the logged sparsity in the saved weights, and that saved models keep
the plain keys. Skipped where transformers/accelerate or Lightning are not installed."""
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import td_kernels as td
from td_kernels.reference import count

KNEE = 0.95  # the paper's section 5.5: 95% of the targeting rate half way through the ramp


def _ramp(step, total, drop, targ):
    """(drop_rate, targ_rate) of the forward of optimizer step `step` (0-based) of a ramp over
    `total` steps, written out from the paper rather than taken from td.RampSchedule."""
    if step >= total:
        return drop, targ
    half = total / 2
    t = KNEE * step / half if step <= half else KNEE + (1 - KNEE) * (step - half) / (total - half)
    return drop * step / total, targ * t


class _Observer:
    """A forward hook that recomputes a targeted layer's output with its plain weight: it records,
    per training forward, whether the output differs, and keeps the last one's input, change of
    output and weight (units first)."""

    def __init__(self, layer, units, plain_forward):
        self.layer, self.units, self.plain_forward = layer, units, plain_forward
        self.changed, self.last = [], None
        layer.register_forward_hook(self)

    def __call__(self, layer, args, out):
        x = args[0]
        with torch.no_grad():
            plain = self.plain_forward(layer, x)
        if layer.training:  # x, plain - out = x (W - W_t)^T, and W as it was in this forward
            self.changed.append(not torch.equal(out, plain))
            rows = lambda t: t.detach().reshape(-1, t.shape[-1]).double()  # noqa: E731
            self.last = (rows(x), rows(plain) - rows(out), self.units().detach().double().clone())


def _check_targeted_weight(observer, targ_rate):
    """From the last training forward's input x and the change of its output, x (W - W_t)^T, of a
    layer whose plain weight was W [U, F] (units first), solve for W - W_t (least squares: x has
    more rows than columns, full column rank) and check that it is W on some positions and 0 elsewhere, and
    that those dropped positions are among the count(targ_rate, F) smallest |w| of each unit."""
    x, delta, w = observer.last
    diff = torch.linalg.lstsq(x, delta).solution.t()  # [U, F]: W - W_t
    tol = 1e-3 * w.abs().max()
    dropped = (diff - w).abs() < tol
    kept = diff.abs() < tol
    assert bool((dropped | kept).all()), "the layer's weight differs from W by something other than zeroed entries"
    assert int(dropped.sum()) > 0
    k = count(targ_rate, w.shape[1])
    ranks = w.abs().argsort(dim=1).argsort(dim=1)  # 0 = smallest |w| of its unit
    assert bool((ranks[dropped] < k).all()), "a weight outside the targeted (smallest) ones was dropped"


# ---- transformers -------------------------------------------------------------------------
VOCAB = 61


def _hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers


def _model(name):
    transformers = _hf()
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _observed_layer(name, model):
    """A targeted layer, its units-first weight, and its forward with the plain weight."""
    if name == "gpt2":  # Conv1D, weight [in, out]
        layer = model.transformer.h[0].mlp.c_fc
        return layer, lambda: layer.weight.t(), lambda m, x: torch.addmm(m.bias, x.reshape(-1, x.shape[-1]),
                                                                          m.weight).view(*x.shape[:-1], -1)
    layer = model.model.layers[0].mlp.up_proj  # nn.Linear
    return layer, lambda: layer.weight, lambda m, x: F.linear(x, m.weight, m.bias)


class _Tokens(torch.utils.data.Dataset):
    """Generated sequences (a counting language from random starts): no tokenizer, no download."""

    def __init__(self, n=48, t=16):
        start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(1))
        self.ids = (start + torch.arange(t)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _fit(name, out, callback, *, steps=12, save_steps=6, resume=None, observe=False, attach=True, **extra):
    transformers = _hf()
    from td_kernels.integrations.hf import TargetedDropoutCallback

    torch.manual_seed(0)
    model = _model(name)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
        save_strategy="steps", save_steps=save_steps, report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=0, **extra)
    assert isinstance(callback, TargetedDropoutCallback)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                   callbacks=None if attach else [callback])
    if attach:
        callback.attach(trainer)
    observer = _Observer(*_observed_layer(name, model)) if observe else None
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, observer


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_trainer_targets_ramps_and_resumes_bit_exactly(name, tmp_path):
    from td_kernels.integrations.hf import TargetedDropoutCallback

    steps, drop, targ = 12, 0.5, 0.6
    cb = TargetedDropoutCallback(drop, targ)
    trainer, model, obs = _fit(name, tmp_path / "full", cb, steps=steps, observe=True)
    layers = [n for n, _, _ in td.nn.targeted_dropout_modules(model)]
    assert layers and not any("lm_head" in n for n in layers)

    # the layer multiplied by a targeted weight: unchanged at step 0 (the ramp starts at rate 0),
    # changed afterwards; for Llama, solving for the last forward's weight gives W less some of its
    # targets (GPT-2's layers read LayerNorm or GELU outputs: too few independent rows to solve)
    assert len(obs.changed) == steps and obs.changed[0] is False and all(obs.changed[2:])
    if name == "llama":
        _check_targeted_weight(obs, _ramp(steps - 1, steps, drop, targ)[1])

    # the logs carry the rates each step ran with, following the paper's ramp
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, steps + 1))
    for h in logged:
        want = _ramp(h["step"] - 1, steps, drop, targ)
        assert h["td/drop_rate"] == pytest.approx(want[0]) and h["td/targ_rate"] == pytest.approx(want[1])
        assert h["td/sparsity"] == 0.0  # targeted dropout never writes zeros into the weights

    # every checkpoint holds the state; its model file has the plain model's keys
    ckpt = tmp_path / "full" / "checkpoint-6"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["TargetedDropoutCallback"]
    assert len(saved["attributes"]["checkpoint"]["rng"]) == len(layers)
    assert saved["attributes"]["checkpoint"]["schedule"]["step_count"] == 6
    from safetensors.torch import load_file

    plain_dir = tmp_path / "plain"
    _model(name).save_pretrained(plain_dir)
    assert sorted(load_file(ckpt / "model.safetensors")) == sorted(load_file(plain_dir / "model.safetensors"))

    # stop at step 6, resume in a new process-like setup (new model, Trainer and callback)
    full = _params(model)
    resumed_trainer, resumed, _ = _fit(name, tmp_path / "full", TargetedDropoutCallback(drop, targ), steps=steps,
                                       resume=str(ckpt))
    got = _params(resumed)
    assert all(torch.equal(full[k], got[k]) for k in full), "the resumed run drifted from the uninterrupted one"
    tail = [h for h in resumed_trainer.state.log_history if "loss" in h and h["step"] > 6]
    assert [h["td/targ_rate"] for h in tail] == [h["td/targ_rate"] for h in logged[6:]]


def test_hf_resume_takes_the_state_from_the_checkpoint_and_differs_without_it(tmp_path, caplog):
    """With restore_callback_states_from_checkpoint=True the Trainer rebuilds the callback from the
    arguments saved in the checkpoint (here: other rates were passed) and the resume is still
    exact. The control: with the callback's entry taken out of the checkpoint the resumed run
    ends elsewhere (so the bit-exact resumes are the state's doing), with a warning."""
    from td_kernels.integrations.hf import TargetedDropoutCallback

    _, model, _ = _fit("llama", tmp_path, TargetedDropoutCallback(0.5, 0.6), steps=8, save_steps=4)
    full, ckpt = _params(model), tmp_path / "checkpoint-4"
    trainer, resumed, _ = _fit("llama", tmp_path / "rebuilt", TargetedDropoutCallback(0.1, 0.1), steps=8,
                               save_steps=4, resume=str(ckpt), restore_callback_states_from_checkpoint=True)
    rebuilt = [c for c in trainer.callback_handler.callbacks if isinstance(c, TargetedDropoutCallback)]
    assert len(rebuilt) == 1 and (rebuilt[0].run.drop_rate, rebuilt[0].run.targ_rate) == (0.5, 0.6)
    got = _params(resumed)
    assert all(torch.equal(full[k], got[k]) for k in full)

    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["TargetedDropoutCallback"]
    state_file.write_text(json.dumps(state))
    with caplog.at_level("WARNING"):
        _, resumed, _ = _fit("llama", tmp_path / "stateless", TargetedDropoutCallback(0.5, 0.6), steps=8,
                             save_steps=4, resume=str(ckpt))
    assert "without targeted dropout state" in caplog.text
    got = _params(resumed)
    assert not all(torch.equal(full[k], got[k]) for k in full)


def test_hf_prune_at_end_saves_the_logged_sparsity(tmp_path):
    from safetensors.torch import load_file

    from td_kernels.integrations.hf import TargetedDropoutCallback

    steps, targ = 6, 0.75
    cb = TargetedDropoutCallback(0.5, targ, total_steps=4, prune_at_end=True)
    # given as callbacks=[cb] (not attached): the final sparsity still reaches state.log_history
    trainer, model, _ = _fit("llama", tmp_path, cb, steps=steps, save_steps=steps, attach=False)
    trainer.save_model(str(tmp_path / "final"))
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert sorted(weights) == sorted(model.state_dict())  # plain keys
    names = [n for n, _, _ in td.nn.targeted_dropout_modules(model)]
    zeros = numel = 0
    for n in names:
        w = weights[n + ".weight"]
        # each unit lost exactly its count(targ, F) smallest weights (the ramp ended at targ)
        assert ((w == 0).sum(dim=1) == count(targ, w.shape[1])).all()
        zeros, numel = zeros + int((w == 0).sum()), numel + w.numel()
    assert cb.report.sparsity == zeros / numel == trainer.state.log_history[-1]["td/sparsity"]
    assert weights["lm_head.weight"].ne(0).all()  # the head is not pruned


def test_hf_callback_rejects_bad_settings_and_a_doubly_targeted_model():
    _hf()
    from td_kernels.integrations.hf import TargetedDropoutCallback

    with pytest.raises(ValueError, match="drop_rate"):
        TargetedDropoutCallback(1.5, 0.5)
    with pytest.raises(ValueError, match="schedule"):
        TargetedDropoutCallback(0.5, 0.5, schedule="cosine")
    with pytest.raises(ValueError, match="keep"):
        TargetedDropoutCallback(0.5, 0.5, schedule="xtreme")
    with pytest.raises(TypeError, match="exclude"):
        TargetedDropoutCallback(0.5, 0.5, exclude=[torch.nn.Linear(2, 2)])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    td.apply_targeted_dropout(model, 0.5, 0.5)
    with pytest.raises(ValueError, match="already"):
        TargetedDropoutCallback(0.5, 0.5).run.begin(model, 10)
    with pytest.raises(ValueError, match="no targeted dropout"):
        TargetedDropoutCallback().run.begin(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), 10)


def test_xtreme_schedule_keeps_the_given_weights_per_unit_after_pruning():
    """The run behind both callbacks, without a trainer: Xtreme (section 5.6) over 4 steps, then
    prune_at_end keeps exactly `keep` weights in each unit of each targeted layer."""
    from td_kernels.integrations._common import TargetedDropoutRun

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6), torch.nn.Linear(6, 2))
    run = TargetedDropoutRun(0.5, 0.5, schedule="xtreme", keep=3, prune_at_end=True)
    run.begin(model, total_steps=4)
    assert run.rates()["td/targ_rate"] == 0.0
    for _ in range(4):
        run.step_end()
    assert [t.targ_rate for _, _, t in td.nn.targeted_dropout_modules(model)] == [9 / 12, 5 / 8]
    report = run.prune()
    for layer in (model[0], model[2]):
        assert ((layer.weight != 0).sum(dim=1) == 3).all()
    assert report.sparsity == (8 * 9 + 6 * 5) / (8 * 12 + 6 * 8) == run.sparsity()
    assert model[3].weight.ne(0).all()


# ---- Lightning ----------------------------------------------------------------------------
def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _mlp_module():
    L = _lightning()

    class MLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                           torch.nn.ReLU(), torch.nn.Linear(32, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return MLP


def _lit_fit(tmp, cb, *, steps=6, ckpt_path=None, observe=False):
    L = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = _mlp_module()()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(72, 16, generator=g), torch.randint(0, 4, (72,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=24)  # 3 steps an epoch, no shuffling
    # a checkpoint every 3 steps, after an epoch's last batch: Lightning resumes exactly there (from an
    # on_train_epoch_end checkpoint it would start the finished epoch's loader again)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=[cb, ckpt],
                        logger=CSVLogger(tmp, name="logs"), log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp)
    layer = module.net[0]
    observer = _Observer(layer, lambda: layer.weight, lambda m, x: F.linear(x, m.weight, m.bias)) if observe else None
    with warnings.catch_warnings(record=True) as caught:  # and Lightning's advice on workers kept quiet
        warnings.simplefilter("always")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    trainer.caught = [str(w.message) for w in caught]
    return trainer, module, observer


def test_lightning_targets_ramps_logs_and_resumes_bit_exactly(tmp_path):
    _lightning()  # skips where Lightning is not installed (the CUDA environment of CI)
    from td_kernels.integrations.lightning import TargetedDropoutCallback

    steps, drop, targ = 6, 0.5, 0.6
    trainer, module, obs = _lit_fit(tmp_path / "full", TargetedDropoutCallback(drop, targ), steps=steps, observe=True)
    assert [n for n, _, _ in td.nn.targeted_dropout_modules(module)] == ["net.0", "net.2"]
    assert len(obs.changed) == steps and obs.changed[0] is False and all(obs.changed[1:])
    _check_targeted_weight(obs, _ramp(steps - 1, steps, drop, targ)[1])

    # the rates reach the module's logger (CSVLogger: metrics.csv), one row per step
    import csv

    rows = [r for r in csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")) if r.get("td/targ_rate")]
    assert [int(r["step"]) for r in rows] == list(range(steps))
    for r in rows:
        want = _ramp(int(r["step"]), steps, drop, targ)
        assert float(r["td/drop_rate"]) == pytest.approx(want[0]) and float(r["td/targ_rate"]) == pytest.approx(want[1])

    # the checkpoint holds the callback's state; resuming from the first epoch's ends bit-identical
    first = sorted((tmp_path / "full" / "ckpt").glob("epoch=0*.ckpt"))[0]
    saved = torch.load(first, weights_only=False)["callbacks"]["TargetedDropoutCallback"]["checkpoint"]
    assert saved["schedule"]["step_count"] == 3 and len(saved["rng"]) == 2
    resumed_trainer, resumed, _ = _lit_fit(tmp_path / "resumed", TargetedDropoutCallback(drop, targ), steps=steps,
                                           ckpt_path=first)
    assert not any("without targeted dropout state" in w for w in resumed_trainer.caught)
    full, got = _params(module), _params(resumed)
    assert all(torch.equal(full[k], got[k]) for k in full)

    # the control: without the callback's state the resumed run ends elsewhere
    state = torch.load(first, weights_only=False)
    del state["callbacks"]["TargetedDropoutCallback"]
    torch.save(state, tmp_path / "stateless.ckpt")
    other_trainer, other, _ = _lit_fit(tmp_path / "other", TargetedDropoutCallback(drop, targ), steps=steps,
                                       ckpt_path=tmp_path / "stateless.ckpt")
    assert any("without targeted dropout state" in w for w in other_trainer.caught)
    assert not all(torch.equal(full[k], v) for k, v in _params(other).items())


def test_lightning_prune_at_end_leaves_the_reported_sparsity(tmp_path):
    _lightning()  # skips where Lightning is not installed (the CUDA environment of CI)
    from td_kernels.integrations.lightning import TargetedDropoutCallback

    cb = TargetedDropoutCallback(0.5, 0.75, total_steps=3, prune_at_end=True)
    trainer, module, _ = _lit_fit(tmp_path, cb, steps=6)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    sd = torch.load(tmp_path / "final.ckpt", weights_only=False)["state_dict"]
    assert sorted(sd) == sorted(_mlp_module()().state_dict())  # plain keys
    zeros = sum(int((sd[f"net.{i}.weight"] == 0).sum()) for i in (0, 2))
    numel = sum(sd[f"net.{i}.weight"].numel() for i in (0, 2))
    for i, fan_in in ((0, 16), (2, 32)):
        assert ((sd[f"net.{i}.weight"] == 0).sum(dim=1) == count(0.75, fan_in)).all()
    assert cb.report.sparsity == zeros / numel
    assert sd["net.4.weight"].ne(0).all()


# ---- packaging ----------------------------------------------------------------------------
def test_integrations_are_opt_in_and_name_the_package_a_missing_framework_needs():
    """One child process: ``import td_kernels`` loads no integration and no framework; with a
    framework made unimportable (None in sys.modules), importing its integration raises an
    ImportError that says what to pip install."""
    code = """if True:
        import sys, td_kernels
        print([m for m in sys.modules if m.startswith(('td_kernels.integrations', 'transformers', 'lightning',
                                                        'accelerate'))])
        for module, blocked in (("hf", ["transformers"]), ("lightning", ["lightning", "lightning.pytorch"])):
            for m in blocked:
                sys.modules[m] = None
            try:
                __import__("td_kernels.integrations." + module)
            except ImportError as e:
                print(e)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3, r.stdout + r.stderr
    assert lines[0] == "[]"
    assert "pip install transformers" in lines[1] and "pip install lightning" in lines[2]
