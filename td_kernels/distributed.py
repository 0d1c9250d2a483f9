"""Sharded weights (SPEC section 12): the public functions on a DTensor weight.

``td_kernels.api`` checks the arguments and hands a DTensor ``w`` to :func:`sharded_targeting`.
Each rank then runs the same ops as a single process (``td_kernels.ops``), on its own shard,
with a *window* into the global weight: rows ``r0..`` and fan-in columns ``c0..`` of the global
``[U, F]`` view sit at Philox stream positions ``(r0 + u) * F + c0 + j``. What a shard cannot
know alone travels in small collectives over the mesh dimensions that split it; the weight is
never gathered:

* weight targeting, a row split across ranks (``Shard(1)``): the row's threshold key, by a
  radix select whose per-digit histograms (int32 ``[U_local, 256]``, one per 8-bit round:
  4 rounds for float32/float64 keys, 3 for float16, 2 for bfloat16, whose low key bits are
  always 0) are summed over the fan-in shards; the op then runs with those limits
  (``limit=``, no local selection). Rows not split: nothing is exchanged.
* unit targeting: float64 partial sums of squares, placed in a ``[U]`` vector at the shard's
  rows and summed over every sharded mesh dimension (one all_reduce of ``U`` float64 per
  such dimension); every rank then selects over all U norms and keeps its own rows.
* N:M targeting: groups never straddle shards (checked), so nothing is exchanged.
* ``seed=None``: every rank draws from its own default generator (as a single process would,
  so generators advance alike), then the draw of the mesh's first rank (coordinate 0 on every
  mesh dimension) is broadcast: one int64 broadcast per mesh dimension of size > 1.

Autograd: ``to_local`` -> op -> ``DTensor.from_local``; the backward runs on the shards.
Placements served: ``Shard(0)``, ``Shard(1)`` (a contiguous block of the flattened fan-in, conv
weights included), ``Replicate()``, on any number of mesh dimensions, uneven shards included.
Anything else (``Shard(d >= 2)``, ``Partial``, ``_StridedShard``, a non-default shard order)
gets a ``ValueError`` naming it.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from . import ops
from ._registry import resolve
from ._params import _seed_tensor, nm_params, unit_params, weight_params
from .reference import KEY_MAX, count, drop_threshold, norms_from_sumsq, rank_keys, unit_keep_from_norms, unit_sumsq

__all__ = ["sharded_targeting"]

SERVED = "Shard(0) (units), Shard(1) (fan-in) and Replicate()"
# Rank keys of 16-bit floats are float32 bit patterns whose low bits are always 0 (bfloat16: 16
# bits, float16: 13, subnormals included), so the radix select skips the rounds that read them.
_ZERO_LOW_KEY_BITS = {torch.bfloat16: 16, torch.float16: 13}


class _Layout(NamedTuple):
    """Where this rank's shard sits in the global ``[U, F]`` view of ``w``."""
    U: int            # global units (rows)
    F: int            # global fan-in
    r0: int           # first global row of the shard
    c0: int           # first global fan-in column of the shard (conv: in_offset * prod(kernel))
    row_groups: list  # process groups of the mesh dims that split the rows (size > 1)
    fan_groups: list  # ... that split the fan-in

    @property
    def window(self):
        return (self.r0 * self.F + self.c0, self.F)


def _placement_error(w, mesh_dim: int, p) -> ValueError:
    shape = tuple(w.shape)
    if isinstance(p, Partial):
        why = ("the shards hold unreduced partial values, not the weight: redistribute it to Shard or "
               "Replicate first")
    elif type(p) is Shard:  # of a kernel dimension
        why = (f"it splits dim {p.dim} of w (shape {shape}): each unit's fan-in would be cut into strided "
               "pieces, which no window describes")
    elif "Strided" in type(p).__name__:
        why = "strided shards are not contiguous blocks of w"
    else:
        why = "td_kernels does not know this placement"
    return ValueError(f"td_kernels cannot serve a DTensor weight placed as {p!r} on mesh dim {mesh_dim}: {why}. "
                      f"Supported placements: {SERVED}; got placements {tuple(w.placements)}")


def _check_placements(w) -> None:
    for i, p in enumerate(w.placements):
        if not (isinstance(p, Replicate) or (type(p) is Shard and p.dim in (0, 1))):
            raise _placement_error(w, i, p)
    # a tensor dim split by several mesh dims in a non-default order is not a left-to-right split
    spec = w._spec
    order = getattr(spec, "shard_order", None)
    if order is not None and order != type(spec).compute_default_shard_order(spec.placements):
        raise ValueError(f"td_kernels cannot serve a DTensor weight with shard order {order}: only the default "
                         f"left-to-right order of placements {tuple(w.placements)} is supported")


def _groups(mesh, dims) -> list:
    return [mesh.get_group(d) for d in dims if mesh.size(d) > 1]


def _layout(w, coordinate) -> _Layout:
    shape = tuple(w.shape)
    inner = math.prod(shape[2:])
    _local_shape, offset = _compute_local_shape_and_global_offset(shape, w.device_mesh.shape, coordinate,
                                                                 w.placements)
    mesh, placements = w.device_mesh, w.placements
    row_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    fan_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 1]
    return _Layout(shape[0], math.prod(shape[1:]), offset[0], offset[1] * inner, _groups(mesh, row_dims),
                   _groups(mesh, fan_dims))


def _agreed_seed(seed, mesh, device) -> int:
    """SPEC section 12: one seed on every rank. An explicit seed is trusted (no collective);
    None draws on every rank, then the draw at mesh coordinate 0 is broadcast."""
    s = _seed_tensor(seed)
    if seed is not None or device.type == "meta":
        return int(s)
    t = s.reshape(1).to(device)
    for d in range(mesh.ndim):
        if mesh.size(d) > 1:  # after dim d, every rank holds the value of coordinate 0 on dims <= d
            dist.broadcast(t, group=mesh.get_group(d), group_src=0)
    return int(t.item())


def _radix_limits(w2d, k: int, F: int, groups) -> torch.Tensor:
    """int32 ``limit[u] = t_u - 1``, ``t_u`` the key at 0-based position ``k`` of global row u,
    whose keys are spread over the shards of ``groups`` (0 < k < F).

    Radix select, most significant 8 bits first: per round every shard counts, per row, its
    still-matching keys by digit; the counts are summed over the shards; the digit holding
    position ``rem`` (what is left of k) extends the prefix, and only keys with that digit stay.
    Every rank of a group sees the same sums, so all find the same threshold."""
    U, f = w2d.shape
    dev = w2d.device
    key = rank_keys(w2d).to(torch.int32).reshape(-1)  # keys < 2**31; int32 halves the temporaries
    row = torch.arange(U, dtype=torch.int32 if U * 256 < 2**31 else torch.int64, device=dev).repeat_interleave(f)
    hist_dtype = torch.int32 if F < 2**31 else torch.int64
    prefix = torch.zeros(U, dtype=torch.int64, device=dev)
    rem = torch.full((U,), k, dtype=torch.int64, device=dev)
    shifts = [s for s in (24, 16, 8, 0) if s + 8 > _ZERO_LOW_KEY_BITS.get(w2d.dtype, 0)]
    for shift in shifts:
        digit = (key >> shift) & 255
        hist = torch.bincount(row * 256 + digit, minlength=U * 256).view(U, 256).to(hist_dtype)
        for g in groups:
            dist.all_reduce(hist, group=g)
        below = hist.to(torch.int64).cumsum(1)               # keys with a digit <= d
        d = (below <= rem[:, None]).sum(1)                    # first digit whose count passes rem
        rem -= torch.where(d > 0, below.gather(1, (d - 1).clamp(min=0)[:, None]).squeeze(1), 0)
        prefix = prefix * 256 + d
        stay = digit == d[row]
        key, row = key[stay], row[stay]
    return ((prefix << shifts[-1]) - 1).to(torch.int32)


def _weight(local, lay: _Layout, seed, drop_rate, targ_rate, backend, mask):
    params = weight_params(seed, drop_rate, targ_rate, lay.F, lay.window)
    limit = None
    if lay.fan_groups:  # split rows: the limits are the global rows', never the shard's own selection
        k, u = int(count(targ_rate, lay.F)), local.shape[0]
        if 0 < k < lay.F and u and local.device.type != "meta":
            limit = _radix_limits(local.detach().reshape(u, -1), k, lay.F, lay.fan_groups)
        else:  # k == 0: no candidate; k == F: all (registry convention); meta: values unused
            limit = torch.full((u,), -1 if k == 0 else KEY_MAX, dtype=torch.int32, device=local.device)
    return ops.weight_dropout(local, params, backend, mask, limit)[0]


def _unit(local, lay: _Layout, seed, drop_rate, targ_rate, backend):
    if not lay.row_groups and not lay.fan_groups:  # the whole weight on this rank: the local op
        return ops.unit_dropout(local, unit_params(seed, drop_rate, targ_rate, lay.U), backend)[0]
    u = local.shape[0]
    if local.device.type == "meta":
        keep = torch.ones(u, dtype=torch.bool, device=local.device)
    else:
        sumsq = torch.zeros(lay.U, dtype=torch.float64, device=local.device)
        if u:
            sumsq[lay.r0:lay.r0 + u] = unit_sumsq(local.detach().reshape(u, -1))
        for g in lay.fan_groups + lay.row_groups:  # partial sums over the fan-in, then the other rows (+0: exact)
            dist.all_reduce(sumsq, group=g)
        norms = norms_from_sumsq(sumsq, local.dtype)
        keep = unit_keep_from_norms(norms, seed, int(count(targ_rate, lay.U)), int(drop_threshold(drop_rate)))
        keep = keep[lay.r0:lay.r0 + u]
    # differentiable: the gradient is where(keep, grad, +0.0), SPEC section 7
    return torch.where(keep.view(-1, *[1] * (local.ndim - 1)), local, torch.zeros((), dtype=local.dtype,
                                                                                   device=local.device))


def _check_nm_alignment(w, lay: _Layout, m: int) -> None:
    """Every fan-in shard must start and end on a group boundary. Checked over all shards (not only
    this rank's), so that every rank raises the same error."""
    mesh, placements = w.device_mesh, w.placements
    fan_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 1]
    if not fan_dims:
        return
    inner = math.prod(w.shape[2:])
    coords = [[0] * mesh.ndim]
    for d in fan_dims:
        coords = [c[:d] + [i] + c[d + 1:] for c in coords for i in range(mesh.size(d))]
    for c in coords:
        shape, offset = _compute_local_shape_and_global_offset(tuple(w.shape), mesh.shape, c, placements)
        cols, c0 = shape[1] * inner, offset[1] * inner
        if cols and (c0 % m or cols % m):
            names = ", ".join(repr(placements[d]) for d in fan_dims)
            raise ValueError(
                f"N:M targeting with m={m} cannot serve a DTensor weight placed as {names} (mesh dims {fan_dims}) "
                f"of shape {tuple(w.shape)}: the shard at mesh coordinate {tuple(c)} holds fan-in columns "
                f"[{c0}, {c0 + cols}) of {lay.F}, which cut a group of m consecutive weights; shard the fan-in so "
                f"that every shard's columns are a multiple of m, or use Shard(0)/Replicate()")


@torch.compiler.disable  # eager under torch.compile: host-side layout, c10d collectives (see the notes)
def sharded_targeting(kind: str, w, *, drop_rate, targ_rate=None, n=None, m=None, seed=None, backend="auto",
                      mask=None):
    """``kind`` ("weight", "unit", "nm") targeting of the DTensor ``w`` (arguments already checked
    by ``td_kernels.api``): a DTensor on the same mesh with the same placements, global shape and
    contiguous global strides, whose ``full_tensor()`` equals the function on ``w.full_tensor()``."""
    if kind not in ("weight", "unit", "nm"):
        raise ValueError(f"kind must be 'weight', 'unit' or 'nm', got {kind!r}")
    _check_placements(w)
    mesh = w.device_mesh
    local = w.to_local()
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank holds no shard: it takes part in nothing, as DTensor ops do
        out = local.clone()
    else:
        if local.device.type != "meta":  # fail alike on every rank, before any collective
            resolve(backend, local.device, local.dtype)
        lay = _layout(w, coordinate)
        if kind == "nm":
            _check_nm_alignment(w, lay, m)
        s = _agreed_seed(seed, mesh, local.device)
        if kind == "weight":
            out = _weight(local, lay, s, drop_rate, targ_rate, backend, mask)
        elif kind == "unit":
            out = _unit(local, lay, s, drop_rate, targ_rate, backend)
        else:
            out = ops.nm_dropout(local, nm_params(s, drop_rate, lay.F, lay.window), n, m, backend, mask)[0]
    stride = torch.empty(w.shape, device="meta").stride()  # the ops' outputs are contiguous
    return DTensor.from_local(out, mesh, w.placements, run_check=False, shape=w.shape, stride=stride)
