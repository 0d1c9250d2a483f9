"""Targeted dropout in a Lightning Trainer: an MLP on a synthetic classification task trained with
TargetedDropoutCallback (ramped rates logged to a CSV logger), resumed bit-exactly from a
checkpoint, pruned at the end.

    pip install lightning
    python examples/lightning_trainer.py [--steps 60] [--out lightning_out]
"""
from __future__ import annotations

import argparse
import csv
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from td_kernels.integrations.lightning import TargetedDropoutCallback


class MLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                       torch.nn.ReLU(), torch.nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def data(steps_per_epoch: int = 10, batch: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps_per_epoch * batch, 32, generator=g)
    y = (x[:, :10] + 0.3 * torch.randn(x.shape[0], 10, generator=g)).argmax(dim=1)  # a learnable rule
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def fit(out: Path, steps: int, ckpt_path=None):
    torch.manual_seed(0)  # the same initial weights and targeted dropout base seeds in every run
    module = MLP()
    cb = TargetedDropoutCallback(drop_rate=0.5, targ_rate=0.9, schedule="ramp", prune_at_end=True)
    # checkpoints after the last batch of an epoch (10 steps): Lightning resumes exactly there
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=10, save_top_k=-1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=[cb, ckpt],
                        logger=CSVLogger(out, name="logs"), log_every_n_steps=5, enable_progress_bar=False,
                        enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(module, data(), ckpt_path=ckpt_path)
    return trainer, module, cb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    a = ap.parse_args(argv)
    out = Path(a.out or tempfile.mkdtemp(prefix="lightning_"))

    trainer, module, cb = fit(out / "full", a.steps)
    for row in csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")):
        if row.get("td/targ_rate"):
            print(f"step {int(row['step']):3d}  loss {float(row['loss']):.3f}  "
                  f"drop_rate {float(row['td/drop_rate']):.3f}  targ_rate {float(row['td/targ_rate']):.3f}")
    print(f"\npruned at the end: sparsity {cb.report.sparsity:.3f} of the targeted layers\n{cb.report}")

    first = sorted((out / "full" / "ckpt").glob("*.ckpt"))[0]
    _, resumed, _ = fit(out / "resumed", a.steps, ckpt_path=first)
    same = all(torch.equal(p, q) for p, q in zip(module.parameters(), resumed.parameters()))
    print(f"resumed from {first.name}: parameters identical to the uninterrupted run: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
