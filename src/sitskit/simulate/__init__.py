"""Simulator of SITS datasets written in the exact real on-disk formats (PASTIS, MTLCC).

`simulate_pastis` / `simulate_mtlcc` write whole datasets; `simulate_pastis_patch` /
`simulate_mtlcc_tile` return one patch/tile in memory with its ground truth (cloud masks, true crop
class of every pixel) for tests and experiments. See docs/simulator.md.
"""
from .mtlcc import MtlccTile, simulate_mtlcc, simulate_mtlcc_tile
from .pastis import PastisPatch, pastis_parcel_classes, simulate_pastis, simulate_pastis_patch

__all__ = [
    "MtlccTile",
    "PastisPatch",
    "pastis_parcel_classes",
    "simulate_mtlcc",
    "simulate_mtlcc_tile",
    "simulate_pastis",
    "simulate_pastis_patch",
]
