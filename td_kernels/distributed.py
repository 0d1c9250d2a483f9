"""Sharded weights (SPEC section 12): DTensor support for the public functions.

Not implemented yet: the public functions raise a clear TypeError for a DTensor."""
from __future__ import annotations


def sharded_targeting(kind: str, w, **kwargs):
    raise TypeError(f"td_kernels cannot serve a DTensor weight yet (placements {tuple(w.placements)})")
