"""The checks of tests/test_data_parallel.py: DDP and FSDP2 with targeted dropout, in ONE
2-process gloo group on CPU.

``python tests/dp_worker.py RANK STORE_FILE OUT_PREFIX``: as tests/dist_worker.py (whose ``main``
runs these checks and writes the results), with the checks of ``CHECKS`` below.

What every training check shows, with the ranks drawing rank-dependent amounts from torch's
default generator at every step (:func:`diverge`: a random augmentation, say):

* every rank draws the same masks at every step (digests all-gathered and compared);
* they are the masks a single process draws for the same seeds, and the parameters are those of
  the single process bit for bit when it computes what data parallelism computes
  (:func:`train_replay`: each rank's half of the batch with the same draw, gradients averaged);
  against the single process on the whole batch at once (:func:`train_whole`), the masks are
  the same and the parameters agree up to float32 summation order (:data:`WHOLE_BATCH_ATOL`);
* a targeted forward exchanges exactly the collectives of the same model without targeted
  dropout (none under DDP; FSDP2's own all-gathers).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import td_kernels as td
from td_kernels.tools.demo import make_model

import dist_worker
from dist_worker import WORLD, Comms

CHECKS: dict = {}
STEPS = 3
# torch.compile's backend in the compile checks: aot_eager (dynamo, AOTAutograd and
# functionalization, then the eager kernels: the eager run's bits) keeps CI fast; inductor compiles
# C++ kernels (the two compile checks: 46 s instead of ~4 s on this 2-core VM, caches off) and
# rounds otherwise than eager (fusions, summation order): then only the seeds are compared
COMPILE_BACKEND = os.environ.get("TD_DP_COMPILE_BACKEND", "aot_eager")
# The parameters of the data-parallel run against the single process on the whole batch: both
# average the same per-example gradients, in another order (one matmul over 16 examples vs two
# over 8, then (g0 + g1) / 2), so they differ by float32 rounding: measured at most 1.5e-8 after
# 3 SGD steps (|w| < 0.13). Other masks (the base seeds + 1) move the parameters by 7e-4 to 8e-3
# in the same 3 steps: 1e-5 lies two orders of magnitude from each.
WHOLE_BATCH_ATOL = 1e-5


def check(name):
    return dist_worker.check(name, CHECKS)


# ---- models, data, the training loops ------------------------------------------------------
def mlp() -> nn.Module:
    return make_model("mlp")  # the demo's: Flatten, Linear(64, 128), ReLU, Linear(128, 128), ReLU, Linear(128, 10)


class WideMLP(nn.Module):
    """A model class of the user's own with 1 MiB layers. Compiled inside DDP, its forward is one
    frame, which DDP's buckets of 1 MiB (the smallest the DDP optimizer of torch.compile accepts:
    DDP's first bucket) split into 3 graphs (1 when torch._dynamo.config.optimize_ddp is off).
    An nn.Sequential would not show it: dynamo starts no frame in torch.nn's own files, so a
    compiled DDP(nn.Sequential) compiles each targeted layer's forward as its own graph."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 512), nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, 10)])

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


TD = dict(drop_rate=0.75, targ_rate=0.9)


def build(make=mlp, seed=0, **td_kwargs) -> nn.Module:
    """``make()`` under ``torch.manual_seed(seed)``, with targeted dropout (base seeds drawn
    next from the default generator, the same on every rank)."""
    torch.manual_seed(seed)
    model = make()
    td.apply_targeted_dropout(model, **(td_kwargs or TD))
    return model


def ddp(model, ctx):
    return DDP(model)


def fsdp(model, ctx):
    """FSDP2 as its docs do it: each layer, then the root."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=ctx.mesh)
    return fully_shard(model, mesh=ctx.mesh)


def batch(step: int, n: int = 16):
    """The global batch of ``step`` (the same on every rank; rank r trains on its r-th half)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def diverge(rank: int, step: int) -> None:
    """What a rank draws from the default generator besides targeted dropout (an augmentation,
    nn.Dropout elsewhere): a different amount on each rank and step."""
    torch.rand(1 + 5 * rank + step)


def digest(t) -> str:
    t = t.detach()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return hashlib.sha1(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


class Masks:
    """What every targeted layer drew at each forward while ``on``, in order: the targeted
    weight (weight and N:M modes: the TargetedDropout's output) or the kept units
    (``apply_to="output"``: unit_keep's result). Eager mode only (hooks)."""

    def __init__(self, model: nn.Module):
        self.seen, self.on = [], True
        for name, _, tdm in td.nn.targeted_dropout_modules(model):
            if tdm.apply_to == "output":
                tdm.unit_keep = lambda w, seed=None, f=tdm.unit_keep, name=name: self._add(name, f(w, seed))
            else:
                tdm.register_forward_hook(lambda mod, args, out, name=name: self._record(name, out))

    def _record(self, name, t) -> None:
        if self.on:
            self.seen.append((name, t.detach().clone()))

    def _add(self, name, t):
        self._record(name, t)
        return t

    def digests(self):
        return [(n, digest(t)) for n, t in self.seen]

    def patterns(self):
        """Which positions are zero (dropped weights) or kept (units): the masks, not the values."""
        return [(n, t if t.dtype == torch.bool else t == 0) for n, t in self.seen]


def train(wrapped, opt, rank, steps=STEPS, *, first=0, sched=None, comms=None):
    """Data-parallel training as users write it: rank ``rank`` trains on its half of each
    step's batch; returns the losses. ``comms`` (a list) receives each forward's collectives."""
    losses = []
    for step in range(first, first + steps):
        x, y = batch(step)
        diverge(rank, step)
        if comms is None:
            out = wrapped(x.chunk(WORLD)[rank])
        else:
            with Comms() as c:
                out = wrapped(x.chunk(WORLD)[rank])
            comms.append(c.calls)
        loss = F.cross_entropy(out, y.chunk(WORLD)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())
    return losses


def train_replay(model, opt, masks, steps=STEPS, *, first=0, sched=None):
    """What DDP and FSDP2 compute, in one process: per step, the forward and backward of each
    rank's half with the SAME targeted dropout draw (td.set_rng_state rewinds the layers'
    counters), the gradients averaged as they average them, then the optimizer step. DDP
    scales each rank's gradient by 1/2 (exact) and all-reduces by summing; FSDP2 reduce-scatters
    with AVG (sum, then / 2): both are (g0 + g1) / 2 to the bit (2 ranks: one addition)."""
    for step in range(first, first + steps):
        x, y = batch(step)
        state, grads = td.get_rng_state(model), []
        for r in range(WORLD):
            td.set_rng_state(model, state)
            masks.on = r == 0  # the second half draws the same masks again
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x.chunk(WORLD)[r]), y.chunk(WORLD)[r]).backward()
            grads.append([p.grad for p in model.parameters()])
        masks.on = True
        for p, (g0, g1) in zip(model.parameters(), zip(*grads)):
            p.grad = (g0 + g1) / 2
        opt.step()
        if sched is not None:
            sched.step()


def train_whole(model, opt, steps=STEPS):
    """One process, the whole batch at once (what 'a single process' usually means)."""
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def full(p):
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def same_on_every_rank(obj, what):
    got = [None] * WORLD
    dist.all_gather_object(got, obj)
    for r in range(1, WORLD):
        assert got[r] == got[0], f"{what}: rank {r} differs from rank 0"
    return got[0]


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"forward {i}: {x} vs {y}"
    return f"lengths {len(a)} vs {len(b)}" if len(a) != len(b) else None


# ---- data parallel against the single process -----------------------------------------------
def trained(ctx, model, wrapped, comms=None):
    """Train ``wrapped`` (``model`` inside); returns the mask digests, checked equal on every
    rank, and the whole parameters. All collectives of a check happen here, before it asserts."""
    masks = Masks(model)
    train(wrapped, sgd(model), ctx.rank, comms=comms)
    got_masks = same_on_every_rank(masks.digests(), "the masks")
    got_params = [full(p) for p in model.parameters()]
    same_on_every_rank([digest(p) for p in got_params], "the parameters")
    same_on_every_rank(td.get_rng_state(model).tolist(), "td.get_rng_state")
    return masks, got_masks, got_params


def expect_replayed(model, got_masks, got_params, ref) -> None:
    """The masks and parameters of the single process ``ref`` (the same weights and seeds)
    replaying the data-parallel steps (:func:`train_replay`), bit for bit."""
    ref_masks = Masks(ref)
    train_replay(ref, sgd(ref), ref_masks)
    assert len(ref_masks.seen) == len(got_masks) == STEPS * len(td.get_rng_state(ref))
    diff = first_difference(got_masks, ref_masks.digests())
    assert diff is None, f"masks differ from the single process's: {diff}"
    for (name, _), p, q in zip(model.named_parameters(), got_params, ref.parameters()):
        assert torch.equal(p, q.detach()), f"{name}: differs from the single process (replayed) by " \
                                           f"{(p - q).abs().max():.3g}"
    assert torch.equal(td.get_rng_state(model), td.get_rng_state(ref))


def _data_parallel(ctx, wrap, **td_kwargs):
    """``wrap`` (DDP or FSDP2) of the demo's MLP with targeted dropout ``td_kwargs``: masks on
    both ranks, against the single process (replayed, and on the whole batch); collectives."""
    plain, plain_comms = mlp(), []  # the same model without targeted dropout: what DDP/FSDP2 exchange anyway
    train(wrap(plain, ctx), sgd(plain), ctx.rank, comms=plain_comms)
    model, comms = build(**td_kwargs), []
    masks, got_masks, got_params = trained(ctx, model, wrap(model, ctx), comms)
    for i, (calls, want) in enumerate(zip(comms, plain_comms)):
        assert calls == want, f"step {i}: a targeted forward exchanged {calls}, the plain model's {want}"
    expect_replayed(model, got_masks, got_params, build(**td_kwargs))

    whole = build(**td_kwargs)
    whole_masks = Masks(whole)
    train_whole(whole, sgd(whole))
    for i, ((n, a), (_, b)) in enumerate(zip(masks.patterns(), whole_masks.patterns())):
        assert torch.equal(a, b), f"forward {i}, layer {n}: the mask differs from the whole-batch single process's"
    worst = max(float((p - q.detach()).abs().max()) for p, q in zip(got_params, whole.parameters()))
    print(f"{wrap.__name__} {td_kwargs or TD}: max |w - w_whole_batch| = {worst:.3g}", flush=True)
    assert worst <= WHOLE_BATCH_ATOL, f"parameters differ from the whole-batch run by {worst:.3g}"


@check("ddp/weight")
def _ddp_weight(ctx):
    _data_parallel(ctx, ddp)


@check("ddp/unit-output")
def _ddp_unit_output(ctx):
    _data_parallel(ctx, ddp, drop_rate=0.66, targ_rate=0.75, mode="unit", apply_to="output")


@check("ddp/nm")
def _ddp_nm(ctx):
    _data_parallel(ctx, ddp, drop_rate=0.75, mode="nm", n=2, m=4)


@check("ddp/seeds-broadcast")
def _ddp_seeds_broadcast(ctx):
    """Ranks that seeded differently before apply_targeted_dropout: DDP broadcasts rank 0's
    weights, and one broadcast of td.get_rng_state (docs/distributed.md) its seeds."""
    torch.manual_seed(10 + ctx.rank)
    model = mlp()
    td.apply_targeted_dropout(model, **TD)
    before = [None] * WORLD
    dist.all_gather_object(before, td.get_rng_state(model).tolist())
    state = td.get_rng_state(model)
    dist.broadcast(state, src=0)
    td.set_rng_state(model, state)
    _, got_masks, got_params = trained(ctx, model, DDP(model))
    assert before[0] != before[1], "the ranks drew the same seeds anyway"
    torch.manual_seed(10)  # rank 0's
    ref = mlp()
    td.apply_targeted_dropout(ref, **TD)
    expect_replayed(model, got_masks, got_params, ref)


@check("fsdp2/weight")
def _fsdp_weight(ctx):
    _data_parallel(ctx, fsdp)


@check("fsdp2/recompute")
def _fsdp_recompute(ctx):
    """The backward recomputing the mask from the weight it saved, which FSDP2 frees after the
    forward and gathers again before the layer's backward."""
    _data_parallel(ctx, fsdp, **TD, mask="recompute")


@check("fsdp2/meta-init")
def _fsdp_meta(ctx):
    """The deferred-initialisation flow: build on meta, apply_targeted_dropout, fully_shard,
    to_empty, load the initial weights, train: the masks and parameters of a single process
    that built the model on the CPU and applied targeted dropout after the same seed."""
    torch.manual_seed(0)
    init = mlp().state_dict()  # the initial weights (a checkpoint, a pretrained model)
    with torch.device("meta"):
        model = mlp()
    torch.manual_seed(1)  # the targeted dropout stream: the same seed on every rank
    td.apply_targeted_dropout(model, **TD)
    fsdp(model, ctx)
    model.to_empty(device="cpu")
    set_model_state_dict(model, dict(init), options=StateDictOptions(full_state_dict=True))
    _, got_masks, got_params = trained(ctx, model, model)

    ref = mlp()
    ref.load_state_dict(init)
    torch.manual_seed(1)
    td.apply_targeted_dropout(ref, **TD)
    expect_replayed(model, got_masks, got_params, ref)


@check("fsdp2/apply-after-shard")
def _fsdp_apply_after(ctx):
    """apply_targeted_dropout after fully_shard (the weights are DTensors then; each forward
    sees FSDP2's unsharded weight): the same masks and parameters as the single process."""
    torch.manual_seed(0)
    model = fsdp(mlp(), ctx)
    td.apply_targeted_dropout(model, **TD)
    _, got_masks, got_params = trained(ctx, model, model)
    expect_replayed(model, got_masks, got_params, build())


# ---- torch.compile -----------------------------------------------------------------------------
def _compiled(ctx, wrap, min_graphs):
    """torch.compile (:data:`COMPILE_BACKEND`) of ``wrap`` of a model under targeted dropout: it trains, with
    the eager run's losses and parameters to the bit and the same layer seeds (b + c), and
    compiles once: no recompile after the first step (error_on_recompile)."""
    eager = build(WideMLP)
    eager_losses = train(wrap(eager, ctx), sgd(eager), ctx.rank)
    want = [full(p) for p in eager.parameters()]

    torch._dynamo.reset()
    inner = torch._dynamo.lookup_backend(COMPILE_BACKEND)
    graphs = []

    def backend(gm, example_inputs):  # counts the graphs it is given
        graphs.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)
    model = build(WideMLP)
    compiled = torch.compile(wrap(model, ctx), backend=backend)
    opt = sgd(model)
    losses = train(compiled, opt, ctx.rank, steps=1)
    first = len(graphs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses += train(compiled, opt, ctx.rank, steps=STEPS - 1, first=1)
    got = [full(p) for p in model.parameters()]
    assert first >= min_graphs, f"{first} graphs compiled, expected at least {min_graphs}"
    assert len(graphs) == first, f"steps 2-{STEPS} compiled {len(graphs) - first} more graphs"
    state = td.get_rng_state(model)
    if COMPILE_BACKEND != "aot_eager":
        print(f"{COMPILE_BACKEND}: losses {losses}, eager {eager_losses}; max |w - w_eager| "
              f"{max(float((p - q).abs().max()) for p, q in zip(got, want)):.3g}", flush=True)
        got, losses = want, eager_losses
    assert torch.equal(torch.stack(losses), torch.stack(eager_losses)), f"losses {losses}, eager {eager_losses}"
    assert torch.equal(state, td.get_rng_state(eager)) and (state[:, 1] == STEPS).all(), \
        f"(b, c) per layer compiled {state.tolist()}, eager {td.get_rng_state(eager).tolist()}"
    for p, q in zip(got, want):
        assert torch.equal(p, q), f"compiled and eager differ by {(p - q).abs().max():.3g}"
    return first


@check("compile/ddp")
def _compile_ddp(ctx):
    """DDP's graph splitting at bucket boundaries (torch._dynamo.config.optimize_ddp, on by
    default) stays on: with 1 MiB buckets the model's graph is split in 3 (1 graph if off)."""
    assert torch._dynamo.config.optimize_ddp, "DDP's optimizer of torch.compile is off"
    _compiled(ctx, lambda m, ctx: DDP(m, bucket_cap_mb=1), min_graphs=3)


@check("compile/fsdp2")
def _compile_fsdp(ctx):
    _compiled(ctx, fsdp, min_graphs=1)


# ---- exact resume ----------------------------------------------------------------------------
def _resume(ctx, wrap, save, load, steps=6, k=3):
    """A run stopped after ``k`` steps and resumed from its checkpoint by fresh objects (another
    initialisation and other base seeds, as a new process has) draws the uninterrupted run's
    masks and reaches its parameters and optimizer state, bit for bit. AdamW and a RampSchedule."""
    def setup(seed):
        model = build(seed=seed)
        wrapped = wrap(model, ctx)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return model, wrapped, opt, td.RampSchedule(model, total_steps=steps)

    model, wrapped, opt, sched = setup(0)
    masks = Masks(model)
    train(wrapped, opt, ctx.rank, steps, sched=sched)
    want = [full(p) for p in model.parameters()]

    model, wrapped, opt, sched = setup(0)
    train(wrapped, opt, ctx.rank, k, sched=sched)
    path = [tempfile.mkdtemp(prefix="td-resume-") if ctx.rank == 0 else None]
    dist.broadcast_object_list(path)
    saved = td.get_rng_state(model)
    save(os.path.join(path[0], "ckpt"), model, wrapped, opt, sched)
    del model, wrapped, opt, sched

    model, wrapped, opt, sched = setup(5)
    assert not torch.equal(td.get_rng_state(model)[:, 0], saved[:, 0]), "the fresh model has the same seeds anyway"
    load(os.path.join(path[0], "ckpt"), model, wrapped, opt, sched)
    restored = td.get_rng_state(model)
    resumed = Masks(model)
    train(wrapped, opt, ctx.rank, steps - k, first=k, sched=sched)
    got = [full(p) for p in model.parameters()]
    n = len(saved)
    diff = first_difference(masks.digests()[k * n:], resumed.digests())
    assert diff is None, f"the resumed run's masks differ from the uninterrupted run's: {diff}"
    assert torch.equal(restored, saved), f"td_rng not restored: {restored} vs {saved}"
    assert sched.step_count == steps
    if ctx.rank == 0:
        shutil.rmtree(path[0])
    for p, q in zip(got, want):
        assert torch.equal(p, q), f"resumed and uninterrupted differ by {(p - q).abs().max():.3g}"


def ddp_save(path, model, wrapped, opt, sched):
    """Rank 0 writes what every rank holds alike (docs/distributed.md)."""
    if dist.get_rank() == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                    "td_rng": td.get_rng_state(model)}, path)
    dist.barrier()


def ddp_load(path, model, wrapped, opt, sched):
    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["schedule"])
    td.set_rng_state(model, ckpt["td_rng"])


class TrainState(Stateful):
    """torch.distributed.checkpoint's way (its tutorial's AppState), with the schedule and
    td_kernels' random state: one checkpoint for DDP and FSDP2 alike."""

    def __init__(self, model, opt, sched):
        self.model, self.opt, self.sched = model, opt, sched

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optimizer": optim_sd, "schedule": self.sched.state_dict(),
                "td_rng": td.get_rng_state(self.model)}

    def load_state_dict(self, state):
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        td.set_rng_state(self.model, state["td_rng"])


def dcp_save(path, model, wrapped, opt, sched):
    dcp.save({"train": TrainState(model, opt, sched)}, checkpoint_id=path)


def dcp_load(path, model, wrapped, opt, sched):
    dcp.load({"train": TrainState(model, opt, sched)}, checkpoint_id=path)


@check("resume/ddp")
def _resume_ddp(ctx):
    _resume(ctx, ddp, ddp_save, ddp_load)


@check("resume/fsdp2")
def _resume_fsdp(ctx):
    _resume(ctx, fsdp, dcp_save, dcp_load)


if __name__ == "__main__":
    import sys

    dist_worker.main(int(sys.argv[1]), sys.argv[2], sys.argv[3], CHECKS)
