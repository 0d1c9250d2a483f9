"""Training integration: targeted dropout inside a layer's forward, with plain checkpoints.

``apply_targeted_dropout(model, drop_rate, targ_rate)`` keeps every layer's class and its
parameters as they are. To each targeted layer it adds one submodule, ``layer.targeted_dropout``
(a :class:`TargetedDropout` holding the settings: no parameters, no buffers), and replaces the
layer's ``forward`` on that instance by one shared function: it computes the targeted weight
(SPEC sections 4-7) in training mode and calls the layer type's "forward with this weight"
(``F.linear`` for ``nn.Linear``, ``_conv_forward`` for ``nn.ConvNd``, ``addmm`` for transformers'
``Conv1D``). So ``model.state_dict()`` has exactly the plain model's keys, a plain checkpoint
loads strictly into a targeted model and back, the gradient reaches ``layer.weight`` masked as
in the forward, and ``torch.compile`` sees one function for every layer of a type (no class per
module, no recompile per layer). ``remove_targeted_dropout(model)`` restores the plain layers.

Which layers and which dimension holds their units is a small registry (:func:`register_layer`):
``nn.Linear`` and ``nn.Conv1d/2d/3d`` (units = rows of the weight) and transformers' ``Conv1D``
(weight ``[in, out]``: units along dim 1, recognised by name so transformers is never imported
here). The SPEC's rows are the units: the targeted view of a weight is ``w.movedim(unit_dim, 0)``.
A layer whose units are not dim 0 gets its parameter's storage re-laid once, at apply time, so
that this view is contiguous (same Parameter object, shape and state_dict): no per-step copy.

Random stream: each TargetedDropout draws one base seed ``b`` in ``[0, 2**62)`` from torch's
default CPU generator when it is created (``apply_targeted_dropout`` creates them in
``named_modules()`` order), and counts its training forwards in ``c``: forward number ``c`` uses
seed ``b + c``. After ``torch.manual_seed(s)`` then ``apply_targeted_dropout`` every process draws
the same masks at every step, whatever else it draws from the default generator, with no
collective; ``get_rng_state`` / ``set_rng_state`` save and restore ``(b, c)`` for exact resume.
``b + c`` lives in an int64 CPU tensor held as a plain attribute (not a buffer: ``.to()`` leaves
it on the CPU and ``state_dict()`` does not see it), beside the op's other params; a compiled
model reads the seed and advances ``c`` in one op, so a new step is new data, never a
recompile. :func:`reseed` draws new base seeds (a deep copy keeps its source's).

Re-run forwards: activation checkpointing runs a forward again during the backward to rebuild
its activations, and that run must draw the mask of the forward it rebuilds, whatever the number
and order of forwards and backwards in between. ``torch.utils.checkpoint`` saves torch's default
CPU generator before the forward and restores it for the re-run (``preserve_rng_state``, the
default). So a forward that checkpoint may re-run (under its saved-tensor hooks, or with grad
disabled: the reentrant variant's forward) draws one key from that generator and records its
params under it; a forward during a backward draws the key again, from the restored generator,
and takes the params recorded under it, advancing nothing. The last ``RECOMPUTE_WINDOW`` such
forwards per layer are kept; a re-run that matches none of them, or two forwards recorded under
one key, raise instead of drawing some other mask. Under torch.compile the params come from one
opaque op (``td_kernels::next_params``), so inductor never rebuilds them from the advanced
counter and an eager checkpoint of a compiled module re-runs the same bookkeeping.

Unit mode can act on the layer's *output* instead (``apply_to="output"``): the same forward
replaces the output channels of dropped units by the bias, ``out = where(keep, x W^T + b, b)``,
which equals ``x (W * keep)^T + b`` (a dropped unit keeps its bias: the paper prunes weights,
not biases, section 2.1) without ever writing a masked copy of W.
"""
from __future__ import annotations

import collections
import numbers
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import traceback as fx_traceback
from torch.utils.checkpoint import CheckpointPolicy

from .. import api, ops, reference
from .._params import _check_rate, _fan_in, _is_dtensor, _seed_tensor, capturing
from .._registry import check_name

__all__ = ["TargetedDropout", "apply_targeted_dropout", "remove_targeted_dropout", "targeted_dropout_modules",
           "prunable_layers", "register_layer", "layer_type", "unit_view", "LayerType", "get_rng_state",
           "set_rng_state", "reseed", "LAST_LINEAR", "RECOMPUTE_WINDOW"]

MODES = ("weight", "unit", "nm")
# A layer's seed b + c (module docstring) lives on the host and advances in Python: a CUDA graph
# captured around a training forward would replay the mask of seed b + c at every replay. So a
# training forward during CUDA graph capture raises. (The graph-safe design, for when it has run
# on a GPU: keep c in a CUDA int64 tensor advanced by a captured in-place add, pass b + c to the
# ops as their device seed, and read c back in get_rng_state; see docs/training.md.)
MODULE_CAPTURE_ERROR = (
    "td_kernels: a TargetedDropout layer in training mode cannot run during CUDA graph capture: its per-layer "
    "seed b + c advances on the host, so every replay would repeat the captured mask. Capture the model in eval "
    "mode, or train it without capturing a CUDA graph around it.")
# the default for `exclude`: the model's output head, i.e. the last layer (in named_modules
# order) whose parameter is a matrix (nn.Linear, transformers' Conv1D, ...), which the paper
# neither regularises nor prunes (section 5: "all weight matrices except those leading to the
# logits"); convolutions (3-D and up) are never taken for it
LAST_LINEAR = "last_linear"
ATTR = "targeted_dropout"  # the submodule holding a targeted layer's settings
SEED_BASE_LIMIT = 2**62    # b + c stays below the SPEC's 2**63 for 2**62 forwards
RECOMPUTE_WINDOW = 256     # per layer: the re-runnable forwards whose re-run can still be matched


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be 'weight', 'unit' or 'nm', got {mode!r}")
    return mode


def _check_nm_args(mode: str, n, m) -> tuple:
    """``(n, m)`` for mode "nm" (default 2:4), ``(None, None)`` otherwise."""
    if mode != "nm":
        if n is not None or m is not None:
            raise ValueError(f"n and m set the N:M pattern of mode='nm'; mode={mode!r} takes neither")
        return None, None
    return reference.check_nm(2 if n is None else n, 4 if m is None else m)


# ---- the layer registry ------------------------------------------------------------------
@dataclass(frozen=True)
class LayerType:
    """How td_kernels targets one layer type: its parameter ``param``, the dimension
    ``unit_dim`` of that parameter which indexes units, and ``forward(layer, weight, *args,
    **kwargs)``: the layer's forward computed with ``weight`` in place of the parameter (None:
    the class's own forward with the parameter swapped, see :func:`register_layer`)."""
    key: object  # the class, or "module.QualName" for a class recognised by name
    param: str = "weight"
    unit_dim: int = 0
    forward: Optional[Callable] = None


_LAYERS: dict = {}


def register_layer(cls, param: str = "weight", unit_dim: int = 0, forward: Optional[Callable] = None) -> LayerType:
    """Teach targeted dropout, pruning, schedules and the sparsity report a layer type.

    ``cls``: an ``nn.Module`` subclass, or its ``"module.QualName"`` (matched by name, so the
    library that defines it is never imported here). ``param``: the name of the weight
    parameter. ``unit_dim``: the dimension of that parameter that indexes units (output features
    or channels); every other dimension is fan-in. ``forward(layer, weight, *args, **kwargs)``
    returns what ``layer(*args, **kwargs)`` returns with ``weight`` (same shape as the
    parameter) in place of the parameter. Without it the class's own forward runs with the
    parameter temporarily swapped (``torch.nn.utils.stateless``): correct, but slower to trace
    under torch.compile. Subclasses match too, unless they override ``forward`` (then the
    swapped class forward is used). Registering a class again replaces its entry."""
    if isinstance(cls, str):
        if "." not in cls:
            raise ValueError(f"cls given by name must be 'module.QualName', got {cls!r}")
    elif not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass or its 'module.QualName', got {cls!r}")
    if not isinstance(param, str) or not param.isidentifier():
        raise TypeError(f"param must be the name of a parameter (a str), got {param!r}")
    if isinstance(unit_dim, bool) or not isinstance(unit_dim, numbers.Integral) or unit_dim < 0:
        raise TypeError(f"unit_dim must be an int >= 0, got {unit_dim!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable(layer, weight, *args, **kwargs) or None, got {forward!r}")
    entry = LayerType(cls, param, int(unit_dim), forward)
    _LAYERS[cls] = entry
    return entry


def _linear_forward(layer, w, x):
    return F.linear(x, w, layer.bias)


def _conv_forward(layer, w, x):
    return layer._conv_forward(x, w, layer.bias)


def _gpt2_conv1d_forward(layer, w, x):
    # transformers.pytorch_utils.Conv1D.forward with w ([in, out]) for its weight; w is the
    # transposed view of a contiguous [out, in] tensor, which addmm reads without a copy
    size_out = x.size()[:-1] + (layer.nf,)
    return torch.addmm(layer.bias, x.view(-1, x.size(-1)), w).view(size_out)


register_layer(nn.Linear, forward=_linear_forward)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_conv, forward=_conv_forward)
register_layer("transformers.pytorch_utils.Conv1D", unit_dim=1, forward=_gpt2_conv1d_forward)


def layer_type(module: nn.Module) -> Optional[LayerType]:
    """The registry entry that serves ``module`` (its class or the nearest registered base), or
    None. A subclass that overrides ``forward`` gets the entry without its forward function."""
    cls = type(module)
    for base in cls.__mro__:
        entry = _LAYERS.get(base) or _LAYERS.get(f"{base.__module__}.{base.__qualname__}")
        if entry is None:
            continue
        if base is not cls and entry.forward is not None and getattr(cls, "forward", None) is not base.forward:
            entry = LayerType(entry.key, entry.param, entry.unit_dim, None)
        return entry
    return None


def unit_view(layer: nn.Module) -> Tensor:
    """The layer's weight with its units first (``w.movedim(unit_dim, 0)``): the SPEC's rows."""
    entry = layer_type(layer)
    if entry is None:
        raise TypeError(f"{type(layer).__name__} is not a registered layer type; see td.register_layer")
    w = getattr(layer, entry.param)
    return w.movedim(entry.unit_dim, 0) if entry.unit_dim else w


def _forward_with(entry: LayerType, layer: nn.Module, w: Tensor, args, kwargs):
    if entry.forward is not None:
        return entry.forward(layer, w, *args, **kwargs)
    from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call uses

    with _reparametrize_module(layer, {entry.param: w}):
        return type(layer).forward(layer, *args, **kwargs)


# ---- the params of a forward, and of the forward a re-run rebuilds -------------------------------
def _draw_base(generator: Optional[torch.Generator]) -> int:
    """A base seed in ``[0, 2**62)``; device="cpu" even under a meta device context."""
    return int(torch.randint(0, SEED_BASE_LIMIT, (), dtype=torch.int64, device="cpu", generator=generator))


_FORWARDS: dict = {}  # id(a layer's state tensor) -> its recorded forwards, freed with the tensor


def _forwards_of(state: Tensor) -> collections.OrderedDict:
    """key -> [params, rebuilt]: the layer's last re-runnable forwards (params None: two
    forwards under one key). Kept beside the state tensor, not on it, so that copies, pickles
    and state dicts never carry it."""
    table = _FORWARDS.get(id(state))
    if table is None:
        table = _FORWARDS[id(state)] = collections.OrderedDict()
        weakref.finalize(state, _FORWARDS.pop, id(state), None)
    return table


def _under_saved_tensor_hooks() -> bool:
    # torch.utils.checkpoint(use_reentrant=False), and so checkpoint_sequential, selective
    # checkpointing and transformers, runs the forward under its saved-tensor hooks
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _may_be_rerun() -> bool:
    """Whether activation checkpointing may run this eager forward again: under its saved-tensor
    hooks (non-reentrant) or with grad disabled (the reentrant variant's forward)."""
    return not torch.is_grad_enabled() or _under_saved_tensor_hooks()


def _rerun_error(why: str) -> RuntimeError:
    return RuntimeError(
        f"a targeted dropout layer ran a training forward during a backward, {why}, so it cannot draw that "
        "forward's mask again. Activation checkpointing is exact when torch.utils.checkpoint restores torch's "
        "random state for the re-run (preserve_rng_state=True, the default) and each forward starts from its own "
        "random state. Not supported: preserve_rng_state=False; use_reentrant=True around a torch.compile'd "
        "module (use use_reentrant=False, or compile the module that calls checkpoint); a forward called from a "
        "backward hook; torch.manual_seed with one seed before several checkpointed forwards; more than "
        f"td_kernels.nn.RECOMPUTE_WINDOW={RECOMPUTE_WINDOW} checkpointed forwards of the layer between a forward "
        "and its re-run.")


def _params_of_this_forward(state: Tensor, inc: Tensor, may_be_rerun: bool) -> Tensor:
    """The params of this forward of the layer whose ``[b + c, *tail]`` is ``state``: a new
    forward takes ``state`` and advances it by ``inc`` (``c += 1``); a forward during a backward
    is a re-run and takes the params recorded for the forward it rebuilds."""
    in_backward = torch._C._current_graph_task_id() != -1
    if not (in_backward or may_be_rerun):  # the hot path: no bookkeeping
        params = state.clone()
        state.add_(inc)
        return params
    # the bookkeeping stays out of sight of dispatch modes: selective checkpointing matches the
    # re-run's ops to the forward's by count, and the two paths below run different ops
    with torch._C._DisableTorchDispatch():
        # one draw from the generator checkpoint saves before the forward and restores for the re-run
        key = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu"))
        forwards = _forwards_of(state)
        if in_backward:
            entry = forwards.get(key)
            if entry is None:
                raise _rerun_error("but matches none of its recorded forwards")
            if entry[0] is None:
                raise _rerun_error("and two of its forwards started from the same torch random state")
            entry[1] = True
            return entry[0].clone()
        params = state.clone()
        state.add_(inc)
        old = forwards.pop(key, None)
        # a key seen before: fine once that forward was rebuilt (torch.manual_seed(s) every step),
        # ambiguous while its re-run may still come
        forwards[key] = [params if old is None or old[1] else None, False]
        while len(forwards) > RECOMPUTE_WINDOW:
            forwards.popitem(last=False)
        return params


def _next_params_impl(state: Tensor, inc: Tensor) -> Tensor:
    """``td_kernels::next_params``: a compiled layer's params (:func:`_params_of_this_forward`).
    Opaque to inductor: as a clone and an in-place add of the counter, the partitioner rebuilt
    the params in the backward from the counter the forward had advanced (another mask); and at
    run time it is the one place that sees an eager checkpoint re-run the compiled module. A
    compiled forward runs with grad disabled, so only the saved-tensor hooks tell that checkpoint
    may re-run it."""
    return _params_of_this_forward(state, inc, _under_saved_tensor_hooks())


# defined with torch.library.Library rather than custom_op: ~5 us per call over the Python body
# where custom_op's wrappers cost ~60 us (2-core VM under load), once per targeted layer per step
_LIB = torch.library.Library("td_kernels", "FRAGMENT")
_LIB.define("next_params(Tensor(a!) state, Tensor inc) -> Tensor")
_LIB.impl("next_params", _next_params_impl, "CompositeExplicitAutograd")
_next_params_op = torch.ops.td_kernels.next_params.default


@torch.library.register_fake("td_kernels::next_params", lib=_LIB)
def _(state, inc):
    # traced (by AOTAutograd) inside a region that torch.compile checkpoints: every op there is
    # tagged for recomputation, and inductor would run this one again in the backward, from the
    # counter the forward advanced, with no way to tell which forward it rebuilds
    if fx_traceback.current_meta.get("recompute") in (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE):
        raise RuntimeError(
            "torch.compile of a model that runs a targeted dropout layer inside torch.utils.checkpoint (or "
            "transformers' gradient checkpointing) is not supported: the compiled backward would re-run the layer's "
            "seed counter and draw another mask. Use one of: checkpoint from eager code around compiled modules "
            "(checkpoint(torch.compile(block), x, use_reentrant=False)); torch.compile without checkpointing "
            "(inductor recomputes what is cheap by itself); eager checkpointing.")
    return torch.empty_like(state)


# ---- the settings module -----------------------------------------------------------------
class TargetedDropout(nn.Module):
    """Targeted dropout of one layer's weight: the settings and the random stream.

    ``forward(w)`` returns, in training mode, ``td.targeted_weight_dropout(w, drop_rate,
    targ_rate)`` (``mode="weight"``), ``td.targeted_unit_dropout(...)`` (``"unit"``) or
    ``td.targeted_nm_dropout(w, drop_rate, n=n, m=m)`` (``"nm"``, where ``targ_rate`` is None:
    each group of m weights has exactly m - n candidates) with units along ``unit_dim``, seeded
    ``b + c`` (then ``c += 1``, see the module docstring); ``w`` itself in eval mode. It has no
    parameters or buffers.

    Rates: ``drop_rate`` / ``targ_rate`` are the rates the next training forward uses. Assigning
    one by hand (``layer.targeted_dropout.drop_rate = 0.5``) takes effect at the next forward,
    never recompiles a compiled model, and also sets the layer's base rate
    (``base_drop_rate`` / ``base_targ_rate``): the rate the layer was given, which a schedule
    created later ramps to (like an LR scheduler's ``initial_lr``). A schedule changes only the
    current rates, so a second schedule, or one on a ``deepcopy`` of a scheduled model, still
    ramps to the rates the layer was given. A live schedule's next ``step()`` overwrites a rate
    set by hand, with a warning.
    """

    def __init__(self, drop_rate: float, targ_rate: Optional[float] = None, mode: str = "weight",
                 backend: str = "auto", *, n: Optional[int] = None, m: Optional[int] = None, unit_dim: int = 0,
                 mask: Optional[str] = None):
        """Targeted dropout settings for one layer (``apply_targeted_dropout`` makes one per layer).

        ``drop_rate`` (alpha) and ``targ_rate`` (gamma; None for ``mode="nm"``): the rates, also
        the base rates schedules ramp to. ``mode``: ``"weight"``, ``"unit"`` or ``"nm"`` (with
        ``n``:``m``, default 2:4). ``backend``: a registered backend or ``"auto"``. ``unit_dim``:
        the dimension of the weight that indexes units. ``mask``: ``"bits"`` or ``"recompute"``
        (what the backward of weight and N:M targeting reads; default ``td.api.DEFAULT_MASK``).
        Draws the base seed of its random stream from torch's default generator."""
        super().__init__()
        self.mode = _check_mode(mode)
        # what the backward reads (weight and N:M targeting): a 1-bit mask or a recompute
        self.mask = ops.check_mask(api.DEFAULT_MASK if mask is None else mask)
        self.n, self.m = _check_nm_args(mode, n, m)
        # the rates also live in a CPU float64 tensor (a plain attribute, so .to(device) leaves it
        # on the CPU): a compiled model reads them from there and a schedule changing them every
        # step never recompiles it
        self._rates = torch.zeros(2, dtype=torch.float64, device="cpu")
        # and, once the layer's shape is known (_attach), as the op's int64 params after the
        # seed (k, D, window) in _state = [b + c, *params], kept up to date by the setters: the
        # compiled forward adds one op per layer to the graph (td_kernels::next_params) instead
        # of the count/threshold arithmetic, which made the whole-model compile of 84 targeted
        # layers take twice the plain model's time
        self._shape: Optional[tuple] = None
        self._state: Optional[Tensor] = None
        self.drop_rate = drop_rate
        self.targ_rate = targ_rate
        check_name(backend)  # now, not at the first training forward
        self.backend = backend
        self.unit_dim = int(unit_dim)
        self.apply_to = "weight"
        self.layer_type: Optional[LayerType] = None  # set by apply_targeted_dropout
        # the base seed b; device="cpu" even under a meta device context
        self._base = _draw_base(None)
        self._state = torch.tensor([self._base], dtype=torch.int64, device="cpu")  # [b + c, *params tail]
        self._inc = torch.tensor([1], dtype=torch.int64, device="cpu")

    # validated on every assignment, so a schedule cannot set a rate outside [0, 1]
    @property
    def drop_rate(self) -> float:
        return self._drop_rate

    @drop_rate.setter
    def drop_rate(self, value) -> None:  # by hand: the current and the base rate
        self._set_drop(value)
        self.base_drop_rate = self._drop_rate

    @property
    def targ_rate(self) -> Optional[float]:
        return self._targ_rate

    @targ_rate.setter
    def targ_rate(self, value) -> None:
        self._set_targ(value)
        self.base_targ_rate = self._targ_rate

    def _set_scheduled(self, drop_rate: float, targ_rate: Optional[float]) -> None:
        """What a schedule sets: the current rates only (``targ_rate`` None leaves it)."""
        self._set_drop(drop_rate)
        if targ_rate is not None:
            self._set_targ(targ_rate)

    def _set_drop(self, value) -> None:
        self._drop_rate = _check_rate("drop_rate", value)
        self._rates[0] = self._drop_rate
        self._sync_params()

    def _set_targ(self, value) -> None:
        if self.mode == "nm":
            if value is not None:
                raise ValueError("targ_rate has no meaning for mode='nm' (each group of m weights has exactly m - n "
                                 f"candidates); leave it None, got {value!r}")
            self._targ_rate = None
            return
        if value is None:
            raise TypeError(f"mode={self.mode!r} needs a targ_rate in [0, 1], got None")
        self._targ_rate = _check_rate("targ_rate", value)
        self._rates[1] = self._targ_rate
        self._sync_params()

    def _attach(self, units: int, fan_in: int) -> None:
        """Record the targeted view's shape ``[U, F]`` (apply_targeted_dropout does)."""
        self._shape = (units, fan_in)
        self._sync_params()

    def _sync_params(self) -> None:
        if self._shape is None or self._state is None or not hasattr(self, "_targ_rate"):
            return
        U, F = self._shape
        D = reference.drop_threshold(self._drop_rate)
        if self.mode == "weight":  # ops.WEIGHT_PARAMS, NM_PARAMS, UNIT_PARAMS less the seed
            tail = (reference.count(self._targ_rate, F), D, 0, F)
        elif self.mode == "nm":
            tail = (D, 0, F)
        else:
            tail = (reference.count(self._targ_rate, U), D)
        if self._state.numel() == 1 + len(tail):  # in place: a compiled graph holds this tensor as an input
            self._state[1:] = torch.tensor(tail, dtype=torch.int64)
        else:
            self._state = torch.tensor((int(self._state[0]), *tail), dtype=torch.int64, device="cpu")
            self._inc = torch.zeros_like(self._state)
            self._inc[0] = 1

    @property
    def _rng(self) -> Tensor:
        """``(b, c)``: the base seed and the training forwards so far (a new int64 CPU tensor)."""
        return torch.tensor([self._base, int(self._state[0]) - self._base], dtype=torch.int64)

    def _set_rng(self, base: int, calls: int) -> None:
        self._base = int(base)
        self._state[0] = int(base) + int(calls)

    def _active(self) -> bool:
        # rate 0 means no candidate or no drop: the op would return W unchanged, so skip it
        return self.drop_rate > 0.0 and (self.mode == "nm" or self.targ_rate > 0.0)

    def _next_params(self) -> Tensor:
        """``[b + c, *params tail]`` of this training forward (the op's params once attached),
        then ``c += 1``; in a re-run forward, the params of the forward it rebuilds (see the
        module docstring). One op per layer under torch.compile."""
        if torch.compiler.is_compiling():
            return _next_params_op(self._state, self._inc)
        return _params_of_this_forward(self._state, self._inc, _may_be_rerun())

    def _next_seed(self) -> Tensor:
        """Seed ``b + c`` of this training forward as a 0-dim int64 CPU tensor; then ``c += 1``."""
        return self._next_params()[0]

    def _target(self, w: Tensor, seed: Tensor, drop_rate, targ_rate) -> Tensor:
        v = w.movedim(self.unit_dim, 0) if self.unit_dim else w
        if self.mode == "weight":
            out = api.targeted_weight_dropout(v, drop_rate, targ_rate, seed=seed, backend=self.backend, mask=self.mask)
        elif self.mode == "unit":
            out = api.targeted_unit_dropout(v, drop_rate, targ_rate, seed=seed, backend=self.backend)
        else:
            out = api.targeted_nm_dropout(v, drop_rate, n=self.n, m=self.m, seed=seed, backend=self.backend,
                                          mask=self.mask)
        return out.movedim(0, self.unit_dim) if self.unit_dim else out

    def _target_params(self, w: Tensor, params: Tensor) -> Tensor:
        """The op on ``params``: the public function's op call, minus the checks (made when the
        settings were) and the params arithmetic (done by the rate setters)."""
        v = w.movedim(self.unit_dim, 0) if self.unit_dim else w
        if self.mode == "weight":
            out = ops.weight_dropout(v, params, self.backend, self.mask)[0]
        elif self.mode == "nm":
            out = ops.nm_dropout(v, params, self.n, self.m, self.backend, self.mask)[0]
        else:
            out = ops.unit_dropout(v, params, self.backend)[0]
        return out.movedim(0, self.unit_dim) if self.unit_dim else out

    def forward(self, w: Tensor) -> Tensor:
        if not self.training:
            return w
        if capturing(w):
            # the seed b + c is advanced on the host: a captured graph would replay one mask
            raise RuntimeError(MODULE_CAPTURE_ERROR)
        params = self._next_params()  # every training forward advances c, whether or not it drops
        seed = params[0]
        U = w.shape[self.unit_dim]
        own = self._shape == (U, w.numel() // U if U else 0) and not _is_dtensor(w)  # params fit w
        if torch.compiler.is_compiling():
            # read no Python float here: each would be a guard, and each new value a recompile
            if own:
                return self._target_params(w, params)
            return self._target(w, seed, self._rates[0], None if self.mode == "nm" else self._rates[1])
        if not self._active():
            return w
        if own:  # the checks and params were made by the setters: ~0.1 ms less per call
            return self._target_params(w, params)
        return self._target(w, seed, self.drop_rate, self.targ_rate)

    def unit_keep(self, w: Tensor, seed=None) -> Tensor:
        """Bool ``[U]``: the units unit targeting keeps for this seed (SPEC sections 4, 6); ``w``
        in the layer's layout (units along ``unit_dim``); ``seed`` None draws the next one.

        Costs one read of W (the row norms), a selection over U norms and U random words; no
        masked copy of W."""
        s = int(self._next_seed() if seed is None else _seed_tensor(seed))
        w = w.movedim(self.unit_dim, 0) if self.unit_dim else w
        w2d = w.detach().reshape(w.shape[0], -1)
        U = w2d.shape[0]
        k = reference.count(self.targ_rate, U)
        if k in (0, U):
            candidate = torch.full((U,), k == U, dtype=torch.bool, device=w.device)
        else:  # the reference's candidates (SPEC section 4): norm strictly below the k-th
            keys = reference._norm_keys(reference.unit_norms(w2d))
            candidate = keys < reference._kth_smallest(keys[None, :], k)
        # Unit u's coin is word(u) < D. Weight targeting of a 1 x U row of ones with targ_rate 1
        # (all candidates) draws the same words (flat index j = u) and zeroes exactly those
        # positions: one backend call, where Philox in torch ops costs ~0.7 ms at any U.
        ones = torch.ones(1, U, dtype=torch.float32, device=w.device)
        coin = api.targeted_weight_dropout(ones, self.drop_rate, 1.0, seed=s, backend=self.backend)[0] == 0
        return ~(candidate & coin)

    def _mask_output(self, out: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
        """out = where(keep, x W^T + b, b) along the channel dim: equals x (W*keep)^T + b."""
        if not self.training:
            return out
        seed = self._next_seed()
        if not self._active():
            return out
        keep = self.unit_keep(w, seed)
        # the channel dim: last for a matrix weight (Linear, Conv1D); for ConvNd, before the N
        # spatial dims (the input may be unbatched)
        shape = [1] * out.ndim
        shape[out.ndim - w.ndim + 1] = -1
        keep = keep.view(shape)
        if bias is None:
            return out * keep.to(out.dtype)  # dropped units output exactly 0 = x . 0
        return torch.where(keep, out, bias.view(shape).to(out.dtype))

    def extra_repr(self) -> str:
        rates = f"drop_rate={self.drop_rate}, " + (f"n={self.n}, m={self.m}" if self.mode == "nm"
                                                    else f"targ_rate={self.targ_rate}")
        extra = f", apply_to={self.apply_to!r}" if self.apply_to != "weight" else ""
        extra += f", mask={self.mask!r}" if self.mode != "unit" else ""
        return f"{rates}, mode={self.mode!r}, backend={self.backend!r}{extra}"


# ---- the forward that replaces a targeted layer's --------------------------------------------
def _targeted_forward(self, *args, **kwargs):
    """The forward of every targeted layer: the layer type's forward with the targeted weight.

    One module-level function bound to each layer: torch.compile guards on its code, the same
    for every layer, so identical blocks share one graph."""
    tdm = self.targeted_dropout
    entry = tdm.layer_type
    w = getattr(self, entry.param)
    if tdm.apply_to == "output":
        return tdm._mask_output(_forward_with(entry, self, w, args, kwargs), w, getattr(self, "bias", None))
    return _forward_with(entry, self, tdm(w), args, kwargs)


def _bind(fn, obj):
    return types.MethodType(fn, obj)


class _Rebind:
    """Pickles (and deep-copies) as ``_bind(fn, layer)``: a method pickles by its name, and the
    instance-level forward has no name on the layer's class to be found by."""

    def __init__(self, method):
        self.fn, self.obj = method.__func__, method.__self__

    def __reduce__(self):
        return _bind, (self.fn, self.obj)


def _targeted_getstate(self):
    state = type(self).__getstate__(self)  # nn.Module's: a copy of __dict__
    for name in ("forward", "__getstate__"):
        state[name] = _Rebind(state[name])
    return state


def _install(layer: nn.Module, tdm: TargetedDropout) -> None:
    layer.add_module(ATTR, tdm)  # a submodule, so model.train()/eval() reach it
    layer.forward = _bind(_targeted_forward, layer)
    # an instance-level __getstate__ lets torch.save(model) / pickle / deepcopy rebind the forward
    layer.__getstate__ = _bind(_targeted_getstate, layer)


def _uninstall(layer: nn.Module) -> None:
    for name in ("forward", "__getstate__"):
        layer.__dict__.pop(name, None)
    delattr(layer, ATTR)


def _relayout(layer: nn.Module, entry: LayerType, units_first: bool) -> None:
    """Re-lay a parameter whose units are not dim 0 once, so that the units-first view is
    contiguous (``units_first``) or back to the standard layout: same Parameter object, shape,
    values and state_dict; a DTensor's local layout is its sharding's business."""
    p = layer._parameters.get(entry.param)
    if not entry.unit_dim or not isinstance(p, nn.Parameter) or _is_dtensor(p):
        return
    with torch.no_grad():
        if units_first and not p.movedim(entry.unit_dim, 0).is_contiguous():
            p.data = p.data.movedim(entry.unit_dim, 0).contiguous().movedim(0, entry.unit_dim)
        elif not units_first and not p.is_contiguous():
            p.data = p.data.contiguous()


# ---- choosing layers ---------------------------------------------------------------------
def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _output_head(layers) -> set:
    heads = [n for n, m in layers if getattr(m, layer_type(m).param).ndim == 2]
    return set(heads[-1:])


def prunable_layers(model: nn.Module, exclude=LAST_LINEAR) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer of a registered type (nn.Linear, nn.ConvNd,
    transformers' Conv1D, :func:`register_layer`) in ``model`` except the excluded ones.

    ``exclude``: ``LAST_LINEAR`` (default: the output head, the last layer in
    ``model.named_modules()`` order whose weight is a matrix), or an iterable of module names
    and/or modules (``()`` excludes nothing)."""
    _check_model(model)
    layers = [(n, m) for n, m in model.named_modules() if layer_type(m) is not None]
    if isinstance(exclude, str) and exclude == LAST_LINEAR:
        names, mods = _output_head(layers), set()
    elif isinstance(exclude, (str, nn.Module)) or not isinstance(exclude, Iterable):
        raise TypeError(f"exclude must be {LAST_LINEAR!r} or an iterable of module names / modules, "
                        f"got {exclude!r}")
    else:
        names, mods = set(), set()
        known = {n for n, _ in model.named_modules()}
        for e in exclude:
            if isinstance(e, nn.Module):
                mods.add(id(e))
            elif isinstance(e, str):
                if e not in known:
                    raise ValueError(f"exclude names {e!r}, which is not a module of the model")
                names.add(e)
            else:
                raise TypeError(f"exclude must hold module names or modules, got {type(e).__name__}")
    return [(n, m) for n, m in layers if n not in names and id(m) not in mods]


def _tied_parameters(model: nn.Module) -> set:
    """ids of the parameters held by more than one module (tied weights: GPT-2's lm_head and wte)."""
    owners: dict = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(mod))
    return {pid for pid, mods in owners.items() if len(mods) > 1}


def _select(model, layers, what: str, *, m: Optional[int] = None, in_forward: bool = False):
    """Drop (with one warning per reason) the layers ``what`` must not touch: a tied weight
    (changing it would change the other module's too), a layer whose parent reads its weight
    without calling its forward (``in_forward``: nn.MultiheadAttention's out_proj), and for N:M
    a fan-in that ``m`` does not divide."""
    tied = _tied_parameters(model)
    unreached = {id(mha.out_proj) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention)} \
        if in_forward else set()
    kept, skipped = [], {}
    for name, layer in layers:
        entry = layer_type(layer)
        p = layer._parameters.get(entry.param)
        if p is not None and id(p) in tied:
            skipped.setdefault(f"its {entry.param} is tied to another module's (changing it would change both)",
                               []).append(name)
        elif id(layer) in unreached:
            skipped.setdefault("nn.MultiheadAttention reads its weight without calling its forward",
                               []).append(name)
        elif m is not None and _fan_in(unit_view(layer)) % m:
            skipped.setdefault(f"m={m} does not divide its fan-in (N:M groups are m consecutive weights of a unit)",
                               []).append(name)
        else:
            kept.append((name, layer))
    for why, names in skipped.items():
        warnings.warn(f"{what} skips {', '.join(map(repr, names))}: {why}", stacklevel=3)
    return kept


def _nothing_to(what: str, model: nn.Module, exclude) -> ValueError:
    head = ""
    if isinstance(exclude, str) and exclude == LAST_LINEAR:
        found = _output_head([(n, m) for n, m in model.named_modules() if layer_type(m) is not None])
        if found:
            head = f"; the default exclude={LAST_LINEAR!r} leaves out the output head {found.pop()!r} (exclude=() keeps it)"
    return ValueError(f"{what} found no layer to work on in {type(model).__name__}: it serves nn.Linear, "
                      f"nn.Conv1d/2d/3d, transformers' Conv1D and the types added with td.register_layer{head}")


def _has_ours(layer: nn.Module) -> bool:
    return isinstance(layer._modules.get(ATTR), TargetedDropout)


# ---- applying and removing ---------------------------------------------------------------
def apply_targeted_dropout(model: nn.Module, drop_rate: float, targ_rate: Optional[float] = None,
                           mode: str = "weight", exclude=LAST_LINEAR, *, n: Optional[int] = None,
                           m: Optional[int] = None, backend: str = "auto", apply_to: str = "weight",
                           mask: Optional[str] = None) -> list[str]:
    """Add targeted dropout to every layer of a registered type in ``model`` except ``exclude``
    (see :func:`prunable_layers`); returns the names of the layers it changed.

    ``mode="weight"`` / ``"unit"`` take ``drop_rate`` and ``targ_rate``; ``mode="nm"`` takes
    ``drop_rate`` and the pattern ``n``, ``m`` (default 2:4) and no ``targ_rate``. Layers whose
    weight is tied to another module's, and for N:M those whose fan-in ``m`` does not divide, are
    skipped with a warning; a model with nothing left to target raises ValueError.
    ``apply_to="output"`` (unit mode only) masks the layer's output channels instead, keeping
    their bias. ``mask`` ("bits" or "recompute"; default ``td.api.DEFAULT_MASK``) picks what the
    backward of weight and N:M targeting reads (see :func:`td.targeted_weight_dropout`). Each
    layer draws its base seed from torch's default generator, in ``named_modules()`` order (see
    the module docstring).

    A model with BatchNorm gets a warning: in training mode BatchNorm collects the statistics of
    the targeted network, which do not fit the full (or pruned) network that ``eval()`` runs;
    ``td.recalibrate_batchnorm(model, data)`` recomputes them before evaluating."""
    _check_model(model)
    _check_mode(mode)
    n, m = _check_nm_args(mode, n, m)
    _check_rate("drop_rate", drop_rate)
    if mode == "nm":
        if targ_rate is not None:
            raise ValueError("targ_rate has no meaning for mode='nm' (each group of m weights has exactly m - n "
                             f"candidates); leave it out, got targ_rate={targ_rate!r}")
    else:
        if targ_rate is None:
            raise TypeError(f"mode={mode!r} needs a targ_rate in [0, 1]")
        _check_rate("targ_rate", targ_rate)
    check_name(backend)
    if mask is not None:
        ops.check_mask(mask)
    if apply_to not in ("weight", "output"):
        raise ValueError(f"apply_to must be 'weight' or 'output', got {apply_to!r}")
    if apply_to == "output" and mode != "unit":
        raise ValueError("apply_to='output' needs mode='unit': a weight mask is per element of W, not per output")
    layers = _select(model, prunable_layers(model, exclude), "apply_targeted_dropout", m=m, in_forward=True)
    if not layers:
        raise _nothing_to("apply_targeted_dropout", model, exclude)
    for name, layer in layers:
        if _has_ours(layer):
            raise ValueError(f"layer {name!r} already has targeted dropout; remove_targeted_dropout(model) first")
    for _, layer in layers:
        entry = layer_type(layer)
        tdm = TargetedDropout(drop_rate, targ_rate, mode, backend, n=n, m=m, unit_dim=entry.unit_dim, mask=mask)
        tdm.layer_type, tdm.apply_to = entry, apply_to
        tdm.train(layer.training)
        v = unit_view(layer)
        tdm._attach(v.shape[0], _fan_in(v))
        _relayout(layer, entry, units_first=True)
        _install(layer, tdm)
    bns = [name for name, mod in model.named_modules()
           if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats]
    if bns:
        warnings.warn(f"model has BatchNorm ({', '.join(map(repr, bns[:3]))}{', ...' if len(bns) > 3 else ''}): in "
                      "training mode it collects the statistics of the targeted network, which do not fit the full "
                      "(or pruned) network that eval() runs; call td.recalibrate_batchnorm(model, data) before "
                      "evaluating (or td.prune_model(..., recalibrate=data))", stacklevel=2)
    return [name for name, _ in layers]


def remove_targeted_dropout(model: nn.Module) -> list[str]:
    """Undo :func:`apply_targeted_dropout`: every targeted layer is the plain layer again (its
    class's forward, its weight in the standard layout, holding the raw untargeted values);
    returns the names of the layers it changed."""
    _check_model(model)
    done = []
    for name, layer in list(model.named_modules()):
        if _has_ours(layer):
            entry = layer.targeted_dropout.layer_type
            _uninstall(layer)
            if entry is not None:
                _relayout(layer, entry, units_first=False)
            done.append(name)
    return done


def targeted_dropout_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, TargetedDropout]]:
    """``(layer_name, layer, TargetedDropout)`` for every targeted layer of ``model``."""
    for name, layer in model.named_modules():
        if _has_ours(layer):
            yield name, layer, layer.targeted_dropout


# ---- the random stream's state -----------------------------------------------------------
def get_rng_state(model: nn.Module) -> Tensor:
    """The random state of every targeted layer of ``model`` (``named_modules()`` order): an
    int64 CPU tensor ``[L, 2]`` of ``(base seed b, training forwards c)``, a copy. Save it with
    the model and optimizer; :func:`set_rng_state` makes a resumed run draw exactly the masks
    the uninterrupted run would have drawn (like ``torch.get_rng_state``)."""
    _check_model(model)
    found = [t._rng for _, _, t in targeted_dropout_modules(model)]
    if not found:
        raise ValueError("model has no targeted dropout: call apply_targeted_dropout(model, ...) first")
    return torch.stack(found)


def set_rng_state(model: nn.Module, state: Tensor) -> None:
    """Restore what :func:`get_rng_state` returned, into a model with targeted dropout on the
    same layers."""
    _check_model(model)
    found = [t for _, _, t in targeted_dropout_modules(model)]
    if not isinstance(state, Tensor):
        raise TypeError(f"state must be the tensor td.get_rng_state returned, got {type(state).__name__}")
    if state.dtype != torch.int64 or tuple(state.shape) != (len(found), 2):
        raise ValueError(f"state must be an int64 tensor of shape ({len(found)}, 2) for this model's {len(found)} "
                         f"targeted layers, got {state.dtype} of shape {tuple(state.shape)}")
    state = state.cpu()
    if (state < 0).any() or (state[:, 0] >= SEED_BASE_LIMIT).any():
        raise ValueError("state holds a negative count or a base seed >= 2**62: not a td.get_rng_state tensor")
    for t, (base, calls) in zip(found, state.tolist()):
        t._set_rng(base, calls)


def reseed(model: nn.Module, generator: Optional[torch.Generator] = None) -> None:
    """Give every targeted layer of ``model`` a new base seed, drawn from ``generator`` (default:
    torch's default CPU generator) in ``named_modules()`` order, and restart its count of
    forwards at 0.

    ``copy.deepcopy`` (and ``torch.save``/``load``) copies the seeds, so a copy draws the same
    masks as its source: right for a replica, wrong for an ensemble member or a student that
    should draw its own. Reseed those. Data-parallel ranks must keep drawing the same masks:
    reseed them all alike (the same ``torch.manual_seed`` or generator seed on every rank)."""
    _check_model(model)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator (the seeds are drawn on the CPU), got {generator.device}")
    found = [t for _, _, t in targeted_dropout_modules(model)]
    if not found:
        raise ValueError("model has no targeted dropout: call apply_targeted_dropout(model, ...) first")
    for t in found:
        t._set_rng(_draw_base(generator), 0)
