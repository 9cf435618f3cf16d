"""Spatially smooth random fields (field texture, cloud blobs, coordinate warps)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std random field whose features are about `scale_px` pixels wide.

    White noise on a coarse grid (one node per `scale_px`) upsampled with cubic splines: cheap and
    deterministic for a given generator state. Returns float32 [H, W].
    """
    h, w = shape
    step = max(float(scale_px), 1.0)
    ch, cw = int(np.ceil(h / step)) + 3, int(np.ceil(w / step)) + 3
    coarse = rng.standard_normal((ch, cw)).astype(np.float32)
    fine = ndimage.zoom(coarse, step, order=3, mode="nearest", grid_mode=False)[:h, :w]
    fine = fine - fine.mean()
    std = fine.std()
    return (fine / std if std > 0 else fine).astype(np.float32)
