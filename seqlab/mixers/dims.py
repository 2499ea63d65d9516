"""Head sizes from a mixer's width options, checked once at construction."""

from __future__ import annotations


def per_head(width: float, num_heads: int, what: str) -> int:
    """`width` split over `num_heads`; it must be a whole multiple of `num_heads`."""
    if width != int(width) or int(width) % num_heads:
        raise ValueError(f"{what} = {width:g} must be a whole multiple of num_heads = {num_heads}")
    return int(width) // num_heads
