"""Weather and observation effects: soil moisture after rain, clouds + haze + shadows, Sentinel-1 backscatter."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import gamma as gamma_dist

from .noise import smooth_noise
from .spectra import CLOUD, HAZE

# Shadows fall on the side opposite the sun, whose direction is fixed (mid-morning overpass from
# the south-east): rows and columns shift per unit of cloud height.
SUN_SHIFT = (0.8, -0.6)


def soil_moisture(rng: np.random.Generator, days: np.ndarray, rain_per_10d: float,
                  window: tuple[float, float]) -> np.ndarray:
    """Soil wetness 0..1 at each acquisition day: rain events decaying over ~4 days. days: [T].

    Rain falls over the fixed season `window` (first, last day), so the weather does not depend on
    which dates are observed (adding S1 dates leaves S2 unchanged).
    """
    days = np.asarray(days, dtype=np.float64)
    lo, hi = window[0] - 30, window[1] + 1
    n_events = rng.poisson(rain_per_10d * (hi - lo) / 10)
    events = rng.uniform(lo, hi, n_events)
    amount = rng.exponential(0.5, n_events)
    dt = days[:, None] - events[None, :]
    wet = (np.where(dt >= 0, amount * np.exp(-np.maximum(dt, 0) / 4.0), 0.0)).sum(1)
    return np.clip(wet, 0, 1).astype(np.float32)


@dataclass
class Clouds:
    """Per-date cloud optical thickness `tau` [T, H, W] in 0..1 and shadow factor `shadow` [T, H, W]
    (1 = lit, 0.3..0.5 = full shadow). `mask` = pixels affected by cloud, haze or shadow."""

    tau: np.ndarray
    shadow: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return (self.tau > 0.02) | (self.shadow < 0.98)

    @property
    def cloudy_dates(self) -> np.ndarray:
        """bool [T]: partly cloudy images (any pixel affected)."""
        return self.mask.any(axis=(1, 2))


def draw_clouds(rng: np.random.Generator, n_dates: int, shape: tuple[int, int], p_cloudy: float,
                max_cover: float = 0.6, scale: int = 1) -> Clouds:
    """Spatially coherent cloud blobs on a random ~`p_cloudy` share of the dates.

    Cover per cloudy date ~ Beta(1.2, 3) * max_cover (+1 %). Thickness rises from 0 at the blob edge
    (thin haze) to 1 inside; shadows are the blob displaced along SUN_SHIFT by a per-date cloud height.
    `scale` multiplies blob and shift sizes (e.g. for a coarser grid).
    """
    h, w = shape
    tau = np.zeros((n_dates, h, w), np.float32)
    shadow = np.ones((n_dates, h, w), np.float32)
    cloudy = rng.random(n_dates) < p_cloudy
    for t in np.flatnonzero(cloudy):
        cover = 0.01 + max_cover * rng.beta(1.2, 3.0)
        field = smooth_noise(rng, (h, w), rng.uniform(6, 20) * scale)
        thr = np.quantile(field, 1 - cover)
        thick = np.clip((field - thr) / rng.uniform(0.4, 1.2), 0, 1) ** 0.7
        thick *= rng.uniform(0.5, 1.0)  # some blobs stay semi-transparent
        tau[t] = thick
        height = rng.uniform(3, 9) * scale
        dy, dx = round(SUN_SHIFT[0] * height), round(SUN_SHIFT[1] * height)
        shifted = np.zeros_like(thick)
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        shifted[yd, xd] = thick[ys, xs]
        darkest = rng.uniform(0.3, 0.5)
        shadow[t] = 1 - (1 - darkest) * np.clip(2 * shifted, 0, 1) * (thick < 0.3)
    return Clouds(tau=tau, shadow=shadow)


def apply_clouds(refl: np.ndarray, clouds: Clouds, band_idx: list[int]) -> np.ndarray:
    """Shade, haze and cover reflectance in place. refl: [T, B, H, W]; band_idx: positions in ALL_BANDS."""
    cloud = CLOUD[band_idx][None, :, None, None]
    haze = HAZE[band_idx][None, :, None, None]
    for t in np.flatnonzero(clouds.cloudy_dates):
        tau = clouds.tau[t][None]
        refl[t] *= clouds.shadow[t][None]
        # haze term peaks at intermediate thickness (thin cloud edges), opaque core tends to CLOUD
        refl[t] = refl[t] * (1 - tau) + tau * cloud[0] + (tau * (1 - tau)) * haze[0]
    return refl


# ------------------------------------------------------------------------------------------ Sentinel-1
# Backscatter (dB) of each mixing component, VV and VH: soil dry/wet, green, senescent, flower, water,
# urban, shade (forest structure). Mixed in linear power.
S1_DB = np.array([
    [-16.0, -26.0], [-11.0, -21.0], [-9.5, -15.5], [-12.0, -19.0], [-9.5, -15.5],
    [-22.0, -29.0], [-5.0, -12.0], [-7.5, -13.0]], np.float32)  # [8, 2]
S1_LOOKS = 4.5  # equivalent number of looks of the speckle (gamma-distributed intensity)
# Gamma(L, 1/L) quantiles at 65 536 equiprobable points: indexing with random uint16 draws samples the
# speckle several times faster than Generator.gamma.
_SPECKLE_TABLE = gamma_dist.ppf((np.arange(1 << 16) + 0.5) / (1 << 16), S1_LOOKS, scale=1 / S1_LOOKS
                                ).astype(np.float32)


def s1_backscatter(rng: np.random.Generator, fractions: np.ndarray, moisture: np.ndarray) -> np.ndarray:
    """PASTIS-R style S1 channels [T, 3, P] float32: VV dB, VH dB, VV/VH ratio in dB (= VV_dB - VH_dB).

    fractions: [T, 6, P] components as for `spectra.mix`; moisture: [T].
    """
    soil = np.clip(1.0 - fractions.sum(1), 0, 1)
    m = moisture[:, None]
    full = np.concatenate([(soil * (1 - m))[:, None], (soil * m)[:, None], fractions], axis=1)  # [T, 8, P]
    lin = np.matmul((10 ** (S1_DB / 10)).T.astype(np.float32)[None], full.astype(np.float32))  # [T, 2, P]
    lin = lin * _SPECKLE_TABLE[rng.integers(0, 1 << 16, size=lin.shape, dtype=np.uint16)]
    db = 10 * np.log10(np.maximum(lin, 1e-5))
    return np.concatenate([db, db[:, :1] - db[:, 1:2]], axis=1).astype(np.float32)
