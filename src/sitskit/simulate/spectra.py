"""Endmember spectra for all 13 Sentinel-2 bands, linear mixing, the L1C top-of-atmosphere term.

Surface reflectances (0..1) follow the table of `crop_phenology.md`; B1 (443 nm), B9 (945 nm) and
B10 (1375 nm) are extrapolated from their neighbours at the surface, and the TOA transform then makes B9
lower than B8A (water vapour) and B10 nearly 0 (cirrus band) as in L1C products.
"""
from __future__ import annotations

import numpy as np

from sitskit.constants import MTLCC_BANDS, PASTIS_BANDS

ALL_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
PASTIS_BAND_IDX = [ALL_BANDS.index(b) for b in PASTIS_BANDS]
MTLCC_BAND_IDX = [ALL_BANDS.index(b) for b in MTLCC_BANDS]

#                        B1    B2    B3    B4    B5    B6    B7    B8   B8A    B9   B10   B11   B12
ENDMEMBERS: dict[str, list[float]] = {
    "soil_dry":  [0.07, 0.08, 0.11, 0.14, 0.17, 0.19, 0.21, 0.22, 0.23, 0.24, 0.27, 0.30, 0.26],
    "soil_wet":  [.045, 0.05, 0.07, 0.09, 0.11, 0.12, 0.13, 0.14, 0.15, 0.15, 0.18, 0.20, 0.16],
    "green":     [.025, 0.03, 0.07, 0.03, 0.11, 0.30, 0.40, 0.44, 0.45, 0.42, 0.30, 0.20, 0.09],
    "senescent": [0.06, 0.07, 0.10, 0.13, 0.17, 0.22, 0.25, 0.27, 0.28, 0.28, 0.33, 0.36, 0.28],
    "flower":    [0.04, 0.05, 0.15, 0.10, 0.20, 0.32, 0.38, 0.42, 0.43, 0.40, 0.30, 0.22, 0.12],
    "water":     [0.07, 0.06, 0.05, 0.03, 0.02, 0.02, 0.01, 0.01, 0.01, .008, .005, .005, .003],
    "urban":     [0.11, 0.12, 0.13, 0.14, 0.16, 0.17, 0.18, 0.19, 0.19, 0.19, 0.21, 0.22, 0.20],
    "shade":     [0.01, 0.01, 0.01, 0.01, 0.01, 0.02, 0.03, 0.03, 0.03, 0.03, 0.02, 0.01, 0.01],
}
CLOUD = np.array([0.45, 0.45, 0.45, 0.46, 0.47, 0.48, 0.49, 0.50, 0.50, 0.48, 0.25, 0.40, 0.30], np.float32)
# Thin haze (cloud edges) scatters more at short wavelengths; B10 sees high (cirrus) cloud.
HAZE = np.array([0.20, 0.18, 0.14, 0.11, 0.10, 0.09, 0.085, 0.08, 0.08, 0.07, 0.10, 0.04, 0.025], np.float32)
# L1C: TOA = path + transmittance * surface (aerosol path term largest in blue; water vapour at B9;
# B10 sits in a deep water-vapour absorption band).
TOA_PATH = np.array([0.10, 0.075, 0.05, 0.035, 0.03, 0.025, 0.02, 0.018, 0.017, 0.01, 0.001, 0.005, 0.003],
                    np.float32)
TOA_TRANS = np.array([0.80, 0.85, 0.90, 0.92, 0.93, 0.94, 0.95, 0.95, 0.95, 0.35, 0.02, 0.95, 0.93],
                     np.float32)
# Sensor noise (reflectance units, 1 sigma) per band.
NOISE_SIGMA = np.array([.004, .004, .004, .004, .005, .005, .006, .006, .006, .005, .001, .006, .006],
                       np.float32)

_MIX_ORDER = ["soil_dry", "soil_wet", "green", "senescent", "flower", "water", "urban", "shade"]
MIX_MATRIX = np.array([ENDMEMBERS[k] for k in _MIX_ORDER], np.float32).T  # [13, 8]


def mix(fractions: np.ndarray, moisture: np.ndarray, soil_brightness: np.ndarray,
        band_idx: list[int] | None = None) -> np.ndarray:
    """Linear mixture of endmembers.

    fractions: [T, 6, P] cover of phenology.COMPONENTS (green, senescent, flower, water, urban, shade);
    moisture: [T] soil wetness 0..1 (dry -> wet soil spectrum); soil_brightness: [P] soil albedo factor.
    band_idx: bands to compute (positions in ALL_BANDS), default all 13.
    Returns surface reflectance float32 [T, B, P].
    """
    soil = np.clip(1.0 - fractions.sum(1), 0.0, 1.0) * soil_brightness[None, :]  # [T, P]
    m = moisture[:, None].astype(np.float32)
    full = np.concatenate([(soil * (1 - m))[:, None], (soil * m)[:, None], fractions], axis=1)  # [T, 8, P]
    matrix = MIX_MATRIX if band_idx is None else MIX_MATRIX[band_idx]
    return np.matmul(matrix[None], full.astype(np.float32))


def to_toa(surface: np.ndarray, aerosol: np.ndarray, band_idx: list[int] | None = None) -> np.ndarray:
    """L1C top-of-atmosphere reflectance. surface: [T, B, ...] of the bands `band_idx` (default all 13);
    aerosol: [T] path-term factor."""
    idx = slice(None) if band_idx is None else band_idx
    shape = (1, -1) + (1,) * (surface.ndim - 2)
    path = TOA_PATH[idx].reshape(shape) * aerosol.reshape((-1,) + (1,) * (surface.ndim - 1)).astype(np.float32)
    return path + TOA_TRANS[idx].reshape(shape) * surface
