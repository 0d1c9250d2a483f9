"""N:M export: 2:4-pruned ``nn.Linear`` weights as ``torch.sparse`` semi-structured tensors.

``report = td.to_semi_structured(model)`` replaces, in place, the weight of every ``nn.Linear``
that can gain from NVIDIA's sparse tensor cores by ``torch.sparse.to_sparse_semi_structured(w)``
and leaves every other layer dense, saying why in the report. Prune first with ``td.prune_nm``
(SPEC section 11), e.g. ``layer.weight.data = td.prune_nm(layer.weight, n=2, m=4)``, or train
with targeted N:M dropout. Conditions (PyTorch 2.13, ``torch/sparse/semi_structured.py`` and its
tests):

- CUDA only (the kernels are CUTLASS and cuSPARSELt); compute capability 8.x (Ampere/Ada: CUTLASS
  or cuSPARSELt) or 9.x (Hopper: cuSPARSELt only). PyTorch tests no other architecture.
- float16 or bfloat16 weights in the 2:4 pattern: at most 2 non-zeros in every group of 4
  consecutive weights of a row (the fan-in, which is the reduction dimension of ``x @ W.T``).
- a 2-D contiguous weight whose rows and columns are multiples of the backend's minimum
  (cuSPARSELt 16 x 16, CUTLASS 32 x 64 for these dtypes; read from torch at run time).
- big enough to win: ``min(out_features, in_features) >= min_features`` (default 1024). The
  sparse kernels pay for the metadata and a fixed overhead: small layers, and single-token
  (matrix-vector) inputs, are known to run no faster or slower than dense (pytorch/pytorch issue
  111339: a 4096 x 4096 weight with a 1 x 4096 input showed no speed-up). The threshold is a
  heuristic: ``python -m td_kernels.tools.bench.inference --gpu`` measures your shapes.

The converted weight is a frozen inference tensor (``requires_grad=False``): the export is for
inference.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..reference import check_nm

__all__ = ["to_semi_structured", "nm_violations", "is_nm_sparse", "SemiStructuredReport", "SemiStructuredLayer",
           "semi_structured_unsupported"]

SEMI_DTYPES = (torch.float16, torch.bfloat16)
MIN_FEATURES = 1024
# fallbacks if torch's tables move: (rows, cols) multiples for float16/bfloat16 weights
_MIN_SHAPE = {"cusparselt": (16, 16), "cutlass": (32, 64)}


def nm_violations(w: Tensor, n: int = 2, m: int = 4) -> int:
    """How many groups of ``m`` consecutive weights of a row (of ``w.reshape(U, -1)``) hold more
    than ``n`` non-zeros; 0 means ``w`` satisfies N:M. ``m`` must divide the fan-in."""
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.ndim < 2:
        raise ValueError(f"w must have at least 2 dimensions (units x fan-in), got shape {tuple(w.shape)}")
    F = w.numel() // w.shape[0] if w.shape[0] else 0
    check_nm(n, m, F)
    nz = (w.detach() != 0).reshape(w.shape[0], F // m, m).sum(-1)
    return int((nz > n).sum())


def is_nm_sparse(w: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive weights of every unit has at most ``n`` non-zeros."""
    return nm_violations(w, n, m) == 0


def _backend() -> str:
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return "cutlass"
    return "cusparselt"


def _min_shape(backend: str, dtype) -> tuple:
    try:
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

        cls = SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else SparseSemiStructuredTensorCUSPARSELT
        c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return c.sparse_min_rows, c.sparse_min_cols
    except (ImportError, AttributeError, KeyError):
        return _MIN_SHAPE[backend]


def semi_structured_unsupported(device) -> str | None:
    """Why 2:4 semi-structured kernels cannot run on ``device``, or None if they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"the weight is on {device.type}: semi-structured sparse kernels (CUTLASS, cuSPARSELt) run on "
                "CUDA GPUs only")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.version.hip is not None:
        return "ROCm: hipSPARSELt support is not checked here"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"sm_{major}{minor}: sparse tensor cores need compute capability 8.0 (Ampere) or newer"
    if major == 9 and not torch.backends.cusparselt.is_available():
        return f"sm_{major}{minor}: Hopper runs 2:4 through cuSPARSELt only, and this torch has no cuSPARSELt"
    if major > 9:
        return f"sm_{major}{minor}: PyTorch tests semi-structured sparsity on sm_8x and sm_9x only"
    return None


@dataclass
class SemiStructuredLayer:
    name: str
    shape: tuple
    dtype: torch.dtype
    device: str
    converted: bool
    reasons: list = field(default_factory=list)  # why it stayed dense (empty when converted)


@dataclass
class SemiStructuredReport:
    layers: list = field(default_factory=list)

    @property
    def converted(self) -> list:
        return [s.name for s in self.layers if s.converted]

    def __str__(self) -> str:
        lines = []
        for s in self.layers:
            shape = "x".join(map(str, s.shape))
            head = f"{s.name} [{shape} {str(s.dtype).removeprefix('torch.')} {s.device}]"
            lines.append(f"{head}: 2:4 semi-structured" if s.converted else f"{head}: dense: " + "; ".join(s.reasons))
        return "\n".join(lines) if lines else "no nn.Linear layers"


def _reasons(layer: nn.Linear, min_features: int) -> list:
    w = layer.weight
    out = []
    if hasattr(layer, "weight_orig") or hasattr(layer, "parametrizations"):
        out.append("the weight is masked or parametrized: make pruning permanent first "
                   "(torch.nn.utils.prune.remove / td.remove_targeted_dropout)")
        return out
    why = semi_structured_unsupported(w.device)
    if why:
        out.append(why)
    if w.dtype not in SEMI_DTYPES:
        out.append(f"{str(w.dtype).removeprefix('torch.')}: 2:4 kernels take float16 or bfloat16 "
                   "(convert the model, e.g. model.half())")
    rows, cols = w.shape
    if cols % 4:
        out.append(f"in_features {cols} is not a multiple of 4")
    else:
        bad = nm_violations(w, 2, 4)
        if bad:
            out.append(f"not 2:4 sparse ({bad} group(s) of 4 with more than 2 non-zeros): prune it with "
                       "td.prune_nm(w, n=2, m=4) first")
    if w.dtype in SEMI_DTYPES:
        backend = _backend() if w.is_cuda else "cusparselt"
        r, c = _min_shape(backend, w.dtype)
        if rows % r or cols % c:
            out.append(f"shape {rows}x{cols} is not a multiple of {r}x{c}, which the {backend} kernels need")
    if min(rows, cols) < min_features:
        out.append(f"smaller than min_features={min_features}: at such sizes 2:4 kernels are not faster "
                   "than dense")
    return out


def to_semi_structured(model: nn.Module, *, min_features: int = MIN_FEATURES, exclude=()) -> SemiStructuredReport:
    """Convert, in place, every ``nn.Linear`` of ``model`` whose weight is 2:4 sparse and that the
    device, dtype and shape let run faster with sparse tensor cores, to a
    ``torch.sparse.to_sparse_semi_structured`` weight; the rest stay dense. Returns a report
    with every layer's decision and reasons. ``exclude``: names of layers to leave alone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(min_features, bool) or not isinstance(min_features, numbers.Integral) or min_features < 0:
        raise ValueError(f"min_features must be a non-negative int, got {min_features!r}")
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    names = {n for n, _ in model.named_modules()}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ValueError(f"exclude names {unknown[0]!r}, which is not a submodule of the model")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    report = SemiStructuredReport()
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        w = layer.weight
        entry = SemiStructuredLayer(name, tuple(w.shape), w.dtype, str(w.device), False)
        report.layers.append(entry)
        if isinstance(w, SparseSemiStructuredTensor):
            entry.converted = True
            continue
        entry.reasons = ["excluded"] if name in exclude else _reasons(layer, min_features)
        if entry.reasons:
            continue
        layer.weight = nn.Parameter(to_sparse_semi_structured(w.detach().contiguous()), requires_grad=False)
        entry.converted = True
    return report
