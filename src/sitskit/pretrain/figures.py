"""Reconstruction figure logged to MLflow: a mid-season RGB of one sample with a few marked pixels, and
for each marked pixel its series (observed, masked dates, reconstruction) in one band."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sitskit.viz import true_color


def reconstruction_figure(
    image: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    days: torch.Tensor | None = None,
    band_names: Sequence[str] | None = None,
    norm_mean=None,
    norm_std=None,
    n_pixels: int = 3,
    band: str = "B8",
):
    """image, pred: [T, C, H, W] (standardised, one sample, padded dates removed); mask: bool [T, H, W];
    days: [T] x-axis (day of year or days since reference). Returns a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, pred = image.detach().float().cpu(), pred.detach().float().cpu()
    mask = mask.detach().cpu().bool()
    T, C, _, W = image.shape
    bands = list(band_names) if band_names else [f"ch{i}" for i in range(C)]
    mean = np.zeros(C, np.float32) if norm_mean is None else np.asarray(norm_mean, np.float32)
    std = np.ones(C, np.float32) if norm_std is None else np.asarray(norm_std, np.float32)
    raw = image.numpy() * std[None, :, None, None] + mean[None, :, None, None]
    rec = pred.numpy() * std[None, :, None, None] + mean[None, :, None, None]
    x = np.arange(T) if days is None else days.detach().cpu().numpy()

    # pixels with the most masked dates: they show the reconstruction best
    masked_count = mask.sum(0).flatten().numpy()
    picks = np.argsort(-masked_count, kind="stable")[:n_pixels]
    b = bands.index(band) if band in bands else 0

    fig, axes = plt.subplots(1, 1 + len(picks), figsize=(4 * (1 + len(picks)), 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(_rgb(raw[T // 2], bands))
    for k, p in enumerate(picks):
        ax.plot(p % W, p // W, "o", mfc="none", mec="yellow", ms=8)
        ax.annotate(str(k + 1), (p % W, p // W), color="yellow", xytext=(4, 4), textcoords="offset points")
    ax.set_title(f"RGB, date {T // 2 + 1}/{T}")
    ax.axis("off")
    for k, p in enumerate(picks):
        ax = axes[0, k + 1]
        i, j = divmod(int(p), W)
        m = mask[:, i, j].numpy()
        ax.plot(x, raw[:, b, i, j], "-o", ms=3, color="tab:green", label="observed")
        ax.plot(x[m], raw[m, b, i, j], "s", mfc="none", mec="k", ms=7, label="masked (hidden)")
        ax.plot(x, rec[:, b, i, j], "--", color="tab:red", lw=1, label="reconstructed")
        ax.set_title(f"pixel {k + 1} ({i},{j}), {bands[b]}")
        ax.set_xlabel("days since the reference date" if days is not None else "date index")
        if k == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _rgb(frame: np.ndarray, bands: list[str]) -> np.ndarray:
    """frame: [C, H, W] reflectance (DN). True-colour RGB [H, W, 3] in [0, 1]."""
    if not all(b in bands for b in ("B4", "B3", "B2")):
        return np.repeat(frame[:1].transpose(1, 2, 0) / max(float(np.abs(frame[0]).max()), 1e-6), 3, -1)
    return true_color(*(frame[bands.index(b)] for b in ("B4", "B3", "B2")))
