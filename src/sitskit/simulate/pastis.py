"""PASTIS / PASTIS-R simulator: one patch in memory (`simulate_pastis_patch`) and the on-disk writer.

Layout written (the PASTIS release):
    metadata.geojson, NORM_S2_patch.json (+ NORM_S1A/S1D_patch.json with S1),
    DATA_S2/S2_<id>.npy int16 [T, 10, H, W], DATA_S1A|S1D/S1A|S1D_<id>.npy float32 [T, 3, H, W],
    ANNOTATIONS/TARGET_<id>.npy uint8 [3, H, W], ANNOTATIONS/ParcelIDs_<id>.npy int32 [H, W],
    INSTANCE_ANNOTATIONS/HEATMAP_<id>.npy float32, INSTANCES_<id>.npy int64, ZONES_<id>.npy int64 [H, W].
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sitskit.constants import (
    PASTIS_BANDS,
    PASTIS_CRS,
    PASTIS_PARCEL_COUNTS,
    PASTIS_TILES,
    PASTIS_VOID,
    S2_RESOLUTION_M,
)
from sitskit.errors import UserFacingError
from sitskit.parallel import ordered_map

from . import atmosphere, scene
from .instances import centerness, instance_codes
from .output import atomic_output_dir
from .parcels import FIELD, make_layout
from .phenology import PASTIS_PROGRAMS, year_climate
from .spectra import PASTIS_BAND_IDX

MEAN_FIELD_PX = 330           # ~3.3 ha fields at 10 m
BACKGROUND_SHARE = 0.1        # forest / urban / water cells
VOID_INSIDE_FRAC = 0.5        # parcels with less than half their area inside the patch are void
P_CLOUDY = 0.28               # share of partly cloudy images (fully cloudy ones were removed in PASTIS)
N_DATES_RANGE = (38, 61)      # S2 dates per patch (README)
S1_REPEAT_DAYS = 6            # S1A + S1B, one orbit direction
# Per-tile phenology offset (days): the south (t31tfj) is ahead, the north-east behind.
TILE_SHIFT = {"t30uxv": 3.0, "t31tfj": -6.0, "t31tfm": 0.0, "t32ulu": 4.0}
# Lambert-93 (EPSG:2154) corner of each tile's patch grid (approximate tile locations, metres).
TILE_ORIGIN = {"t30uxv": (380000.0, 6840000.0), "t31tfj": (830000.0, 6310000.0),
               "t31tfm": (830000.0, 6610000.0), "t32ulu": (980000.0, 6800000.0)}
PATCH_GRID_COLS = 40
BANDS_10M = [i for i, b in enumerate(PASTIS_BANDS) if S2_RESOLUTION_M[b] == 10]  # B2, B3, B4, B8
BANDS_20M = [i for i, b in enumerate(PASTIS_BANDS) if S2_RESOLUTION_M[b] == 20]  # B5-B7, B8A, B11, B12

CLASS_IDS = np.array(sorted(PASTIS_PROGRAMS))
CLASS_WEIGHTS = np.array([PASTIS_PARCEL_COUNTS[c] for c in CLASS_IDS], dtype=np.float64)


@dataclass
class PastisPatch:
    """One simulated patch with its ground truth. Arrays are what the files hold, plus:

    crop_class [H, W]: class of every parcel pixel, void parcels included (TARGET channel 1);
    cover [H, W]: parcels.COVER_NAMES index (TARGET channel 2); cloud_mask [T, H, W] bool: pixels under
    cloud, haze or shadow; region_class: class per layout region; region [H, W]: layout region index.
    """

    id: int
    tile: str
    dates: list[dt.date]
    s2: np.ndarray
    target: np.ndarray
    parcel_ids: np.ndarray
    instances: np.ndarray
    heatmap: np.ndarray
    zones: np.ndarray
    cloud_mask: np.ndarray
    region: np.ndarray
    region_class: np.ndarray
    s1: dict[str, tuple[list[dt.date], np.ndarray]] = field(default_factory=dict)

    @property
    def semantic(self) -> np.ndarray:
        return self.target[0]

    @property
    def crop_class(self) -> np.ndarray:
        return self.target[1]

    @property
    def cover(self) -> np.ndarray:
        return self.target[2]


def tile_of(patch_id: int) -> str:
    """Tile name of a PASTIS-style id (10000+ -> first tile, ..., 40000+ -> fourth)."""
    k = patch_id // 10000 - 1
    if not 0 <= k < len(PASTIS_TILES):
        raise UserFacingError(f"patch id {patch_id}: PASTIS ids are 10000..49999 "
                              f"(tile = id // 10000: {', '.join(PASTIS_TILES)})")
    return PASTIS_TILES[k]


def default_ids(n: int) -> list[int]:
    """n ids spread round-robin over the 4 tiles: 10000, 20000, 30000, 40000, 10001, …"""
    return sorted(10000 * (i % 4 + 1) + i // 4 for i in range(n))


def season_day(d: dt.date, year: int) -> int:
    return (d - dt.date(year, 1, 1)).days


def draw_s2_dates(rng: np.random.Generator, year: int) -> list[dt.date]:
    """38–61 acquisition dates, Sept (year-1) – early Nov (year), on the 5-day S2 revisit grid.

    Clear-sky acquisitions are likelier in summer, so winter gaps are longer (median gap ≈ 5 days).
    """
    start = dt.date(year - 1, 9, 1) + dt.timedelta(days=int(rng.integers(0, 5)))
    end = dt.date(year, 11, 5)
    slots = np.arange(0, (end - start).days + 1, 5)
    month = np.array([(start + dt.timedelta(days=int(d))).month for d in slots])
    clear = 0.35 + 0.6 * np.exp(-0.5 * ((month - 7) / 2.2) ** 2)
    n = int(rng.integers(N_DATES_RANGE[0], N_DATES_RANGE[1] + 1))
    chosen = np.sort(rng.choice(slots, size=n, replace=False, p=clear / clear.sum()))
    return [start + dt.timedelta(days=int(d)) for d in chosen]


def draw_s1_dates(rng: np.random.Generator, year: int) -> list[dt.date]:
    """About 70 dates of one orbit direction (6-day repeat, a few missing acquisitions)."""
    start = dt.date(year - 1, 9, 1) + dt.timedelta(days=int(rng.integers(0, S1_REPEAT_DAYS)))
    slots = np.arange(0, (dt.date(year, 11, 5) - start).days + 1, S1_REPEAT_DAYS)
    keep = rng.random(len(slots)) > 0.04
    return [start + dt.timedelta(days=int(d)) for d in slots[keep]]


def _rngs(seed: int, patch_id: int) -> dict[str, np.random.Generator]:
    """Independent streams per aspect so that e.g. --with-s1 does not change the S2 data."""
    names = ("layout", "classes", "pheno", "dates", "weather", "texture", "clouds", "noise", "s1")
    seqs = np.random.SeedSequence([seed, patch_id, 0x5A5]).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, seqs)}


def check_size(size: int) -> None:
    if size < 8 or size % 2:
        raise UserFacingError(f"--size {size}: PASTIS patches must be an even number of pixels >= 8 "
                              f"(the 20 m bands are simulated on a 2×2 grid); the real size is 128")


def simulate_pastis_patch(patch_id: int, size: int = 128, seed: int = 0, with_s1: bool = False,
                          year: int = 2019, class_weights: dict[int, float] | None = None) -> PastisPatch:
    """Simulate one PASTIS patch (deterministic in seed and patch_id). `year` = harvest year.

    class_weights: optional {class id 1..18: weight} replacing the PASTIS parcel frequencies (e.g. to
    oversample rare classes in experiments); classes left out never occur.
    """
    check_size(size)
    tile = tile_of(patch_id)
    r = _rngs(seed, patch_id)
    shift, cloud_factor, rain = year_climate(year)
    shift += TILE_SHIFT[tile]
    layout = make_layout(r["layout"], size, MEAN_FIELD_PX, BACKGROUND_SHARE)
    weights = CLASS_WEIGHTS
    if class_weights is not None:
        unknown = set(class_weights) - set(CLASS_IDS.tolist())
        if unknown or not any(v > 0 for v in class_weights.values()):
            raise UserFacingError(f"class_weights {class_weights}: give positive weights for crop ids 1..18")
        weights = np.array([float(class_weights.get(int(c), 0.0)) for c in CLASS_IDS])
    classes = scene.assign_classes(r["classes"], layout, CLASS_IDS, weights, PASTIS_PROGRAMS)

    dates = draw_s2_dates(r["dates"], year)
    s1_dates = {}
    if with_s1:
        s1_dates = {sat: draw_s1_dates(r["dates"], year) for sat in ("S1A", "S1D")}
    all_dates = sorted(set(dates).union(*[set(v) for v in s1_dates.values()]))
    days = np.array([season_day(d, year) for d in all_dates])
    fractions = scene.region_fractions(r["pheno"], classes, days, shift)  # [R, T_all, 6]
    window = (season_day(dt.date(year - 1, 9, 1), year), season_day(dt.date(year, 11, 30), year))
    moisture = atmosphere.soil_moisture(r["weather"], days, rain, window)
    texture = scene.draw_texture(r["texture"], layout)
    pos = {d: i for i, d in enumerate(all_dates)}

    sel = [pos[d] for d in dates]
    frac_pix = scene.pixel_fractions(fractions[:, sel], layout, texture)
    clouds = atmosphere.draw_clouds(r["clouds"], len(dates), (size, size), P_CLOUDY * cloud_factor)
    refl = scene.render_reflectance(frac_pix, moisture[sel], texture, (size, size), PASTIS_BAND_IDX, clouds)
    # 20 m bands: rendered on the 20 m grid (2×2 means, their own noise), then bilinearly upsampled
    # to 10 m as in the PASTIS release, so they are smoother than the 10 m bands.
    dn = np.empty_like(refl)
    dn[:, BANDS_10M] = scene.add_noise(r["noise"], refl[:, BANDS_10M], [PASTIS_BAND_IDX[b] for b in BANDS_10M])
    coarse = scene.add_noise(r["noise"], scene.block_mean(refl[:, BANDS_20M], 2),
                             [PASTIS_BAND_IDX[b] for b in BANDS_20M])
    dn[:, BANDS_20M] = scene.upsample_bilinear(coarse)
    s2 = scene.quantise(dn, np.int16)

    s1 = {}
    for sat, sdates in s1_dates.items():
        idx = [pos[d] for d in sdates]
        fp = scene.pixel_fractions(fractions[:, idx], layout, texture)
        s1[sat] = (sdates, atmosphere.s1_backscatter(r["s1"], fp, moisture[idx]).reshape(
            len(idx), 3, size, size))

    # Labels: parcels mostly outside the patch are void; background keeps 0.
    fields = layout.cover == FIELD
    void = fields & (layout.inside_frac < VOID_INSIDE_FRAC)
    sem_region = np.where(void, PASTIS_VOID, classes.cls)
    semantic = sem_region[layout.region]
    crop = classes.cls[layout.region]
    # Raw parcel identifiers: unique over the dataset, 0 outside parcels.
    parcel_region = np.where(fields, patch_id * 1000 + np.arange(layout.n_regions), 0)
    parcel_ids = parcel_region[layout.region].astype(np.int32)
    instances = instance_codes(parcel_ids, semantic)
    heatmap, zones = centerness(instances)
    target = np.stack([semantic, crop, layout.cover[layout.region]]).astype(np.uint8)
    return PastisPatch(id=patch_id, tile=tile, dates=dates, s2=s2, target=target, parcel_ids=parcel_ids,
                       instances=instances, heatmap=heatmap, zones=zones, cloud_mask=clouds.mask,
                       region=layout.region, region_class=classes.cls, s1=s1)


def pastis_parcel_classes(patch_id: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """Semantic class (1..18, or 19 = void) of every parcel visible in the patch, in region order.

    Same draws as `simulate_pastis_patch` (layout and classes only, no rendering): cheap enough to
    measure class frequencies over thousands of parcels.
    """
    r = _rngs(seed, patch_id)
    layout = make_layout(r["layout"], size, MEAN_FIELD_PX, BACKGROUND_SHARE)
    classes = scene.assign_classes(r["classes"], layout, CLASS_IDS, CLASS_WEIGHTS, PASTIS_PROGRAMS)
    visible = layout.field_regions
    void = layout.inside_frac[visible] < VOID_INSIDE_FRAC
    return np.where(void, PASTIS_VOID, classes.cls[visible])


# ---------------------------------------------------------------------------------------------- writer
def _footprint(tile: str, patch_id: int, size: int) -> list[list[float]]:
    x0, y0 = TILE_ORIGIN[tile]
    j = patch_id % 10000
    side = 10.0 * size
    xmin = x0 + (j % PATCH_GRID_COLS) * side
    ymax = y0 - (j // PATCH_GRID_COLS) * side
    return [[xmin, ymax], [xmin + side, ymax], [xmin + side, ymax - side], [xmin, ymax - side], [xmin, ymax]]


def _date_dict(dates: list[dt.date]) -> dict[str, int]:
    return {str(i): int(d.strftime("%Y%m%d")) for i, d in enumerate(dates)}


def _patch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std over (T, H, W) of one patch [T, C, H, W] (the reference's first step)."""
    x = x.astype(np.float64)
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def _norm_json(stats: dict[int, list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, dict[str, list[float]]]:
    """Fold_k -> mean/std = average over the fold's patches of the per-patch statistics.

    A fold without patches (fewer than 5 patches simulated) gets the average over all patches, so
    that every loader finds Fold_1..Fold_5.
    """
    everything = [s for v in stats.values() for s in v]
    out = {}
    for fold in range(1, 6):
        items = stats.get(fold) or everything
        out[f"Fold_{fold}"] = {"mean": np.mean([m for m, _ in items], axis=0).tolist(),
                               "std": np.mean([s for _, s in items], axis=0).tolist()}
    return out


def check_ids(ids: list[int]) -> list[int]:
    if len(set(ids)) != len(ids):
        raise UserFacingError(f"--ids: duplicate patch ids in {ids}")
    for i in ids:
        tile_of(i)
    return sorted(ids)


def _write_patch(job: tuple) -> tuple[dict, dict]:
    """Simulate one patch and write its arrays under `tmp` -> (geojson properties, {sat: (mean, std)}).
    A pool task of `simulate_pastis` (deterministic in seed and id, so the order of workers does not matter)."""
    tmp, pid, fold, size, seed, with_s1, year = job
    p = simulate_pastis_patch(pid, size=size, seed=seed, with_s1=with_s1, year=year)
    np.save(tmp / "DATA_S2" / f"S2_{pid}.npy", p.s2)
    stats = {"S2": _patch_stats(p.s2)}
    props = {"ID_PATCH": pid, "Fold": fold, "TILE": p.tile,
             "N_Parcel": int(len(np.unique(p.instances)) - 1),
             "Parcel_Cover": round(float((p.parcel_ids != 0).mean()), 4),
             "dates-S2": _date_dict(p.dates)}
    for sat, (sdates, arr) in p.s1.items():
        np.save(tmp / f"DATA_{sat}" / f"{sat}_{pid}.npy", arr)
        stats[sat] = _patch_stats(arr)
        props[f"dates-{sat}"] = _date_dict(sdates)
    np.save(tmp / "ANNOTATIONS" / f"TARGET_{pid}.npy", p.target)
    np.save(tmp / "ANNOTATIONS" / f"ParcelIDs_{pid}.npy", p.parcel_ids)
    np.save(tmp / "INSTANCE_ANNOTATIONS" / f"HEATMAP_{pid}.npy", p.heatmap)
    np.save(tmp / "INSTANCE_ANNOTATIONS" / f"INSTANCES_{pid}.npy", p.instances)
    np.save(tmp / "INSTANCE_ANNOTATIONS" / f"ZONES_{pid}.npy", p.zones)
    return props, stats


def simulate_pastis(out_dir, n_patches: int = 8, size: int = 128, seed: int = 0, with_s1: bool = False,
                    ids: list[int] | None = None, year: int = 2019, workers: int = 0) -> Path:
    """Write a simulated PASTIS (PASTIS-R with `with_s1`) dataset to `out_dir`; returns its path.

    Patch ids: `ids` if given (10000..49999, tile = id // 10000), else `default_ids(n_patches)`.
    Folds 1..5 are assigned round-robin over the sorted ids. Deterministic in (seed, id, size, year):
    `workers` > 0 simulates patches in that many processes and writes the same files.
    """
    check_size(size)
    if not 1000 < year < 10000:
        raise UserFacingError(f"--year {year}: give the four-digit harvest year (2019 = Sept 2018 - Nov 2019)")
    ids = check_ids(list(ids)) if ids is not None else default_ids(n_patches)
    if not ids:
        raise UserFacingError("nothing to simulate: --patches must be >= 1")
    sats = ["S2"] + (["S1A", "S1D"] if with_s1 else [])
    with atomic_output_dir(out_dir) as tmp:
        for sub in [f"DATA_{s}" for s in sats] + ["ANNOTATIONS", "INSTANCE_ANNOTATIONS"]:
            (tmp / sub).mkdir()
        features, stats = [], {s: {} for s in sats}
        jobs = [(tmp, pid, k % 5 + 1, size, seed, with_s1, year) for k, pid in enumerate(ids)]
        results = ordered_map(_write_patch, jobs, workers)
        for (_, pid, fold, *_), (props, patch_stats) in zip(jobs, tqdm(results, total=len(jobs),
                                                                      desc="simulate PASTIS", unit="patch")):
            for sat, st in patch_stats.items():
                stats[sat].setdefault(fold, []).append(st)
            features.append({"type": "Feature", "id": str(pid), "properties": props,
                             "geometry": {"type": "Polygon", "coordinates": [_footprint(props["TILE"], pid, size)]}})
        meta = {"type": "FeatureCollection", "name": "metadata",
                "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:{PASTIS_CRS.replace(':', '::')}"}},
                "features": features}
        (tmp / "metadata.geojson").write_text(json.dumps(meta))
        for sat in sats:
            (tmp / f"NORM_{sat}_patch.json").write_text(json.dumps(_norm_json(stats[sat])))
    return Path(out_dir)
