"""Targeted dropout on Hugging Face transformers models, built from small configs (no download).

GPT-2 (whose projections are transformers' Conv1D, weight [in, out], and whose lm_head is tied
to the token embedding) and Llama (nn.Linear): train a few steps under targeted dropout with a
ramp, checkpoint and resume exactly, prune, fine-tune (the zeros stay), report, and save with
save_pretrained (plain keys: the checkpoint loads into the plain model).

    pip install transformers
    python examples/transformers_models.py [--steps 20] [--mode weight|nm]
"""
from __future__ import annotations

import argparse
import io
import tempfile

import torch
import transformers

import td_kernels as td

VOCAB = 256


def build(name: str):
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def batch(step: int) -> torch.Tensor:
    """A toy language: each sequence counts up from a random start (the data of step `step`)."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (8, 1), generator=g)
    return (start + torch.arange(32)) % VOCAB


def setup(name: str, mode: str, steps: int, seed: int):
    torch.manual_seed(seed)  # the same on every rank under data parallel: the same masks everywhere
    model = build(name)
    if mode == "nm":  # 2:4 targeted dropout
        names = td.apply_targeted_dropout(model, 0.75, mode="nm", n=2, m=4)
    else:
        names = td.apply_targeted_dropout(model, 0.75, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = td.RampSchedule(model, total_steps=steps // 2)
    return model, opt, sched, names


def train(model, opt, sched, first: int, last: int) -> float:
    model.train()
    for step in range(first, last):
        ids = batch(step)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mode", choices=("weight", "nm"), default="weight")
    args = ap.parse_args(argv)
    half = args.steps // 2
    for name in ("gpt2", "llama"):
        model, opt, sched, names = setup(name, args.mode, args.steps, seed=0)
        print(f"\n== {name}: targeted dropout ({args.mode}) on {len(names)} layers, e.g. {names[0]}")
        train(model, opt, sched, 0, half)
        # checkpoint the way PyTorch users do, plus td_kernels' random state (torch's own RNG state
        # too: GPT-2's nn.Dropout layers draw from it)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                    "td_rng": td.get_rng_state(model), "torch_rng": torch.get_rng_state()}, buf)
        buf.seek(0)
        torch_rng = torch.get_rng_state()
        # resume in a "new process": rebuild (any seed), then restore everything
        model2, opt2, sched2, _ = setup(name, args.mode, args.steps, seed=123)
        ckpt = torch.load(buf)
        model2.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["optimizer"])
        sched2.load_state_dict(ckpt["schedule"])
        td.set_rng_state(model2, ckpt["td_rng"])
        torch.set_rng_state(torch_rng)  # (both runs go on from the checkpoint's torch RNG state)
        loss_a = train(model, opt, sched, half, args.steps)
        torch.set_rng_state(ckpt["torch_rng"])
        loss_b = train(model2, opt2, sched2, half, args.steps)
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
        print(f"loss after {args.steps} steps: {loss_a:.4f}; resumed run identical: {same} ({loss_b:.4f})")

        td.remove_targeted_dropout(model)
        if args.mode == "nm":
            td.prune_model(model, mode="nm", n=2, m=4)
        else:
            td.prune_model(model, 0.5)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # created after pruning: the zeros stay
        sched = type("NoSchedule", (), {"step": lambda self: None})()
        print(f"fine-tuned after pruning: loss {train(model, opt, sched, args.steps, args.steps + 5):.4f}")
        print(td.sparsity_report(model))
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            plain = type(model).from_pretrained(d)  # plain keys: no targeted dropout needed to load
            ok = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
            print(f"save_pretrained / from_pretrained round trip: {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
