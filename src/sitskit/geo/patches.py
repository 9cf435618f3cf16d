"""Cut an area into patches and give each a train/val/test split by spatial blocks (no spatial leakage).

Patches are `size` x `size` windows every `stride` pixels; the last row and column are moved back to end
at the area's edge so that every pixel is covered. Splits are drawn per square block of `block` pixels
(seeded), and a patch belongs to the block holding its top-left pixel, so neighbouring patches of one
block share a split.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sitskit.errors import UserFacingError

SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))


@dataclass(frozen=True)
class PatchWindow:
    row: int
    col: int
    size: int

    @property
    def key(self) -> str:
        return f"r{self.row:06d}_c{self.col:06d}"


def _starts(length: int, size: int, stride: int) -> list[int]:
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def patch_windows(height: int, width: int, size: int, stride: int | None = None) -> list[PatchWindow]:
    """Row-major windows covering the whole [height, width] area."""
    stride = stride or size
    if size < 8 or stride < 1 or stride > size:
        raise UserFacingError(f"--patch-size {size} / --stride {stride}: need size >= 8 and 1 <= stride <= size")
    if height < size or width < size:
        raise UserFacingError(f"--patch-size {size}: larger than the {height}x{width} px area; use a smaller one")
    return [PatchWindow(r, c, size) for r in _starts(height, size, stride) for c in _starts(width, size, stride)]


def spatial_block_split(windows: list[PatchWindow], block: int, seed: int = 0) -> list[str]:
    """train/val/test per patch: blocks of `block` px shuffled with `seed`, then cut 70/15/15 (at least one
    block each for val and test when there are three or more blocks)."""
    if block < 1:
        raise UserFacingError(f"--split-block {block}: must be >= 1 px")
    blocks = [(w.row // block, w.col // block) for w in windows]
    uniq = sorted(set(blocks))
    order = np.random.default_rng(seed).permutation(len(uniq))
    n = len(uniq)
    n_val = n_test = 0
    if n >= 3:
        n_val = max(1, round(SPLIT_FRACTIONS[1][1] * n))
        n_test = max(1, round(SPLIT_FRACTIONS[2][1] * n))
    split_of = {}
    for rank, k in enumerate(order):
        split_of[uniq[k]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return [split_of[b] for b in blocks]


def window_transform(transform: tuple[float, ...], row: int, col: int) -> tuple[float, ...]:
    """GDAL geotransform (x0, a, b, y0, d, e) of the window starting at pixel (row, col)."""
    x0, a, b, y0, d, e = transform
    return (x0 + col * a + row * b, a, b, y0 + col * d + row * e, d, e)


def footprint(transform: tuple[float, ...], h: int, w: int) -> dict:
    """GeoJSON polygon of a window with GDAL geotransform `transform` and size h x w."""
    x0, a, b, y0, d, e = transform
    corners = [(0, 0), (w, 0), (w, h), (0, h), (0, 0)]
    return {"type": "Polygon", "coordinates": [[[x0 + c * a + r * b, y0 + c * d + r * e] for c, r in corners]]}
