"""PASTIS instance targets: INSTANCES, HEATMAP and ZONES from parcel ids (PASTIS / PaPs, docs/panoptic.md)."""
from __future__ import annotations

import numpy as np

ALPHA, RADIUS = 0.7, 3  # sigma = (1 - alpha) / (1 + alpha) * dim / r, about dim / 17


def instance_codes(parcel_ids: np.ndarray, semantic: np.ndarray) -> np.ndarray:
    """Consecutive instance codes: background (class 0) -> 0, parcels -> 1..N by sorted parcel id.

    Void parcels (class 19) keep their codes. int64 [H, W].
    Deliberate fix: the reference maps sorted unique ids to 0..N, so a patch without background
    would give its first parcel code 0; here 0 is always background.
    """
    inst = np.where(semantic != 0, parcel_ids, 0).astype(np.int64)
    uniq = np.unique(inst)
    uniq = uniq if (len(uniq) and uniq[0] == 0) else np.concatenate([[0], uniq])
    return np.searchsorted(uniq, inst).astype(np.int64)


def _boxes(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [N] (without 0), centres [N, 2] and extents (height, width) [N, 2] of the expanded boxes."""
    h, w = instances.shape
    codes = np.unique(instances)
    codes = codes[codes != 0]
    centres = np.zeros((len(codes), 2), np.int64)
    extents = np.zeros((len(codes), 2), np.int64)
    for k, code in enumerate(codes):
        mask = instances == code
        r = np.flatnonzero(mask.any(axis=1))
        c = np.flatnonzero(mask.any(axis=0))
        rmin, rmax = max(r[0] - 1, 0), min(r[-1] + 1, h - 1)
        cmin, cmax = max(c[0] - 1, 0), min(c[-1] + 1, w - 1)
        extents[k] = rmax - rmin, cmax - cmin
        centres[k] = rmin + (rmax - rmin) // 2, cmin + (cmax - cmin) // 2
    return codes, centres, extents


def centerness(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HEATMAP float32 [H, W] and ZONES int64 [H, W] of instance codes [H, W].

    Per instance: bounding box expanded by 1 px where it stays inside the image, height/width =
    max - min of the expanded box, centre = min + extent // 2 (integer), Gaussian with
    sigma = (1-alpha)/(1+alpha) * extent / r. HEATMAP = max over instances (exactly 1 at each
    centre), ZONES = code of the arg-max instance at every pixel (background pixels included).
    The arg-max is taken on log-Gaussians so that pixels far from every centre (where all
    Gaussians underflow to 0) still go to the nearest one in the Gaussian metric.
    """
    h, w = instances.shape
    codes, centres, extents = _boxes(instances)
    if len(codes) == 0:
        return np.zeros((h, w), np.float32), np.zeros((h, w), np.int64)
    sigma = np.maximum((1 - ALPHA) / (1 + ALPHA) * extents / RADIUS, 1e-6)  # [N, 2]
    ly = -((np.arange(h)[None, :] - centres[:, :1]) ** 2) / (2 * sigma[:, :1] ** 2)  # [N, H]
    lx = -((np.arange(w)[None, :] - centres[:, 1:]) ** 2) / (2 * sigma[:, 1:] ** 2)  # [N, W]
    logg = ly[:, :, None] + lx[:, None, :]  # [N, H, W]
    best = logg.argmax(0)
    heatmap = np.exp(np.take_along_axis(logg, best[None], 0)[0]).astype(np.float32)
    return heatmap, codes[best].astype(np.int64)


def instance_centres(instances: np.ndarray) -> dict[int, tuple[int, int]]:
    """Centre pixel of every instance code as defined in `centerness` (for tests and plots)."""
    codes, centres, _ = _boxes(instances)
    return {int(c): (int(i), int(j)) for c, (i, j) in zip(codes, centres)}
