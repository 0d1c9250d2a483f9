"""The paper's second-order analysis (section 3.1, eq. 3; section 5.1, Table 1 and Figure 1).

Deleting the weights that pruning removes moves the parameters by ``-d`` (``d_i = θ_i`` for a
removed weight, 0 otherwise); the change in loss is, to second order (LeCun et al.'s optimal
brain damage),

    ΔE = E(θ - d) - E(θ) = -∇Eᵀd + ½ dᵀHd + O(‖d‖³)

:func:`delta_e` returns both terms, their sum and the actual change (the loss of the pruned
parameters, evaluated), where ``d`` is exactly what :func:`td.prune_model` would remove from the
same model with the same ``mode`` / ``rate`` / ``exclude`` (its masks, from the same code).
:func:`hessian_weight_matrix` forms ``θ_i H_ij θ_j`` over the targeted weights, ordered so the
weights pruning keeps come first (the paper's Figure 1): the entries among the removed weights
sum to ``dᵀHd``.

E is the mean loss over every sample of ``data`` (an iterable of ``(inputs, targets)`` batches,
``loss_fn(model(inputs), targets)`` a batch mean, so batch ``b`` of ``n_b = len(targets)``
samples weighs ``n_b / N``), with the model in eval mode (dropout, targeted dropout and batch norm
deterministic; its mode is restored after). Derivatives are exact, in the model's dtype (convert
model and data with ``.double()`` for float64): ``dᵀHd`` from one Hessian-vector product per
batch by double backward (reverse over reverse), never from finite differences, so it costs a
few backward passes and scales to any model autograd can differentiate twice. Reverse over
reverse rather than ``torch.func``'s forward over reverse (``jvp`` of ``grad``): it was faster for
every model measured on the CPU (docs/analysis/hvp_cost.txt). Fused attention kernels have
neither forward-mode nor second derivatives, so either way needs ``scaled_dot_product_attention``'s
math path, which the analysis selects while it runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._params import _check_rate
from ..training.nn import LAST_LINEAR, _check_mode, _check_model, _check_nm_args, _nothing_to, _select, \
    layer_type, prunable_layers
from ..training.pruning import TargetedPruning, _check_prune_rate

__all__ = ["DeltaE", "delta_e", "hessian_weight_matrix", "MAX_HESSIAN_WEIGHTS"]

# hessian_weight_matrix's default limit on the targeted weights P: the P x P Hessian then takes
# at most 512 MiB in float64 (the paper's digits-sized network has 640)
MAX_HESSIAN_WEIGHTS = 8192
_ROWS_PER_PASS = 256  # Hessian rows formed per batched double backward (bounds its memory)


@dataclass(frozen=True)
class DeltaE:
    """What :func:`delta_e` found. Losses are means over ``samples`` samples."""
    gradient_term: float  # -∇Eᵀd
    hessian_term: float   # ½ dᵀHd
    loss: float           # E(θ)
    pruned_loss: float    # E(θ - d)
    samples: int
    removed: dict = field(repr=False)  # parameter name -> bool tensor: True where d_i = θ_i (scaled)

    @property
    def estimate(self) -> float:
        """|ΔE| to second order (eq. 3): ``|gradient_term + hessian_term|``."""
        return abs(self.gradient_term + self.hessian_term)

    @property
    def change(self) -> float:
        """``E(θ - d) - E(θ)``, signed."""
        return self.pruned_loss - self.loss

    @property
    def actual(self) -> float:
        """``|E(θ - d) - E(θ)|``: the change in loss the pruning really causes."""
        return abs(self.change)

    @property
    def remainder(self) -> float:
        """``change - (gradient_term + hessian_term)``: the O(‖d‖³) the expansion leaves out."""
        return self.change - (self.gradient_term + self.hessian_term)

    @property
    def removed_weights(self) -> int:
        return sum(int(r.sum()) for r in self.removed.values())

    @property
    def targeted_weights(self) -> int:
        return sum(r.numel() for r in self.removed.values())

    def __str__(self) -> str:
        return (f"ΔE over {self.samples} samples, {self.removed_weights}/{self.targeted_weights} targeted weights "
                f"removed: estimate {self.estimate:.6g} (gradient term {self.gradient_term:+.6g}, Hessian term "
                f"{self.hessian_term:+.6g}), actual {self.actual:.6g} (loss {self.loss:.6g} -> {self.pruned_loss:.6g})")


# ---- what is targeted, and what pruning removes --------------------------------------------
def _removed(model: nn.Module, what: str, rate, mode: str, exclude, n, m, backend) -> dict:
    """{parameter name: bool mask of the weights ``td.prune_model(model, rate, mode, exclude, n=n,
    m=m)`` would set to zero}, in ``named_parameters()`` order: the same layer choice
    (``prunable_layers`` and ``_select``: tied weights and, for N:M, fan-ins ``m`` does not divide
    are skipped with a warning) and the same masks (:class:`TargetedPruning`)."""
    _check_model(model)
    _check_mode(mode)
    n, m = _check_nm_args(mode, n, m)
    rate = _check_prune_rate(mode, rate)
    layers = _select(model, prunable_layers(model, exclude), what, m=m)
    if not layers:
        raise _nothing_to(what, model, exclude)
    names = {id(p): name for name, p in model.named_parameters()}
    found = {}
    for layer_name, layer in layers:
        entry = layer_type(layer)
        p = layer._parameters.get(entry.param)
        if not isinstance(p, nn.Parameter) or id(p) not in names:
            raise ValueError(f"{what}: layer {layer_name!r}'s {entry.param} is not a plain Parameter of the model "
                             "(torch.nn.utils.prune / parametrize reparametrization?): make it permanent first, e.g. "
                             "torch.nn.utils.prune.remove or parametrize.remove_parametrizations")
        keep = TargetedPruning(rate, mode, backend, n=n, m=m, unit_dim=entry.unit_dim).compute_mask(
            p, torch.ones_like(p, dtype=torch.bool))
        found[names[id(p)]] = ~keep.bool()
    order = {name: i for i, name in enumerate(names.values())}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


# ---- the data --------------------------------------------------------------------------------
def _batches(data: Iterable, what: str):
    """``(inputs, targets, n)`` per batch of ``data``; ValueError if it yields none."""
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"{what}: data must be an iterable of (inputs, targets) batches, got "
                        f"{type(data).__name__}") from None
    seen = 0
    for batch in it:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"{what}: each batch of data must be an (inputs, targets) pair, got {type(batch).__name__}"
                            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        inputs, targets = batch
        try:
            n = len(targets)  # the batch's samples: its weight in E
        except TypeError:
            raise TypeError(f"{what}: the targets of each batch must have a length (one per sample), got "
                            f"{type(targets).__name__}") from None
        if n == 0:
            raise ValueError(f"{what}: data yielded a batch with no samples (batch {seen})")
        seen += 1
        yield inputs, targets, n
    if not seen:
        raise ValueError(f"{what}: data yielded no batches; E is the mean loss over data's samples, so it needs some")


def _batch_loss(model, loss_fn, params: dict, inputs, targets, what: str) -> Tensor:
    loss = loss_fn(functional_call(model, params, (inputs,)), targets)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"{what}: loss_fn must return the batch's mean loss as a one-element tensor, got "
                         f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else ' of shape ' + str(tuple(loss.shape))}")
    return loss.reshape(())


class _Analysis:
    """Eval mode and the math attention path while the derivatives are taken; the model's
    parameters as tensors that need no grad (only the targeted ones get it, per batch)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.model.eval()
        # fused scaled_dot_product_attention kernels have no second derivative; the math path does
        self.sdpa = sdpa_kernel(SDPBackend.MATH)
        self.sdpa.__enter__()
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def __exit__(self, *exc):
        self.sdpa.__exit__(*exc)
        self.model.train(self.training)


def _no_second_derivative(e: Exception, what: str) -> None:
    """Raise a clear NotImplementedError if ``e`` says an op has no (second) derivative."""
    text = str(e)
    if "derivative for" in text and "not implemented" in text:
        raise NotImplementedError(f"{what} takes second derivatives of the model, and an op in its forward has none "
                                  f"({text.splitlines()[0]}); replace that op by plain ones (fused kernels usually "
                                  "have a plain-op equivalent)") from e


def _grad_and_hvp(loss: Tensor, targeted: list, vectors: list) -> tuple:
    """(∇E, and H·v for v in ``vectors``: each a list shaped like ``targeted``) by double
    backward; a weight the loss does not reach gets zeros."""
    g = torch.autograd.grad(loss, targeted, create_graph=True, allow_unused=True, materialize_grads=True)
    out = []
    for v in vectors:
        gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
        out.append(torch.autograd.grad(gv, targeted, retain_graph=True, allow_unused=True, materialize_grads=True)
                   if gv.requires_grad else [torch.zeros_like(t) for t in targeted])  # E linear in θ
    return [gi.detach() for gi in g], out


# ---- ΔE --------------------------------------------------------------------------------------
def delta_e(model: nn.Module, loss_fn: Callable, data: Iterable, *, rate: Optional[float] = None,
            mode: str = "weight", exclude=LAST_LINEAR, n: Optional[int] = None, m: Optional[int] = None,
            backend: str = "auto", scale: float = 1.0) -> DeltaE:
    """The change in the mean loss over ``data`` from pruning ``model`` (paper eq. 3): the
    gradient term ``-∇Eᵀd``, the Hessian term ``½ dᵀHd``, their sum as ``estimate`` and the
    evaluated change as ``actual`` (:class:`DeltaE`; the model is not changed).

    ``d`` is what ``td.prune_model(model, rate, mode, exclude, n=n, m=m)`` would set to zero
    (``mode="weight"``: the ``rate`` smallest weights of every unit; ``"unit"``: the ``rate``
    weakest units; ``"nm"``: all but the ``n`` largest of every ``m``, no rate), times
    ``scale`` (1: the pruning itself; smaller: a step towards it, where the expansion's
    remainder shrinks as ``scale³``). One pass over ``data``: per batch a forward, a backward
    and one Hessian-vector product (a second backward), and a forward of the pruned
    parameters. See the module docstring for E, eval mode and dtypes."""
    what = "delta_e"
    removed = _removed(model, what, rate, mode, exclude, n, m, backend)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    total = {"grad": 0.0, "hess": 0.0, "loss": 0.0, "pruned": 0.0}
    samples = 0
    with _Analysis(model) as params:
        d = {name: torch.where(r, params[name], 0) * scale for name, r in removed.items()}
        pruned = {**params, **{name: params[name] - d[name] for name in d}}
        for inputs, targets, nb in _batches(data, what):
            targeted = {name: params[name].detach().requires_grad_() for name in d}
            try:
                with torch.enable_grad():
                    loss = _batch_loss(model, loss_fn, {**params, **targeted}, inputs, targets, what)
                    g, (hd,) = _grad_and_hvp(loss, list(targeted.values()), [list(d.values())])
            except (RuntimeError, NotImplementedError) as e:
                _no_second_derivative(e, what)
                raise
            with torch.no_grad():
                dv = list(d.values())
                total["grad"] -= nb * float(sum((gi * di).sum() for gi, di in zip(g, dv)))
                total["hess"] += nb * 0.5 * float(sum((hi * di).sum() for hi, di in zip(hd, dv)))
                total["loss"] += nb * float(loss)
                total["pruned"] += nb * float(_batch_loss(model, loss_fn, pruned, inputs, targets, what))
            samples += nb
    return DeltaE(total["grad"] / samples, total["hess"] / samples, total["loss"] / samples,
                  total["pruned"] / samples, samples, removed)


# ---- the Hessian-weight matrix ---------------------------------------------------------------
def hessian_weight_matrix(model: nn.Module, loss_fn: Callable, data: Iterable, *, important: Optional[float] = 0.25,
                          mode: str = "weight", exclude=LAST_LINEAR, n: Optional[int] = None,
                          m: Optional[int] = None, backend: str = "auto",
                          max_weights: int = MAX_HESSIAN_WEIGHTS) -> tuple[Tensor, Tensor]:
    """``(M, order)``: ``M[i, j] = θ_a H_ab θ_b`` with ``a = order[i]``, ``b = order[j]`` indexing
    the targeted weights flattened and concatenated in ``named_parameters()`` order, H the
    Hessian of the mean loss over ``data`` (the paper's Figure 1).

    ``order`` puts first the weights pruning at rate ``1 - important`` keeps (``mode="weight"``:
    the ``important`` fraction of largest-magnitude weights of every unit, eq. 2; ``"unit"``:
    of units; ``"nm"``: the ``n`` of every ``m``, with ``important=None``), each group by
    decreasing ``|θ|``; the entries among the rest sum to ``dᵀHd`` of
    ``delta_e(model, ..., rate=1 - important)``. It forms the full P x P Hessian of the P
    targeted weights (P Hessian-vector products per batch), so it refuses P above
    ``max_weights``; :func:`delta_e` needs one product per batch and scales to any model."""
    what = "hessian_weight_matrix"
    if mode == "nm":
        if important is not None:
            raise ValueError("important has no meaning for mode='nm' (every group of m keeps its n largest weights); "
                             f"pass important=None, got important={important!r}")
        rate = None
    else:
        rate = 1.0 - _check_rate("important", important)
    if isinstance(max_weights, bool) or not isinstance(max_weights, int) or max_weights < 1:
        raise TypeError(f"max_weights must be an int >= 1, got {max_weights!r}")
    removed = _removed(model, what, rate, mode, exclude, n, m, backend)
    P = sum(r.numel() for r in removed.values())
    if P > max_weights:
        dtype = next(model.parameters()).dtype
        gib = P * P * dtype.itemsize / 2**30
        raise ValueError(f"{what} forms the full Hessian of the {P} targeted weights ({P} x {P} {dtype} = {gib:.3g} GiB, "
                         f"{P} Hessian-vector products per batch), above max_weights={max_weights}; use td.delta_e, "
                         "which needs one Hessian-vector product per batch, or target fewer layers (exclude=...) or "
                         "raise max_weights")
    H = None
    samples = 0
    with _Analysis(model) as params:
        theta = torch.cat([params[name].reshape(-1) for name in removed])
        basis = torch.eye(P, dtype=theta.dtype, device=theta.device)
        for inputs, targets, nb in _batches(data, what):
            targeted = {name: params[name].detach().requires_grad_() for name in removed}
            rows = []
            try:
                with torch.enable_grad():
                    loss = _batch_loss(model, loss_fn, {**params, **targeted}, inputs, targets, what)
                    g = torch.autograd.grad(loss, list(targeted.values()), create_graph=True, allow_unused=True,
                                            materialize_grads=True)
                    g = torch.cat([gi.reshape(-1) for gi in g])
                    for start in range(0, P, _ROWS_PER_PASS):
                        e = basis[start:start + _ROWS_PER_PASS]
                        if not g.requires_grad:  # E linear in θ: H = 0
                            rows.append(torch.zeros_like(e))
                            continue
                        # H e_i for a block of unit vectors in one batched (vmapped) backward
                        hv = torch.autograd.grad(g, list(targeted.values()), e, retain_graph=True,
                                                 is_grads_batched=True, allow_unused=True, materialize_grads=True)
                        rows.append(torch.cat([h.reshape(len(e), -1) for h in hv], dim=1))
            except (RuntimeError, NotImplementedError) as e:
                _no_second_derivative(e, what)
                raise
            Hb = torch.cat(rows).detach()
            H = Hb * nb if H is None else H.add_(Hb, alpha=nb)
            samples += nb
    H /= samples
    kept = ~torch.cat([r.reshape(-1) for r in removed.values()])
    mag = theta.abs()
    # kept weights first, then the rest; each by decreasing magnitude (stable: ties keep index order)
    by_mag = torch.sort(mag, descending=True, stable=True).indices
    order = torch.cat([by_mag[kept[by_mag]], by_mag[~kept[by_mag]]])
    M = theta[:, None] * H * theta[None, :]
    return M[order][:, order], order
