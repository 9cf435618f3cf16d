"""Field tessellation: irregular parcels with narrow borders, non-field background areas, void parcels.

A patch is cut out of a larger landscape (patch + margin), so parcels crossing the patch edge exist and
those mostly outside are flagged void, as in PASTIS. The tessellation is a Voronoi diagram of a jittered
seed grid, computed in a rotated/stretched frame (fields are elongated along a dominant direction) with
warped pixel coordinates (edges are irregular, not straight).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .noise import smooth_noise

# Region cover types. Fields are FIELD; the others are background (semantic class 0).
FIELD, BORDER, FOREST, CONIFER, URBAN, WATER = 0, 1, 2, 3, 4, 5
COVER_NAMES = ["field", "border", "forest", "conifer", "urban", "water"]
# Share of non-field cells by type (forest, conifer, urban, water).
BACKGROUND_TYPES = np.array([FOREST, CONIFER, URBAN, WATER])
BACKGROUND_TYPE_PROBS = np.array([0.4, 0.15, 0.3, 0.15])


@dataclass
class Layout:
    """Regions of one patch. `region` [H, W] int: index into the per-region arrays.

    Region 0 is the network of 1-px borders (roads, hedges); regions 1.. are Voronoi cells.
    `cover` [R] cover type per region, `inside_frac` [R] share of the cell's pixels inside the patch
    (void when < 0.5 for fields), `area` [R] pixels of the cell inside the patch.
    """

    region: np.ndarray
    cover: np.ndarray
    inside_frac: np.ndarray
    area: np.ndarray

    @property
    def n_regions(self) -> int:
        return len(self.cover)

    @property
    def field_regions(self) -> np.ndarray:
        """Indices of field regions that have at least one pixel in the patch."""
        return np.flatnonzero((self.cover == FIELD) & (self.area > 0))


def make_layout(rng: np.random.Generator, size: int, mean_field_px: float,
                background_share: float = 0.1, background_probs: np.ndarray | None = None) -> Layout:
    """Tessellate a `size`x`size` patch into fields of about `mean_field_px` pixels.

    background_share: fraction of cells that are forest/urban/water instead of fields.
    background_probs: shares of forest, conifer, urban, water among them (default BACKGROUND_TYPE_PROBS).
    """
    probs = BACKGROUND_TYPE_PROBS
    if background_probs is not None:
        probs = np.asarray(background_probs, float) / np.sum(background_probs)
    cell = float(np.sqrt(mean_field_px))
    margin = int(np.ceil(2 * cell))
    full = size + 2 * margin
    # Elongated fields: Voronoi in a frame rotated by theta and stretched along one axis.
    theta = rng.uniform(0, np.pi)
    stretch = rng.uniform(1.0, 1.8)
    yy, xx = np.mgrid[0:full, 0:full].astype(np.float32)
    warp = 0.12 * cell
    yy = yy + warp * smooth_noise(rng, (full, full), 1.5 * cell)
    xx = xx + warp * smooth_noise(rng, (full, full), 1.5 * cell)
    c, s = np.cos(theta), np.sin(theta)
    u = (c * yy - s * xx) / np.sqrt(stretch)
    v = (s * yy + c * xx) * np.sqrt(stretch)
    pts = np.stack([u.ravel(), v.ravel()], axis=1)
    # Jittered seed grid covering the transformed bounding box.
    lo, hi = pts.min(0) - cell, pts.max(0) + cell
    gu = np.arange(lo[0], hi[0], cell)
    gv = np.arange(lo[1], hi[1], cell)
    seeds = np.stack(np.meshgrid(gu, gv, indexing="ij"), -1).reshape(-1, 2)
    seeds = seeds + rng.uniform(-0.45, 0.45, seeds.shape) * cell
    # Irregular field sizes: merge some cells by dropping seeds.
    seeds = seeds[rng.random(len(seeds)) > 0.2]
    _, nearest = cKDTree(seeds).query(pts, workers=1)
    cells = nearest.reshape(full, full)
    # Relabel the cells present in the landscape as 1..N (0 = borders).
    uniq, cells = np.unique(cells, return_inverse=True)
    cells = cells.reshape(full, full) + 1
    n = len(uniq) + 1
    cover = np.full(n, FIELD, dtype=np.int64)
    is_bg = rng.random(n) < background_share
    cover[is_bg] = rng.choice(BACKGROUND_TYPES, size=int(is_bg.sum()), p=probs)
    cover[0] = BORDER
    # 1-px borders where the right or lower neighbour belongs to another cell, except between two
    # background cells of the same type (a forest cut by the tessellation is still one forest).
    cc = cover[cells]
    border = np.zeros((full, full), bool)
    border[:, :-1] |= (cells[:, :-1] != cells[:, 1:]) & ~((cc[:, :-1] != FIELD) & (cc[:, :-1] == cc[:, 1:]))
    border[:-1, :] |= (cells[:-1, :] != cells[1:, :]) & ~((cc[:-1, :] != FIELD) & (cc[:-1, :] == cc[1:, :]))
    region_full = np.where(border, 0, cells)
    total = np.bincount(region_full.ravel(), minlength=n)
    region = np.ascontiguousarray(region_full[margin:margin + size, margin:margin + size])
    area = np.bincount(region.ravel(), minlength=n)
    inside = np.where(total > 0, area / np.maximum(total, 1), 0.0)
    return Layout(region=region, cover=cover, inside_frac=inside, area=area)
