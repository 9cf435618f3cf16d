"""Small rendering helpers shared by the figures (simulator `show`, pre-training reconstruction)."""
from __future__ import annotations

import numpy as np

from sitskit.constants import REFLECTANCE_SCALE


def true_color(red, green, blue, scale: float = REFLECTANCE_SCALE) -> np.ndarray:
    """True-colour RGB in [0, 1] from reflectance bands given as digital numbers (``scale`` = 1.0).

    red, green, blue: [..., H, W] (B4, B3, B2). A fixed stretch (0–0.3 reflectance, gamma 1/1.4) rather
    than a per-image percentile one, so dates and crops are comparable and clouds look white.
    Returns [..., H, W, 3] float32.
    """
    rgb = np.stack([red, green, blue], -1).astype(np.float32) / (0.3 * scale)
    return np.clip(rgb, 0, 1) ** (1 / 1.4)
