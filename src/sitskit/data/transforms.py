"""Time-consistent sample transforms: one random draw per sample, applied to every date and every map."""
from __future__ import annotations

import numpy as np


def crop_grid(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """Top-left corners of a grid of `size` crops covering the patch (last row/col aligned to the edge)."""
    def starts(n: int) -> list[int]:
        s = list(range(0, n - size + 1, size))
        if s[-1] + size < n:
            s.append(n - size)
        return s
    return [(y, x) for y in starts(height) for x in starts(width)]


def draw_dates(n_available: int, num_dates: int, rng: np.random.Generator) -> np.ndarray:
    """`num_dates` distinct positions out of `n_available`, in chronological (ascending) order."""
    return np.sort(rng.choice(n_available, num_dates, replace=False))


def draw_geometry(rng: np.random.Generator) -> tuple[int, bool]:
    """Number of 90° rotations (0..3) and whether to flip left-right: the 8 symmetries of the square."""
    return int(rng.integers(4)), bool(rng.integers(2))


def apply_geometry(arr: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotate/flip the last two (spatial) axes of [..., H, W]; the same for every date and channel."""
    if k:
        arr = np.rot90(arr, k, axes=(-2, -1))
    if flip:
        arr = arr[..., ::-1]
    return arr


def add_noise(raw: np.ndarray, sigma: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of std `sigma` reflectance units (x `scale` digital numbers) on raw values."""
    return raw + rng.normal(0.0, sigma * scale, size=raw.shape).astype(np.float32)
