"""Spatially smooth random fields (field texture, cloud blobs, coordinate warps)."""
from __future__ import annotations

import numpy as np


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field whose blobs are about `scale_px` pixels wide.

    White noise low-pass filtered with a Gaussian (sigma = scale_px / 2) in the Fourier domain, on a
    grid padded by 2 sigma so that the field does not wrap around the patch edges. Returns float32 [H, W].
    """
    h, w = shape
    sigma = max(float(scale_px), 1.0) / 2
    pad = int(np.ceil(2 * sigma))
    ph, pw = h + 2 * pad, w + 2 * pad
    white = rng.standard_normal((ph, pw), dtype=np.float32)
    fy = np.fft.fftfreq(ph)[:, None]
    fx = np.fft.rfftfreq(pw)[None, :]
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * (fy ** 2 + fx ** 2))
    field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=(ph, pw))[pad:pad + h, pad:pad + w]
    field = field - field.mean()
    std = field.std()
    return (field / std if std > 0 else field).astype(np.float32)
