"""Shrinking a unit-pruned model: a smaller dense model with the pruned units physically removed.

``small, report = td.shrink_model(model, example_inputs)`` deep-copies ``model`` and removes
every *zero unit* (an all-zero row of the unit view ``w.reshape(U, -1)`` of an ``nn.Linear`` /
``nn.ConvNd`` weight, SPEC section 1) that can be removed without changing the eval-mode output,
together with what consumes it: the next layers' input features / channels, BatchNorm channels,
the other members of a residual sum. The decision comes from the effective weights alone (a
``torch.nn.utils.prune`` mask or a parametrization is made permanent in the copy first), so it
does not care how the zeros got there (``td.prune_model``, ``td.prune_units``, by hand).

Structure: the coupling of channels across layers (Linear -> BN -> ReLU -> Flatten -> Linear,
residual adds, concatenations) comes from torch-pruning's ``DependencyGraph``, traced once on
``example_inputs``. For each group of coupled channels we decide which channels go; torch-pruning
cuts them. Attention blocks with ``q_proj/k_proj/v_proj/o_proj`` (Llama, Mistral, Qwen2, ...)
are opaque to that graph (torch-pruning 1.6.1's group walk did not finish on transformers'
SDPA attention) and lose whole KV groups instead, by a rule of their own (below).

The bias rule (why the output stays equal). A zero unit does not output 0: it outputs its bias
``b`` (a convolution: ``b`` at every position), and whatever lies between it and the next layers
(BatchNorm in eval mode, an activation, pooling, flattening, a residual sum whose every member is
zero there) turns that into a constant ``c`` = e.g. ``relu(bn(b))`` at the consumer's input.
Removing the unit removes ``W[:, j] * c`` from every consumer's pre-activation, so it is added to
the consumer's bias instead (a bias is created if it had none). We read ``c`` off a forward pass
on ``example_inputs`` (so any chain of elementwise ops is handled without modelling each one) and
require the channel to be exactly constant there. The fold is exact for an ``nn.Linear`` consumer
and for a convolution none of whose taps reads padding; a zero-padded convolution sees ``c`` at
inner taps and 0 at border taps, which no bias reproduces, so a unit whose ``c != 0`` feeds one is
kept (and reported). ``c == 0`` (e.g. ReLU of a negative bias) needs no fold at all.

What stays, and is reported with the reason: zero units of a layer whose channels are coupled
with a layer where the same channel is not zero (residual groups, gated products), with a
norm that mixes channels (LayerNorm, RMSNorm, GroupNorm), an embedding, a raw parameter, a
grouped convolution or an op we cannot vouch for; units of the model's output; units feeding a
zero-padded convolution a non-zero constant; the last unit of a layer whose units are all zero
(so every layer keeps a non-empty output); units the example forward does not reach.

Attention (whole heads). A head's output is ``softmax(q k^T) v``: zero query or key rows leave
the softmax uniform and the head still outputs a mean of values, so only zero *value* rows
silence a head. A KV group is removed when all ``head_dim`` value rows of it are zero (and its
value bias, if any, is zero): its key and value rows, the rows of the query heads that read it
and the matching input columns of ``o_proj`` go together, so the shrunk layer keeps
``num_heads / num_kv_heads`` query heads per KV group (transformers' Llama attention reshapes with
``-1`` heads, so the module runs unchanged). Partially zero value heads and zero q/k rows stay.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from .._params import _fan_in
from ..training.nn import _relayout, layer_type, targeted_dropout_modules, unit_view

__all__ = ["shrink_model", "ShrinkReport", "LayerShrink", "zero_units"]

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")

# Autograd nodes that torch-pruning treats as elementwise and that really act on each channel
# alone (or, for pooling, on each channel's positions alone): a constant channel stays constant
# and removing it does not change the others. Anything else in a group (softmax, a reduction over
# channels, an unknown op) makes us keep the group rather than guess.
_CHANNELWISE_OPS = {
    "Relu", "Relu6", "Hardtanh", "LeakyRelu", "Elu", "Gelu", "Silu", "Sigmoid", "Tanh", "Softplus", "Hardswish",
    "Hardsigmoid", "Mish", "Neg", "Abs", "Add", "Sub", "Mul", "Div", "Clone", "Clamp", "ClampMin", "ClampMax",
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AvgPool2D", "AvgPool3D",
    "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "Unsqueeze", "Squeeze",
    "Permute", "Transpose", "T", "Mm", "Addmm", "ToCopy", "Contiguous", "Alias",
}
_REDUCTIONS = {"Mean", "Sum"}


@dataclass
class LayerShrink:
    """One nn.Linear / nn.ConvNd: its units before and after, and why zero units were left."""
    name: str
    units: int        # units (output features / channels) before
    kept: int         # units after
    zero_units: int   # all-zero units before
    left: Counter = field(default_factory=Counter)  # reason -> zero units left in place

    @property
    def removed(self) -> int:
        return self.units - self.kept


@dataclass
class ShrinkReport:
    """What ``shrink_model`` did. ``left`` lists the zero units still in the model, with reasons."""
    layers: list = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    folded: list = field(default_factory=list)   # layers whose bias absorbed removed constants
    heads: list = field(default_factory=list)    # (attention module, kv groups removed, of, query heads removed)
    max_abs_diff: float | None = None            # largest |shrunk - original| over example outputs
    output_scale: float | None = None            # largest |original| over example outputs

    @property
    def removed_units(self) -> int:
        return sum(s.removed for s in self.layers)

    @property
    def left(self) -> list:
        """``[(layer, zero units left, reason), ...]``."""
        return [(s.name, n, r) for s in self.layers for r, n in sorted(s.left.items())]

    def layer(self, name: str) -> LayerShrink:
        for s in self.layers:
            if s.name == name:
                return s
        raise KeyError(name)

    def __str__(self) -> str:
        rows = [("layer", "units", "zero", "removed", "kept")]
        rows += [(s.name, str(s.units), str(s.zero_units), str(s.removed), str(s.kept)) for s in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"parameters: {self.params_before} -> {self.params_after} "
                     f"({100 * self.params_after / max(1, self.params_before):.1f}%)")
        for name, groups, of, heads in self.heads:
            lines.append(f"{name}: removed {groups} of {of} KV groups ({heads} query heads)")
        if self.folded:
            lines.append("biases that absorbed removed constants: " + ", ".join(self.folded))
        for name, n, reason in self.left:
            lines.append(f"left {n} zero unit(s) in {name}: {reason}")
        if self.max_abs_diff is not None:
            lines.append(f"max |shrunk - original| on example_inputs: {self.max_abs_diff:.3g} "
                         f"(output scale {self.output_scale:.3g})")
        return "\n".join(lines)


def zero_units(w: Tensor) -> Tensor:
    """Indices of the all-zero units (rows of ``w.reshape(w.shape[0], -1)``; -0.0 counts as zero)."""
    return (w.detach().reshape(w.shape[0], -1) == 0).all(dim=1).nonzero().flatten()


# --- inputs and outputs ----------------------------------------------------------------------

def _check_inputs(example_inputs) -> None:
    if not isinstance(example_inputs, (Tensor, tuple, list, Mapping)):
        raise TypeError("example_inputs must be a Tensor, a tuple/list of positional arguments or a dict of "
                        f"keyword arguments, got {type(example_inputs).__name__}")


def _call(model: nn.Module, example_inputs):
    if isinstance(example_inputs, Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(*example_inputs)


def _tensors(out) -> list:
    """The floating-point tensors in a model output (tensors, tuples, dicts, transformers' ModelOutput)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _run(model: nn.Module, example_inputs) -> list:
    try:
        with torch.no_grad():
            out = _tensors(_call(model, example_inputs))
    except Exception as e:
        raise ValueError(f"example_inputs: the model failed on them ({type(e).__name__}: {e})") from e
    if not out:
        raise ValueError("example_inputs: the model's output holds no floating-point tensor to trace")
    return out


# --- the copy: permanent weights -------------------------------------------------------------

def _copy(model: nn.Module) -> nn.Module:
    """deepcopy, also of a model pruned by torch.nn.utils.prune: its ``weight`` attribute is a
    non-leaf tensor (``weight_orig * weight_mask``), which deepcopy refuses; the copy gets a
    detached one, recomputed by ``prune.remove`` in ``_materialize``."""
    memo = {}
    for mod in model.modules():
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                t = getattr(mod, hook._tensor_name, None)
                if isinstance(t, Tensor) and t.grad_fn is not None:
                    memo[id(t)] = t.detach()
    return copy.deepcopy(model, memo)


def _materialize(model: nn.Module) -> None:
    """Make pruning masks and parametrizations permanent; refuse forward hooks on the layers we
    cut (targeted dropout is no hook: the copy keeps it, in eval mode the identity)."""
    for name, mod in model.named_modules():
        for hook in list(mod._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(mod, hook._tensor_name)
        if parametrize.is_parametrized(mod):
            for pname in list(mod.parametrizations):
                parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
        if isinstance(mod, LAYER_TYPES) and _hooked(mod):
            raise _hooks_error(name)


def _hooked(mod) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks)


def _hooks_error(name: str) -> ValueError:
    return ValueError(f"layer {name!r} has forward hooks; remove them before shrink_model: a shrunk layer cannot "
                      "keep per-unit hook state")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- attention: whole KV groups ----------------------------------------------------------------

def _attention_modules(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules()
            if all(isinstance(getattr(m, p, None), nn.Linear) for p in _ATTN_PROJ)
            and isinstance(getattr(m, "head_dim", None), int)]


def _shrink_heads(name, attn, stats: dict, excluded: set, report: ShrinkReport) -> None:
    import torch_pruning as tp

    q, k, v, o = (getattr(attn, p) for p in _ATTN_PROJ)
    hd = attn.head_dim
    names = {p: f"{name}.{p}" for p in _ATTN_PROJ}

    def leave(proj, idxs, reason):
        if len(idxs):
            stats[names[proj]].left[reason] += len(idxs)

    zq, zk, zv, zo = (zero_units(p.weight) for p in (q, k, v, o))
    if any(names[p] in excluded for p in _ATTN_PROJ) or \
            q.out_features % hd or k.out_features % hd or k.out_features != v.out_features or \
            o.in_features != q.out_features or (q.out_features // hd) % (k.out_features // hd):
        why = ("excluded" if any(names[p] in excluded for p in _ATTN_PROJ)
               else f"attention layout not recognised (head_dim {hd}, q/k/v/o {q.out_features}/{k.out_features}/"
                    f"{v.out_features}/{o.in_features})")
        for p, z in zip(_ATTN_PROJ, (zq, zk, zv, zo)):
            leave(p, z, why)
        return
    H, KV = q.out_features // hd, k.out_features // hd
    rep = H // KV
    vzero = torch.zeros(v.out_features, dtype=torch.bool)
    vzero[zv] = True
    if v.bias is not None:
        vzero &= (v.bias.detach() == 0).cpu()
    silent = [g for g in range(KV) if vzero[g * hd:(g + 1) * hd].all()]
    if len(silent) == KV:  # keep one group: a layer with no heads is not a Llama layer
        silent = silent[1:]
    gone = set(silent)
    kv_rows = [g * hd + i for g in silent for i in range(hd)]
    q_rows = [h * hd + i for h in range(H) if h // rep in gone for i in range(hd)]
    leave("v_proj", [r for r in zv.tolist() if r // hd not in gone],
          f"value rows silence a head only as a whole KV group of {hd} rows (with zero value bias)")
    leave("q_proj", [r for r in zq.tolist() if r // hd // rep not in gone],
          "a zero query unit does not silence its head (zero scores give uniform attention)")
    leave("k_proj", [r for r in zk.tolist() if r // hd not in gone],
          "a zero key unit does not silence its head (zero scores give uniform attention)")
    leave("o_proj", zo, "o_proj's units are the hidden size (residual stream, normalised across units)")
    if silent:
        tp.prune_linear_out_channels(k, kv_rows)
        tp.prune_linear_out_channels(v, kv_rows)
        tp.prune_linear_out_channels(q, q_rows)
        tp.prune_linear_in_channels(o, q_rows)
        for attr, val in (("num_heads", H - len(q_rows) // hd), ("num_key_value_heads", KV - len(silent))):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, val)
        report.heads.append((name, len(silent), KV, len(q_rows) // hd))
    for p in _ATTN_PROJ:
        stats[names[p]].kept = getattr(attn, p).weight.shape[0]


class _Opaque(torch.autograd.Function):
    """The attention output with a graph edge to the block's input only: torch-pruning sees one
    elementwise node instead of the block's internals (which it cannot trace)."""

    @staticmethod
    def forward(ctx, x, out):
        return out.clone()

    @staticmethod
    def backward(ctx, grad):  # never run: the graph is only traced
        return None, None


def _opaque_hook(mod, args, kwargs, out):
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, Tensor) or not isinstance(out, (tuple, Tensor)):
        return out
    if isinstance(out, Tensor):
        return _Opaque.apply(x, out.detach())
    return (_Opaque.apply(x, out[0].detach()),) + tuple(t.detach() if isinstance(t, Tensor) else t for t in out[1:])


# --- GPT-2's MLP: Conv1D units along dim 1 ---------------------------------------------------------

_CONV1D = "transformers.pytorch_utils.Conv1D"  # the registry's key (transformers is never imported here)
_HIDDEN = "its units are the hidden size (the residual stream, normalised across units by LayerNorm)"
_CONV1D_LEFT = {  # zero units of the other GPT-2 Conv1D layers, by name
    "c_attn": "GPT-2's fused query/key/value projection: shrink_model removes no GPT-2 heads",
    "c_proj": _HIDDEN,
}


def _is_conv1d(mod) -> bool:
    entry = layer_type(mod)
    return entry is not None and entry.key == _CONV1D


def _gpt2_mlps(model: nn.Module) -> list:
    """GPT-2's MLP blocks (GPT2MLP and its copies): ``c_proj(act(c_fc(x)))``, two Conv1D."""
    return [(n, m) for n, m in model.named_modules()
            if _is_conv1d(getattr(m, "c_fc", None)) and _is_conv1d(getattr(m, "c_proj", None))
            and hasattr(m, "act") and m.c_proj.weight.shape[0] == m.c_fc.weight.shape[1]]


def _shrink_gpt2_mlp(name, mlp, model, example_inputs, stats: dict, excluded: set, report) -> None:
    """Remove c_fc's zero units (columns of its ``[in, out]`` weight) and c_proj's matching
    inputs (rows); each removed unit's constant ``act(bias)``, read at c_proj's input, goes into
    c_proj's bias (the bias rule, exact: c_proj is a matmul)."""
    fc, proj = mlp.c_fc, mlp.c_proj
    n_fc, n_proj = f"{name}.c_fc", f"{name}.c_proj"
    stats[n_proj].left[_HIDDEN] += stats[n_proj].zero_units
    zu = zero_units(unit_view(fc)).tolist()
    if not zu:
        return
    for n, layer in ((n_fc, fc), (n_proj, proj)):
        if _hooked(layer):
            raise _hooks_error(n)
    if n_fc in excluded or n_proj in excluded:
        stats[n_fc].left["excluded" if n_fc in excluded else f"its consumer {n_proj} is excluded"] += len(zu)
        return
    seen = _input_stats(model, example_inputs, [proj]).get(proj)
    if seen is None:
        stats[n_fc].left["not reached by example_inputs"] += len(zu)
        return
    lo, hi = seen
    gone = [j for j in zu if lo[j] == hi[j]]
    if len(gone) < len(zu):
        stats[n_fc].left[f"the channel it feeds {n_proj} is not constant over example_inputs"] += len(zu) - len(gone)
    if gone and len(gone) == fc.nf:
        stats[n_fc].left["every unit is zero: one is kept so that the layer keeps an output"] += 1
        gone = gone[1:]
    if not gone:
        return
    with torch.no_grad():
        idx = torch.tensor(gone, device=proj.weight.device)
        c = lo.to(proj.weight.device)[idx]
        proj.bias.copy_((proj.bias.double() + proj.weight.index_select(0, idx).double().t() @ c).to(proj.bias.dtype))
        keep = torch.tensor(sorted(set(range(fc.nf)) - set(gone)), device=fc.weight.device)
        for layer, dim, param in ((fc, 1, "weight"), (fc, 0, "bias"), (proj, 0, "weight")):
            old = getattr(layer, param)
            setattr(layer, param, nn.Parameter(old.index_select(dim, keep), requires_grad=old.requires_grad))
    fc.nf = len(keep)
    proj.nx = len(keep)
    report.folded.append(n_proj)


# --- dependency groups ------------------------------------------------------------------------

def _op_name(node) -> str:
    name = node.grad_fn.name() if node.grad_fn is not None and hasattr(node.grad_fn, "name") else "?"
    return name.removesuffix("Backward0").removesuffix("Backward1").removesuffix("Backward")


def _zero_padded(conv) -> bool:
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _group_problem(DG, group, excluded_mods: set, tp) -> str | None:
    """Why this group of coupled channels cannot lose channels at all, or None."""
    T = tp.ops.OPTYPE
    for dep, _ in group:
        node, mod = dep.target, dep.target.module
        if node.type in (T.CONV, T.LINEAR, T.DEPTHWISE_CONV):
            if not isinstance(mod, LAYER_TYPES):
                return f"coupled with {node.name}, a {type(mod).__name__} we do not shrink"
            if getattr(mod, "groups", 1) != 1:
                return f"coupled with the grouped convolution {DG._module2name.get(mod)}"
            if mod in excluded_mods:
                return f"coupled with the excluded layer {DG._module2name.get(mod)}"
        elif node.type == T.BN:
            continue
        elif node.type == T.OUTPUT:
            return "its units are outputs of the model"
        elif node.type in (T.RESHAPE, T.CONCAT, T.SPLIT, T.SLICE):
            continue
        elif node.type == T.ELEMENTWISE:
            op = _op_name(node)
            if op in _REDUCTIONS:
                dims = getattr(node.grad_fn, "_saved_dim", None)
                shape = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
                if dims is not None and shape is not None and len(shape) >= 4 and \
                        all(2 <= d % len(shape) for d in dims):
                    continue  # a spatial reduction of conv feature maps
                return f"passes through a {op} that may reduce across channels"
            if op not in _CHANNELWISE_OPS:
                return f"passes through {op}, which may mix channels"
        elif node.type == T.PARAMETER:
            return f"coupled with the parameter {DG._module2name.get(mod, '?')} (a norm's scale?)"
        else:
            return f"coupled with {node.name}, which mixes channels or has no exact rule here"
    return None


def _input_stats(model, example_inputs, consumers) -> dict:
    """Per consumer: (min, max) of each input channel over example_inputs (batch and positions)."""
    stats, hooks = {}, []

    def hook(mod, args):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]) if mod.weight.ndim == 2 else \
            x.movedim(1 if x.ndim == mod.weight.ndim else 0, 0).reshape(mod.in_channels, -1).t()
        lo, hi = x.amin(0).double(), x.amax(0).double()
        if mod in stats:
            lo, hi = torch.minimum(lo, stats[mod][0]), torch.maximum(hi, stats[mod][1])
        stats[mod] = (lo, hi)

    for m in consumers:
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _call(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _fold(mod, cols: dict) -> None:
    """Add sum_j W[:, j] * c_j (over the removed input channels j) to the consumer's bias."""
    idx = torch.tensor(sorted(cols), device=mod.weight.device)
    c = torch.tensor([cols[j] for j in sorted(cols)], dtype=torch.float64, device=mod.weight.device)
    w = mod.weight.detach().index_select(1, idx).double()
    delta = w.reshape(w.shape[0], w.shape[1], -1).sum(2) @ c
    if mod.bias is None:
        mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype, device=mod.weight.device),
                                requires_grad=mod.weight.requires_grad)
    mod.bias.data = (mod.bias.detach().double() + delta).to(mod.bias.dtype)


def _shrink_group(DG, tp, root, model, example_inputs, names, stats, excluded_mods, report, cache) -> set:
    """Decide and cut one group of coupled channels, rooted at ``root``'s outputs. Returns the
    producing layers of the group (handled now). ``cache``: consumers' input statistics, valid
    until a cut renumbers a consumer's inputs (cutting a group leaves the other channels' values
    unchanged: a zero unit's output is its bias, and a fold adds 0 to it)."""
    out_fn = DG.get_pruner_of_module(root).prune_out_channels
    U = root.weight.shape[0]
    group = DG.get_pruning_group(root, out_fn, list(range(U)))
    producers, consumers = {}, {}  # module -> {root idx: [target idx]}
    for item in group.items:
        mod = item.dep.target.module
        if isinstance(mod, LAYER_TYPES):
            side = producers if DG.is_out_channel_pruning_fn(item.dep.handler) else consumers
            per = side.setdefault(mod, {})
            for i, r in zip(item.idxs, item.root_idxs):
                per.setdefault(r, []).append(i)
    zero = {m: set(zero_units(m.weight).tolist()) for m in producers}
    problem = _group_problem(DG, group, excluded_mods, tp)

    # reasons for each root index that cannot go (None: it can)
    reason = {r: problem for r in range(U)} if problem else {}
    for r in ([] if problem else range(U)):
        for m, per in producers.items():
            bad = [i for i in per.get(r, []) if i not in zero[m]]
            if bad:
                reason[r] = (f"coupled (residual sum / elementwise product) with {names[m]}, where the same "
                             "channel is not zero")
                break
    candidates = [r for r in range(U) if r not in reason]
    if candidates:
        if any(m not in cache for m in consumers):  # one forward refreshes every stale layer
            cache.update(_input_stats(model, example_inputs, [m for m in names if isinstance(m, LAYER_TYPES)
                                                              and m not in cache]))
        st = cache
        for r in candidates:
            for m, per in consumers.items():
                for j in per.get(r, []):
                    lo, hi = (float(t[j]) for t in st[m]) if m in st else (float("nan"),) * 2
                    if not lo == hi:
                        reason[r] = (f"the channel it feeds {names[m]} (input {j}) is not constant over "
                                     "example_inputs" if m in st else f"{names[m]} is not reached by example_inputs")
                    elif lo != 0 and _zero_padded(m):
                        reason[r] = (f"its constant output (its bias through the layers after it) is non-zero and "
                                     f"feeds the zero-padded convolution {names[m]}: no bias can absorb it")
                    else:
                        continue
                    break
                if r in reason:
                    break
    removable = [r for r in candidates if r not in reason]
    if removable and len(removable) == U:
        reason[removable[0]] = "every unit is zero: one is kept so that the layer keeps an output"
        removable = removable[1:]
    # guard against a consumer losing all its inputs (torch-pruning's own check)
    while removable and not DG.check_pruning_group(DG.get_pruning_group(root, out_fn, removable)):
        reason[removable[-1]] = "kept so that no coupled layer loses all its channels"
        removable = removable[:-1]

    keep = set(range(U)) - set(removable)
    for m, per in producers.items():  # zero units of each producer that stay, with the root index's reason
        for r in keep:
            for i in per.get(r, []):
                if i in zero[m]:
                    stats[names[m]].left[reason.get(r, "kept")] += 1
    if removable:
        rem = set(removable)
        for m, per in consumers.items():
            cols = {j: float(st[m][0][j]) for r in removable for j in per.get(r, []) if float(st[m][0][j]) != 0}
            if cols:
                _fold(m, cols)
                if names[m] not in report.folded:
                    report.folded.append(names[m])
        DG.get_pruning_group(root, out_fn, sorted(rem)).prune()
        for m in consumers:
            cache.pop(m, None)
    return set(producers)


def shrink_model(model: nn.Module, example_inputs, *, exclude=(), verify: bool = True):
    """A smaller dense copy of ``model`` with its zero units removed; returns ``(new_model, report)``.

    ``example_inputs``: what the model is called with: a Tensor (``model(x)``), a tuple/list
    (``model(*args)``) or a dict (``model(**kwargs)``). They are used to trace the layer coupling
    and to read the constant each removed unit contributes, so give a realistic batch of more than
    one sample. ``exclude``: names (or modules) of layers that keep their shape: their units stay,
    and so do the units of every layer coupled with them (the layers feeding them included). ``verify``: run both models on ``example_inputs`` and
    store the largest absolute output difference in ``report.max_abs_diff``.

    The input model is not modified. The new model is in the same train/eval mode as the input;
    it equals the pruned model in eval mode, up to float rounding (removed zero terms and folded
    constants change the summation order). See the module docstring for the rules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_inputs(example_inputs)
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise ImportError("shrink_model needs torch-pruning: pip install torch-pruning") from e

    new = _copy(model)
    training = {m: m.training for m in new.modules()}
    new.eval()
    _materialize(new)
    names = {m: n for n, m in new.named_modules()}
    by_name = {n: m for m, n in names.items()}
    exclude = [exclude] if isinstance(exclude, (str, nn.Module)) else list(exclude)
    excluded = set()
    for e in exclude:
        if isinstance(e, str):
            if e not in by_name:
                raise ValueError(f"exclude names {e!r}, which is not a submodule of the model")
            excluded.add(e)
        elif isinstance(e, nn.Module):
            orig = {m: n for n, m in model.named_modules()}
            if e not in orig:
                raise ValueError(f"exclude holds a {type(e).__name__} that is not a submodule of the model")
            excluded.add(orig[e])
        else:
            raise TypeError(f"exclude must hold module names or modules, got {type(e).__name__}")
    excluded_mods = {by_name[n] for n in excluded}
    reference = _run(new, example_inputs)

    report = ShrinkReport(params_before=_count(new))
    # a row for every registered layer (td.register_layer): every zero unit is removed or left with a reason
    rows = [(n, m) for n, m in new.named_modules() if layer_type(m) is not None]
    stats = {n: LayerShrink(n, unit_view(m).shape[0], unit_view(m).shape[0], len(zero_units(unit_view(m))))
             for n, m in rows}
    report.layers = [stats[n] for n, _ in rows]
    layers = [(n, m) for n, m in rows if isinstance(m, LAYER_TYPES)]  # what the dependency graph cuts

    mlps = _gpt2_mlps(new)
    for name, mlp in mlps:
        _shrink_gpt2_mlp(name, mlp, new, example_inputs, stats, excluded, report)
    in_mlp = {id(getattr(m, p)) for _, m in mlps for p in ("c_fc", "c_proj")}

    attention = _attention_modules(new)
    for name, attn in attention:
        _shrink_heads(name, attn, stats, excluded, report)
    in_attention = {id(getattr(a, p)) for _, a in attention for p in _ATTN_PROJ}

    hooks = [a.register_forward_hook(_opaque_hook, with_kwargs=True) for _, a in attention]
    try:
        with torch.enable_grad():
            DG = tp.DependencyGraph().build_dependency(
                new, example_inputs=example_inputs, forward_fn=lambda m, x: _call(m, x),
                output_transform=lambda out: [t for t in _tensors(out) if t.grad_fn is not None], verbose=False)
    except Exception as e:
        raise ValueError(f"torch-pruning could not trace the model on example_inputs ({type(e).__name__}: {e})") from e
    finally:
        for h in hooks:
            h.remove()

    done, cache = set(), {}
    for name, layer in layers:
        if layer in done or id(layer) in in_attention:
            continue
        zu = zero_units(layer.weight)
        if not len(zu):
            continue
        if name in excluded:
            stats[name].left["excluded"] += len(zu)
            continue
        if layer not in DG.module2node:
            stats[name].left["not reached by example_inputs (not in the traced graph)"] += len(zu)
            continue
        done |= _shrink_group(DG, tp, layer, new, example_inputs, names, stats, excluded_mods, report, cache)

    for n, m in rows:
        stats[n].kept = unit_view(m).shape[0]
        if not isinstance(m, LAYER_TYPES) and id(m) not in in_mlp and stats[n].zero_units:
            leaf = n.rpartition(".")[2]
            stats[n].left[_CONV1D_LEFT.get(leaf) if _is_conv1d(m) and leaf in _CONV1D_LEFT else
                          f"a {type(m).__name__}: shrink_model removes units of nn.Linear, nn.ConvNd and GPT-2 "
                          "MLP's c_fc"] += stats[n].zero_units
    for _, layer, tdm in targeted_dropout_modules(new):  # the copy keeps targeted dropout: new shapes
        v = unit_view(layer)
        tdm._attach(v.shape[0], _fan_in(v))
        _relayout(layer, tdm.layer_type, units_first=True)
    report.params_after = _count(new)
    for m, t in training.items():
        m.training = t
    if verify:
        was = {m: m.training for m in new.modules()}
        new.eval()
        try:
            out = _run(new, example_inputs)
        except ValueError as e:  # the inputs ran before: this is ours
            raise RuntimeError(f"shrink_model: the shrunk model fails on example_inputs ({e.__cause__!r}); "
                               "this is a bug, please report it") from e
        for m, t in was.items():
            m.training = t
        report.max_abs_diff = max(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
                                  for a, b in zip(out, reference))
        report.output_scale = max(float(b.double().abs().max()) if b.numel() else 0.0 for b in reference)
    return new, report
