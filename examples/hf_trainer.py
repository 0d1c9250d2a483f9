"""Targeted dropout in a Hugging Face Trainer: a GPT-2 built from a small config (no download)
trained on generated tokens with TargetedDropoutCallback (ramped rates in the logs), stopped at a
checkpoint, resumed bit-exactly, pruned at the end, and saved with plain keys.

    pip install transformers accelerate
    python examples/hf_trainer.py [--steps 40] [--out hf_trainer_out]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import td_kernels as td
from td_kernels.integrations.hf import TargetedDropoutCallback

VOCAB = 128


class Tokens(torch.utils.data.Dataset):
    """A toy language: each sequence counts up from a random start."""

    def __init__(self, n=256, t=32):
        start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (start + torch.arange(t)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def fit(out: str, steps: int, resume: str | None = None):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8,
                                          learning_rate=3e-3, logging_steps=max(1, steps // 8),
                                          save_steps=steps // 2, report_to=[], use_cpu=True, disable_tqdm=True,
                                          dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    # weight-level targeting of 75% of each unit's smallest weights, dropped with probability 0.5,
    # ramped over the run (paper section 5.5); pruned to exactly those 75% when training ends
    cb = TargetedDropoutCallback(drop_rate=0.5, targ_rate=0.75, schedule="ramp", prune_at_end=True).attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, cb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    a = ap.parse_args(argv)
    out = a.out or tempfile.mkdtemp(prefix="hf_trainer_")

    trainer, model, cb = fit(out, a.steps)
    for h in trainer.state.log_history:
        if "loss" in h:
            print(f"step {h['step']:3d}  loss {h['loss']:.3f}  drop_rate {h['td/drop_rate']:.3f}  "
                  f"targ_rate {h['td/targ_rate']:.3f}")
    print(f"\npruned at the end: sparsity {cb.report.sparsity:.3f} of the targeted layers\n{cb.report}")

    # a second run resumes from the half-way checkpoint and ends on the same bits
    _, resumed, _ = fit(out, a.steps, resume=f"{out}/checkpoint-{a.steps // 2}")
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    print(f"resumed from checkpoint-{a.steps // 2}: parameters identical to the uninterrupted run: {same}")

    trainer.save_model(f"{out}/final")  # plain keys: loads into a plain GPT-2
    plain = transformers.GPT2LMHeadModel.from_pretrained(f"{out}/final")
    names = {s.name for s in cb.report.layers}
    layers = [s for s in td.sparsity_report(plain, nm=None).layers if s.name in names]
    print(f"saved to {out}/final; reloaded into a plain GPT-2: sparsity "
          f"{sum(s.zeros for s in layers) / sum(s.numel for s in layers):.3f} of the same layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
