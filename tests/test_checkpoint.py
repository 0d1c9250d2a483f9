"""Every forward PyTorch re-runs draws that forward's own mask (issue 19).

Activation checkpointing re-runs a forward during the backward to rebuild its activations; a
targeted layer must then draw the mask of the forward being rebuilt, whatever the number and
order of forwards and backwards in between. Each test captures the masks the forwards used and
checks the weight's gradient against ``sum_i (g_i^T x_i) * keep_i`` (a linear layer, loss
``sum_i <y_i, g_i>``); the compiled and transformers cases check against the same model run
without checkpointing (same seeds), whose gradient the eager cases pin to the masks. Where a
combination cannot be exact it must raise, never return another gradient.
"""
import copy
import functools
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, checkpoint_sequential,
                                    create_selective_checkpoint_contexts)

import td_kernels as td

# (mode, mask, apply_to): every mask format of weight and N:M targeting, unit targeting of the
# weight and of the output
TARGETING = {
    "weight-bits": ("weight", "bits", "weight"),
    "weight-recompute": ("weight", "recompute", "weight"),
    "nm-bits": ("nm", "bits", "weight"),
    "nm-recompute": ("nm", "recompute", "weight"),
    "unit": ("unit", None, "weight"),
    "unit-output": ("unit", None, "output"),
}


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _targeted(model, mode, mask, apply_to="weight"):
    if mode == "nm":
        td.apply_targeted_dropout(model, 0.5, mode="nm", exclude=(), mask=mask)
    else:
        td.apply_targeted_dropout(model, 0.5, 0.75, mode=mode, exclude=(), mask=mask, apply_to=apply_to)
    return model


def _small(mode="weight", mask="bits", apply_to="weight"):
    """A targeted Linear(16, 8), first of two modules (checkpoint_sequential's first segment)."""
    torch.manual_seed(0)
    return _targeted(nn.Sequential(nn.Linear(16, 8), nn.Identity()), mode, mask, apply_to)


def _capture(layer, masks):
    """Record, for every forward outside a backward, the keep mask (shape of the weight) the
    layer used: the targeted weight's non-zeros (a random normal weight has no zero of its
    own), or for ``apply_to="output"`` the kept units."""
    tdm = layer.targeted_dropout
    if tdm.apply_to == "output":
        unit_keep = tdm.unit_keep

        def recording(w, seed=None):
            keep = unit_keep(w, seed)
            if not _in_backward():
                masks.append(keep[:, None].expand_as(w).clone())
            return keep
        tdm.unit_keep = recording
    else:
        tdm.register_forward_hook(lambda mod, args, out: None if _in_backward() else masks.append(out.detach() != 0))


def _save_mm(ctx, op, *args, **kwargs):
    # selective checkpointing: keep the matmuls, recompute everything else (the targeted op too)
    mm = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if op in mm else CheckpointPolicy.PREFER_RECOMPUTE


WRAPS = {
    "none": lambda m, x: m(x),
    "checkpoint": lambda m, x: checkpoint(m, x, use_reentrant=False),
    "reentrant": lambda m, x: checkpoint(m, x, use_reentrant=True),
    "sequential": lambda m, x: checkpoint_sequential(m, 2, x, use_reentrant=False),  # the first of 2 segments
    "sequential-reentrant": lambda m, x: checkpoint_sequential(m, 2, x, use_reentrant=True),
    "selective": lambda m, x: checkpoint(m, x, use_reentrant=False,
                                          context_fn=functools.partial(create_selective_checkpoint_contexts, _save_mm)),
}
# F i: forward of microbatch i; B i: its backward. "siamese": two forwards, one backward of the
# summed loss (a shared encoder); "gpipe" and "1f1b" are torch.distributed.pipelining's
# ScheduleGPipe and Schedule1F1B orders on one stage; "reverse": backwards in reverse order
ORDERS = {
    "siamese": None,
    "gpipe": "F0 F1 F2 F3 B0 B1 B2 B3",
    "1f1b": "F0 F1 B0 F2 B1 F3 B2 B3",
    "reverse": "F0 F1 F2 F3 B3 B2 B1 B0",
}


def _run(forward, xs, gs, order):
    """The forwards and backwards of ``order`` (loss_i = <forward(x_i), g_i>)."""
    if order is None:
        sum((forward(x) * g).sum() for x, g in zip(xs, gs)).backward()
        return
    outs = {}
    for step in order.split():
        i = int(step[1:])
        if step[0] == "F":
            outs[i] = forward(xs[i])
        else:
            outs.pop(i).backward(gs[i])


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("targeting", TARGETING)
def test_each_forward_draws_its_own_mask(targeting, wrap):
    model = _small(*TARGETING[targeting])
    layer = model[0]
    masks = []
    _capture(layer, masks)
    for name, order in ORDERS.items():
        n = 2 if order is None else 4
        xs = [torch.randn(3, 16, requires_grad=True) for _ in range(n)]  # reentrant needs an input that requires grad
        gs = [torch.randn(3, 8) for _ in range(n)]
        masks.clear()
        layer.weight.grad = None
        before = int(td.get_rng_state(model)[0, 1])
        _run(lambda x: WRAPS[wrap](model, x), xs, gs, order)
        assert len(masks) == n
        assert any(not torch.equal(masks[0], m) for m in masks[1:]), "the forwards drew one mask: no test"
        want = sum((g.T @ x.detach()) * keep for g, x, keep in zip(gs, xs, masks))
        torch.testing.assert_close(layer.weight.grad, want, msg=lambda m: f"{name}: {m}")
        assert int(td.get_rng_state(model)[0, 1]) == before + n  # one seed per forward, none per recompute


# ---- torch.compile ---------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, use_checkpoint=False):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)
        self.use_checkpoint = use_checkpoint

    def body(self, x):
        return self.b(torch.tanh(self.a(x)))

    def forward(self, x):
        return checkpoint(self.body, x, use_reentrant=False) if self.use_checkpoint else self.body(x)


def _grads(forward, model, xs, gs, order):
    for p in model.parameters():
        p.grad = None
    _run(forward, xs, gs, order)
    return [model.a.weight.grad, model.b.weight.grad]


@pytest.mark.parametrize("case", ["inductor-recomputes", "checkpoint-of-compiled"])
def test_compiled_forwards_draw_their_own_masks(case):
    """The compiled model (inductor's partitioner recomputes what is cheap: with the mask format
    "recompute" it rebuilt the seed from the layer's counter after the forward had advanced it,
    another mask); a compiled module checkpointed from eager code. Same gradients as the eager
    model, whose masks the eager test pins."""
    torch.manual_seed(0)
    model = _targeted(_Block(), "weight", "recompute")
    eager = copy.deepcopy(model)  # the same seeds
    eager.use_checkpoint = False
    compiled = torch.compile(model)
    forward = (lambda x: checkpoint(compiled, x, use_reentrant=False)) if case == "checkpoint-of-compiled" else compiled
    xs = [torch.randn(3, 16, requires_grad=True) for _ in range(4)]
    gs = [torch.randn(3, 8) for _ in range(4)]
    for order in (ORDERS["1f1b"], ORDERS["reverse"]):
        got = _grads(forward, model, xs, gs, order)
        want = _grads(eager, eager, xs, gs, order)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    assert torch.equal(td.get_rng_state(model), td.get_rng_state(eager))


def test_compiling_a_checkpointed_region_raises():
    """torch.compile traces checkpoint into its own recomputation, which would run the layer's
    seed counter again in the backward: a clear error at compile time, not another mask."""
    torch.manual_seed(0)
    model = _targeted(_Block(use_checkpoint=True), "weight", "bits")
    with pytest.raises(Exception, match="inside torch.utils.checkpoint"):
        torch.compile(model)(torch.randn(3, 16, requires_grad=True))


def test_reentrant_checkpoint_of_a_compiled_module_raises():
    torch.manual_seed(0)
    model = _targeted(_Block(), "weight", "bits")
    compiled = torch.compile(model)
    x = torch.randn(3, 16, requires_grad=True)
    out = checkpoint(compiled, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        out.sum().backward()


# ---- what cannot be told apart raises ----------------------------------------------------------
def test_recompute_without_the_saved_random_state_raises():
    model = _small()
    x = torch.randn(3, 16, requires_grad=True)
    for use_reentrant in (False, True):
        out = checkpoint(model, x, use_reentrant=use_reentrant, preserve_rng_state=False)
        with pytest.raises(RuntimeError, match="preserve_rng_state=False"):
            out.sum().backward()


def test_two_forwards_from_one_random_state_raise():
    model = _small()
    x = torch.randn(3, 16, requires_grad=True)
    outs = []
    for _ in range(2):
        torch.manual_seed(1)  # both forwards start from the same torch random state
        outs.append(checkpoint(model, x, use_reentrant=False))
    with pytest.raises(RuntimeError, match="same torch random state"):
        sum(outs).sum().backward()


def test_a_recompute_older_than_the_window_raises(monkeypatch):
    monkeypatch.setattr(td.nn, "RECOMPUTE_WINDOW", 3)
    model = _small()
    x = torch.randn(3, 16, requires_grad=True)
    outs = [checkpoint(model, x, use_reentrant=False) for _ in range(4)]
    outs[3].sum().backward()  # within the window
    with pytest.raises(RuntimeError, match="RECOMPUTE_WINDOW"):
        outs[0].sum().backward()


# ---- transformers' gradient checkpointing ------------------------------------------------------
def _hf_model(name):
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":  # no dropout of its own: these runs draw from torch's generator at other times
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformers_gradient_checkpointing(name, use_reentrant):
    torch.manual_seed(0)
    model = _hf_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GPT-2's tied lm_head is skipped
        _targeted(model, "weight", "recompute")
    plain = copy.deepcopy(model)  # the same seeds, no checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable: an alias since v5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train(), plain.train()
    ids = [torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for m in (model, plain):  # two forwards (a shared model), one backward
        sum(m(i, labels=i, use_cache=False).loss for i in ids).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and grads.keys() == {n for n, p in plain.named_parameters() if p.grad is not None}
    for n, p in plain.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, msg=lambda m: f"{n}: {m}")
    assert torch.equal(td.get_rng_state(model), td.get_rng_state(plain))
    assert (td.get_rng_state(model)[:, 1] == 2).all()


# ---- copies and reseeding ----------------------------------------------------------------------
def _masks_of(model, x):
    masks = []
    for _, layer, _ in td.nn.targeted_dropout_modules(model):
        _capture(layer, masks)
    model(x)
    return masks


def test_deepcopy_draws_the_same_masks_until_reseeded():
    torch.manual_seed(0)
    model = _targeted(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)), "weight", "bits")
    twin, other = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(3, 16)
    ref = _masks_of(model, x)
    assert all(torch.equal(a, b) for a, b in zip(ref, _masks_of(twin, x)))  # a copy is a copy
    td.reseed(other)
    assert (td.get_rng_state(other)[:, 1] == 0).all()
    assert not any(torch.equal(a, b) for a, b in zip(ref, _masks_of(other, x)))
    # from a generator: reproducible, and the same on every rank that seeds it the same
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    td.reseed(a, generator=torch.Generator().manual_seed(7))
    td.reseed(b, generator=torch.Generator().manual_seed(7))
    assert torch.equal(td.get_rng_state(a), td.get_rng_state(b))
    assert not torch.equal(td.get_rng_state(a)[:, 0], td.get_rng_state(model)[:, 0])


def test_reseed_checks_its_arguments():
    with pytest.raises(ValueError, match="no targeted dropout"):
        td.reseed(nn.Linear(4, 4))
    model = _small()
    with pytest.raises(TypeError, match="generator"):
        td.reseed(model, generator=7)
    with pytest.raises(TypeError, match="model"):
        td.reseed("model")
