"""Real transformers models built from small configs (no download): GPT-2 (Conv1D layers, a
tied lm_head) and Llama (nn.Linear) train under targeted dropout, prune, report, and keep plain
checkpoints. Skipped when transformers is not installed."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import td_kernels as td  # noqa: E402
from td_kernels.reference import count  # noqa: E402

VOCAB = 101


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"gpt2": _gpt2, "llama": _llama}


def _ids(seed, n=2, t=16):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _train(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for step in range(steps):
        ids = _ids(step)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_gpt2_targets_every_conv1d_by_its_output_features_and_not_the_tied_head():
    torch.manual_seed(0)
    model = _gpt2()
    keys = list(model.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, and the output head
    names = td.apply_targeted_dropout(model, 0.5, 0.5)
    assert names == [f"transformer.h.{i}.{n}" for i in range(2)
                     for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert list(model.state_dict()) == keys
    layer = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [in 32, out 128]
    w = layer.weight
    assert type(layer).__name__ == "Conv1D" and w.shape == (32, 128) and w.t().is_contiguous()
    # its forward is addmm with the targeted weight, the units being the 128 output features
    x = torch.randn(2, 5, 32)
    b, c = layer.targeted_dropout._rng.tolist()
    t = td.targeted_weight_dropout(w.t(), 0.5, 0.5, seed=b + c)  # [128, 32]
    torch.testing.assert_close(layer(x), x @ t.t() + layer.bias, rtol=1e-6, atol=1e-6)
    assert ((t == 0).sum(dim=1) <= count(0.5, 32)).all() and (t == 0).sum() > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_train_prune_report_and_plain_checkpoints(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]()
    plain_keys = list(model.state_dict())
    names = td.apply_targeted_dropout(model, 0.6, 0.5)
    assert names and "lm_head" not in names
    losses = _train(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    # a checkpoint saved under targeted dropout loads strictly into the plain model, and back
    sd = model.state_dict()
    assert list(sd) == plain_keys
    torch.manual_seed(1)
    plain = MODELS[name]()
    plain.load_state_dict(sd, strict=True)
    model.eval(), plain.eval()
    ids = _ids(9)
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)
    torch.manual_seed(2)
    again = MODELS[name]()
    td.apply_targeted_dropout(again, 0.6, 0.5)
    again.load_state_dict(plain.state_dict(), strict=True)
    # transformers' own format too
    model.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), plain.state_dict().values()))
    # prune 50% of every unit's weights (units along each layer's unit dim), fine-tune, report
    td.remove_targeted_dropout(model)
    pruned = td.prune_model(model, 0.5)
    assert pruned == names
    _train(model, steps=2)
    report = td.sparsity_report(model)
    by_name = {s.name: s for s in report.layers}
    for n in pruned:
        layer = model.get_submodule(n)
        v = td.nn.unit_view(layer)
        zeros_per_unit = (v == 0).sum(dim=1)
        assert (zeros_per_unit == count(0.5, v.shape[1])).all(), n  # kept zero through fine-tuning
        assert by_name[n].zeros == v.numel() // 2 and by_name[n].units == v.shape[0]
    assert list(model.state_dict()) == plain_keys
    assert "total" in str(report)


@pytest.mark.parametrize("name", list(MODELS))
def test_nm_training_and_pruning(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    names = td.apply_targeted_dropout(model, 0.5, mode="nm", n=2, m=4)
    sched = td.RampSchedule(model, total_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        ids = _ids(step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    td.remove_targeted_dropout(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every fan-in here is a multiple of 4: nothing skipped
        assert td.prune_model(model, mode="nm") == names
    report = td.sparsity_report(model)
    assert all(s.nm_ok for s in report.layers if s.name in names)
    assert not any(s.nm_ok for s in report.layers if s.name == "lm_head")


def test_llama_compiles_with_targeted_dropout_without_recompiles():
    import torch._dynamo
    import torch._dynamo.testing

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _llama()
    td.apply_targeted_dropout(model, 0.5, 0.5)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    for layer in model.model.layers:
        layer.compile(backend=cnt)
    ids = _ids(0)
    model(ids, labels=ids).loss.backward()
    first = cnt.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(1, 3):
            model(_ids(step), labels=_ids(step)).loss.backward()
    assert cnt.frame_count == first <= 2  # not one graph per decoder layer


def test_gpt2_on_the_meta_device():
    with torch.device("meta"):
        model = _gpt2()
    td.apply_targeted_dropout(model, 0.5, 0.5)
    out = model(torch.zeros(2, 8, dtype=torch.long, device="meta")).logits
    assert out.is_meta and out.shape == (2, 8, VOCAB)
