"""Data-parallel training with targeted dropout: DDP or FSDP2, on CPUs (gloo) or GPUs (NCCL).

    torchrun --nproc-per-node 2 examples/distributed.py [--fsdp|--ddp] [--steps N] [--compile [BACKEND]]
                                                        [--save DIR] [--resume DIR]

Trains the demo's MLP (``td_kernels.tools.demo``, scikit-learn's 8x8 digits) with targeted weight
dropout (alpha 0.75, gamma 0.9) on a global batch of 64 split across the ranks. Every rank calls
``torch.manual_seed(seed)`` before ``apply_targeted_dropout`` (that fixes every layer's dropout
stream), then reseeds its default generator per rank for its own random augmentation: the ranks
still draw the same masks at every step, with no collective. Every ``--log-every`` steps it
all-gathers a digest of each targeted layer's mask (the positions its last training forward
dropped) and of the parameters, and prints that the ranks agree (exit 1 if not); at the end the
test accuracy, unpruned and with 90% of each unit's weights pruned (``td.prune_model``).

``--save DIR`` writes a checkpoint after the last step (torch.distributed.checkpoint: model,
optimizer, schedule and ``td.get_rng_state(model)``, plus each rank's torch RNG state, which the
augmentation uses); ``--resume DIR`` continues from one: ``--steps 100 --save D`` then
``--steps 200 --resume D`` ends with the fingerprint of an uninterrupted ``--steps 200`` run.
"""
from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import td_kernels as td
from td_kernels.tools.demo import load_data, make_model

BATCH = 64  # global: each rank trains on BATCH // world_size examples per step


class TrainState(Stateful):
    """What a checkpoint holds, the way torch.distributed.checkpoint wants it (DDP and FSDP2)."""

    def __init__(self, model, opt, sched):
        self.model, self.opt, self.sched = model, opt, sched

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optimizer": optim_sd, "schedule": self.sched.state_dict(),
                "td_rng": td.get_rng_state(self.model)}  # the same on every rank

    def load_state_dict(self, state):
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        td.set_rng_state(self.model, state["td_rng"])


def digest(t: torch.Tensor) -> str:
    if isinstance(t, DTensor):
        t = t.full_tensor()  # FSDP2's shards: the whole parameter (a collective: every rank calls it)
    t = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha1(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:12]


def batch_indices(step: int, n: int, seed: int) -> torch.Tensor:
    """The global batch of ``step``: a pass over a permutation per epoch, the same on every rank
    and a function of the step alone (a resumed run reads the same batches)."""
    per_epoch = n // BATCH
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + step // per_epoch))
    return perm[(step % per_epoch) * BATCH:(step % per_epoch + 1) * BATCH]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--ddp", dest="wrap", action="store_const", const="ddp", help="DistributedDataParallel (default)")
    group.add_argument("--fsdp", dest="wrap", action="store_const", const="fsdp", help="FSDP2 (fully_shard)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--ramp-steps", type=int, default=200, help="ramp the rates over these first steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                    help="torch.compile the wrapped model (backend: inductor, or e.g. aot_eager)")
    ap.add_argument("--save", metavar="DIR", help="write a checkpoint after the last step")
    ap.add_argument("--resume", metavar="DIR", help="continue from a checkpoint")
    args = ap.parse_args()
    wrap = args.wrap or "ddp"

    cuda = torch.cuda.is_available() and "LOCAL_RANK" in os.environ
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if BATCH % world:
        raise SystemExit(f"the global batch {BATCH} must split evenly over {world} ranks")
    log = print if rank == 0 else (lambda *a, **k: None)

    (X, y), (Xte, yte) = load_data(args.seed, device)
    torch.manual_seed(args.seed)  # the same on every rank: initial weights and every layer's dropout stream
    model = make_model("mlp").to(device)
    names = td.apply_targeted_dropout(model, drop_rate=0.75, targ_rate=0.9)
    torch.manual_seed(args.seed + 1 + rank)  # from here on each rank draws its own augmentation noise
    if wrap == "ddp":
        wrapped = DDP(model)
    else:
        mesh = init_device_mesh(device.type, (world,))
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    if args.compile:
        wrapped = torch.compile(wrapped, backend=args.compile)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = td.RampSchedule(model, total_steps=args.ramp_steps)
    start = 0
    if args.resume:
        dcp.load({"train": TrainState(model, opt, sched)}, checkpoint_id=args.resume)
        torch.set_rng_state(torch.load(os.path.join(args.resume, f"torch_rng.{rank}.pt")))
        start = sched.step_count
        log(f"resumed from {args.resume} at step {start}")

    dropped = {}  # layer -> where its last training forward dropped weights (eager: a forward hook)
    for name, _, tdm in td.nn.targeted_dropout_modules(model):
        tdm.register_forward_hook(lambda mod, inp, out, name=name: dropped.__setitem__(name, out.detach() == 0))

    log(f"{wrap.upper()} on {world} ranks ({dist.get_backend()}, {device.type}), targeted dropout on layers "
        f"{names}, {args.steps} steps of {BATCH} ({BATCH // world} per rank)")
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model.train()
    for step in range(start, args.steps):
        idx = batch_indices(step, len(X), args.seed)[mine].to(device)
        x = X[idx] + 0.05 * torch.randn(X[idx].shape).to(device)  # augmentation: each rank's own draws
        loss = F.cross_entropy(wrapped(x), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mine_digests = ([digest(dropped[n]) for n in names], [digest(p) for p in model.parameters()])
            every = [None] * world
            dist.all_gather_object(every, mine_digests)
            masks_ok = all(e[0] == every[0][0] for e in every)
            params_ok = all(e[1] == every[0][1] for e in every)
            log(f"step {step + 1:4d}  loss {loss.item():.3f}  masks {' '.join(every[0][0])}: "
                f"{'agree' if masks_ok else 'DIFFER'} on {world} ranks; parameters "
                f"{'agree' if params_ok else 'DIFFER'}")
            if not (masks_ok and params_ok):
                raise SystemExit(f"rank {rank}: the ranks disagree")

    if args.save:
        dcp.save({"train": TrainState(model, opt, sched)}, checkpoint_id=args.save)
        torch.save(torch.get_rng_state(), os.path.join(args.save, f"torch_rng.{rank}.pt"))
        log(f"checkpoint written to {args.save}")

    model.eval()
    with torch.no_grad():
        acc = (wrapped(Xte).argmax(1) == yte).float().mean().item()
    # the whole model on every rank (plain keys: a state dict of the plain MLP), pruned on rank 0
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    fingerprint = hashlib.sha1("".join(digest(full[k]) for k in sorted(full)).encode()).hexdigest()[:12]
    if rank == 0:
        plain = make_model("mlp")
        plain.load_state_dict(full)  # strict: the targeted model saves the plain model's keys
        td.prune_model(plain, 0.9)
        with torch.no_grad():
            pruned = (plain(Xte.cpu()).argmax(1) == yte.cpu()).float().mean().item()
        log(f"test accuracy {100 * acc:.1f}%, with 90% of each unit's weights pruned {100 * pruned:.1f}% "
            f"(parameters' fingerprint {fingerprint})")
    # every rank's collectives done before the group goes: a gloo group destroyed right after a
    # collective can deadlock (its worker thread needs the GIL to free the last work's tensors
    # while the destructor, holding the GIL, joins it; seen once here, pytorch issue #75097)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
