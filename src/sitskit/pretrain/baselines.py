"""Trivial estimates of hidden pixel-dates, to read a masked-reconstruction loss against (docs/experiments.md).

x: [T, C, H, W] standardised values; hidden: bool [T, H, W] (True = masked); days: [T]. Each returns [T, C, H, W].
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter


def temporal_interpolation(x: np.ndarray, hidden: np.ndarray, days: np.ndarray) -> np.ndarray:
    """x: [T, C, H, W]; hidden: bool [T, H, W]; days: [T]. Per pixel, linear in time over visible dates;
    pixels with no visible date fall back to the spatial mean of their date."""
    out = spatial_mean(x, hidden)
    _, C, H, W = x.shape
    for i in range(H):
        for j in range(W):
            vis = ~hidden[:, i, j]
            if vis.any() and not vis.all():
                for c in range(C):
                    out[:, c, i, j] = np.interp(days, days[vis], x[vis, c, i, j])
            elif vis.all():
                out[:, :, i, j] = x[:, :, i, j]
    return out


def neighbour_mean(x: np.ndarray, hidden: np.ndarray, size: int = 3) -> np.ndarray:
    """Per date and channel, the mean of the visible pixels in the size x size window around each pixel;
    the crop's spatial mean where the window has no visible pixel."""
    vis = (~hidden)[:, None].astype(np.float32)
    win = (1, 1, size, size)
    num = uniform_filter(x * vis, size=win, mode="constant")
    den = uniform_filter(np.broadcast_to(vis, x.shape).astype(np.float32), size=win, mode="constant")
    return np.where(den > 1e-6, num / np.maximum(den, 1e-6), spatial_mean(x, hidden))


def spatial_mean(x: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Per date and channel, the mean of the visible pixels (0 = the dataset mean if none is visible)."""
    vis = (~hidden)[:, None].astype(np.float32)                      # [T, 1, H, W]
    mean = (x * vis).sum((2, 3)) / np.maximum(vis.sum((2, 3)), 1.0)  # [T, C]
    return np.broadcast_to(mean[:, :, None, None], x.shape).copy()


BASELINES = {"temporal_interpolation": temporal_interpolation, "neighbour_mean": neighbour_mean}


def baseline_errors(x: np.ndarray, hidden: np.ndarray, days: np.ndarray) -> dict[str, float]:
    """Sum of squared errors on the hidden entries for each baseline (divide by the hidden count × C)."""
    where = np.broadcast_to(hidden[:, None], x.shape)
    return {name: float(((fn(x, hidden, days) if name == "temporal_interpolation" else fn(x, hidden)) - x)[where]
                        .__pow__(2).sum()) for name, fn in BASELINES.items()}
