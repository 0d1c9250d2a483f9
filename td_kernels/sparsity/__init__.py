"""Turning zeros into speed: ``shrink`` (removing pruned units, a smaller dense model) and
``sparse`` (2:4 weights as torch's semi-structured sparse tensors)."""
