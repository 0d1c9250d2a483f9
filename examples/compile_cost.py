"""What targeted dropout costs torch.compile: compile time and recompiles of a 12-block
Llama-style model built from code, plain vs targeted dropout (td_kernels' mechanism) vs the same
TargetedDropout registered as a torch.nn.utils.parametrize parametrization (the mechanism
td_kernels used before), compiled whole (torch.compile(model)) or block by block
(block.compile(), as transformers users do).

    python examples/compile_cost.py                   # every variant, each in a fresh process
    python examples/compile_cost.py --one td whole    # one measurement (what the loop runs)

Each measurement runs in its own process with inductor's caches off, so every number is a cold
compile: the first training step (forward + backward) minus a later step is the compile time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("plain", "td", "parametrize")
COMPILES = ("whole", "per_block")


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.self_attn, self.mlp = Attention(d, heads), MLP(d, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, vocab=512, d=256, heads=4, hidden=688, layers=12):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm, self.lm_head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def measure(variant: str, how: str, steps: int = 3) -> dict:
    import torch._dynamo.testing

    import td_kernels as td

    torch.manual_seed(0)
    model = Llama()
    if variant == "td":
        td.apply_targeted_dropout(model, 0.5, 0.5)
    elif variant == "parametrize":
        from torch.nn.utils import parametrize

        for _, layer in td.nn.prunable_layers(model):
            parametrize.register_parametrization(layer, "weight", td.TargetedDropout(0.5, 0.5), unsafe=True)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    if how == "whole":
        run = torch.compile(model, backend=cnt)
    else:
        for block in model.layers:
            block.compile(backend=cnt)
        run = model
    ids = torch.randint(0, 512, (2, 64))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run(ids).float().square().mean().backward()
        times.append(time.perf_counter() - t)
    return {"variant": variant, "compile": how, "first_step_s": times[0], "step_s": min(times[1:]),
            "compile_s": times[0] - min(times[1:]), "frames": cnt.frame_count,
            "targeted_layers": sum(1 for _ in td.nn.targeted_dropout_modules(model))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "COMPILE"), help=f"{VARIANTS} x {COMPILES}")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over every variant, interleaved")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one)))
        return 0
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    rows = []
    for _ in range(args.repeats):
        for how in COMPILES:
            for variant in VARIANTS:
                out = subprocess.run([sys.executable, __file__, "--one", variant, how], env=env, check=True,
                                     capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{r['compile']:9s} {r['variant']:11s} compile {r['compile_s']:6.1f} s  frames {r['frames']:3d}  "
                      f"step {1000 * r['step_s']:7.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
