"""Render one patch: layout + class programs + dates -> reflectance cube with clouds and noise.

Shared by the PASTIS and MTLCC writers; all arrays are numpy, vectorised over pixels and dates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from . import atmosphere, spectra
from .noise import smooth_noise
from .parcels import FIELD, Layout
from .phenology import BACKGROUND_PROGRAMS, cover_fractions


@dataclass
class RegionClasses:
    """Per-region class id (0 = background) and phenology program."""

    cls: np.ndarray
    programs: list[str]


def assign_classes(rng: np.random.Generator, layout: Layout, class_ids: np.ndarray, weights: np.ndarray,
                   programs: dict[int, str]) -> RegionClasses:
    """Draw a crop class for every field region (probabilities ∝ weights); background regions get 0."""
    n = layout.n_regions
    cls = np.zeros(n, dtype=np.int64)
    fields = layout.cover == FIELD
    cls[fields] = rng.choice(class_ids, size=int(fields.sum()), p=weights / weights.sum())
    progs = [programs[int(c)] if f else BACKGROUND_PROGRAMS[int(cv)]
             for c, f, cv in zip(cls, fields, layout.cover)]
    return RegionClasses(cls=cls, programs=progs)


@dataclass
class Texture:
    """Static within-region variation: canopy density factor and soil brightness per pixel [H*W]."""

    canopy: np.ndarray
    soil: np.ndarray


def draw_texture(rng: np.random.Generator, layout: Layout) -> Texture:
    """Canopy density ±7 % at ~50 m and ±3 % at ~15 m; soil albedo ×U(0.8, 1.2) per region ±4 % within."""
    size = layout.region.shape
    region = layout.region.ravel()
    soil_region = rng.uniform(0.8, 1.2, layout.n_regions).astype(np.float32)
    canopy = 1 + 0.07 * smooth_noise(rng, size, 5).ravel() + 0.03 * smooth_noise(rng, size, 1.5).ravel()
    soil = soil_region[region] * (1 + 0.04 * smooth_noise(rng, size, 3).ravel())
    return Texture(canopy=canopy.astype(np.float32), soil=soil.astype(np.float32))


def pixel_fractions(region_fractions: np.ndarray, layout: Layout, texture: Texture) -> np.ndarray:
    """Region fractions [R, T, 6] -> pixel fractions [T, 6, H*W] with the within-field texture."""
    per_pixel = np.ascontiguousarray(region_fractions.transpose(1, 2, 0))[:, :, layout.region.ravel()]
    per_pixel[:, 0] = np.minimum(per_pixel[:, 0] * texture.canopy[None], 0.97)  # green canopy density
    return per_pixel


def render_reflectance(frac_pix: np.ndarray, moisture: np.ndarray, texture: Texture, shape: tuple[int, int],
                       band_idx: list[int], clouds: atmosphere.Clouds | None,
                       aerosol: np.ndarray | None = None) -> np.ndarray:
    """Reflectance (0..1, no sensor noise) [T, B, H, W] float32 of the bands `band_idx` (into ALL_BANDS).

    `aerosol` [T]: if given, the L1C top-of-atmosphere path term is added (MTLCC), else surface (PASTIS).
    """
    surface = spectra.mix(frac_pix, moisture, texture.soil, band_idx)  # [T, B, P]
    if aerosol is not None:
        surface = spectra.to_toa(surface, aerosol, band_idx)
    refl = surface.reshape(len(moisture), len(band_idx), *shape)
    if clouds is not None:
        refl = atmosphere.apply_clouds(refl, clouds, band_idx)
    return refl


# Standard-normal quantiles at 65 536 equiprobable points: indexing it with random uint16 draws gives
# Gaussian noise (truncated at ±4.3 sigma) about 4x faster than Generator.standard_normal.
_GAUSS_TABLE = ndtri((np.arange(1 << 16, dtype=np.float64) + 0.5) / (1 << 16)).astype(np.float32)


def add_noise(rng: np.random.Generator, refl: np.ndarray, band_idx: list[int]) -> np.ndarray:
    """Digital numbers with sensor noise: refl ×10 000 + N(0, sigma_band), float32, same shape."""
    sigma = spectra.NOISE_SIGMA[band_idx].reshape((1, -1) + (1,) * (refl.ndim - 2)) * np.float32(10000)
    dn = _GAUSS_TABLE[rng.integers(0, 1 << 16, size=refl.shape, dtype=np.uint16)]
    dn *= sigma
    dn += refl * np.float32(10000)
    return dn


def quantise(dn: np.ndarray, dtype) -> np.ndarray:
    """Round to integers clipped to 0..32 767 (int16 range of the files)."""
    np.rint(dn, out=dn)
    np.clip(dn, 0, 32767, out=dn)
    return dn.astype(dtype)


def add_noise_and_quantise(rng: np.random.Generator, refl: np.ndarray, band_idx: list[int],
                           dtype) -> np.ndarray:
    """Sensor noise, ×10 000 and rounding to integer digital numbers (clipped to 0..32 767)."""
    return quantise(add_noise(rng, refl, band_idx), dtype)


def block_mean(x: np.ndarray, k: int) -> np.ndarray:
    """[T, C, H, W] -> [T, C, H/k, W/k] mean over k×k blocks (the coarser S2 bands)."""
    t, c, h, w = x.shape
    return x.reshape(t, c, h // k, k, w // k, k).mean(axis=(3, 5))


def _upsample2_axis(x: np.ndarray, axis: int) -> np.ndarray:
    """Double one axis bilinearly (pixel centres aligned, edges clamped): 0.75 of the own coarse pixel
    plus 0.25 of the neighbour on the side of the fine pixel."""
    x = np.moveaxis(x, axis, -1)
    prev = np.concatenate([x[..., :1], x[..., :-1]], axis=-1)
    nxt = np.concatenate([x[..., 1:], x[..., -1:]], axis=-1)
    out = np.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    out[..., 0::2] = 0.75 * x + 0.25 * prev
    out[..., 1::2] = 0.75 * x + 0.25 * nxt
    return np.moveaxis(out, -1, axis)


def upsample_bilinear(x: np.ndarray) -> np.ndarray:
    """[..., h, w] -> [..., 2h, 2w], bilinear with pixel-centre alignment and clamped edges (what
    scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest") gives)."""
    return _upsample2_axis(_upsample2_axis(x, -2), -1)


def region_fractions(rng: np.random.Generator, classes: RegionClasses, days: np.ndarray,
                     year_shift: float) -> np.ndarray:
    """[R, T, 6] cover fractions at season `days` (see phenology.cover_fractions)."""
    return cover_fractions(classes.programs, days, rng, year_shift=year_shift)
