"""MTLCC simulator: one tile-year in memory (`simulate_mtlcc_tile`) and the on-disk writer.

Layout written (the MTLCC release), with F = 10 * size (480 for 48 px, 240 for 24 px):
    F/data16/<tileid>.tfrecord.gz, F/data17/<tileid>.tfrecord.gz  (one gzip TFRecord, one Example each)
    F/tileids/{train_fold0,test_fold0,eval}.tileids  F/classes.txt  F/dataset.ini  F/geotransforms.csv
Records hold L1C top-of-atmosphere DN (×10 000) as int64: x10 [T,H,W,4] (B4,B3,B2,B8), x20
[T,H/2,W/2,6] (B5,B6,B7,B8A,B11,B12; 2×2 block means), x60 [T,H/6,W/6,3] (B1,B9,B10; 6×6 block
means), dates/doy and dates/year [T], labels [T,H,W] (original MTLCC class ids). T = nobs, zero-padded
at the end (padding: x = 0, doy = 0, year = the series' year).
"""
from __future__ import annotations

import datetime as dt
import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sitskit.constants import MTLCC_CLASSES, MTLCC_SRID, MTLCC_UNKNOWN, MTLCC_YEARS
from sitskit.errors import UserFacingError
from sitskit.formats.mtlcc_record import encode_mtlcc_example
from sitskit.formats.tfrecord import write_tfrecord
from sitskit.parallel import ordered_map

from . import atmosphere, scene
from .output import atomic_output_dir
from .parcels import FIELD, make_layout
from .phenology import BACKGROUND_PROGRAMS, MTLCC_PROGRAMS, year_climate
from .spectra import MTLCC_BAND_IDX

NOBS = 46                     # fixed series length T of the records (dataset.ini nobs)
MEAN_FIELD_PX = 120           # ~1.2 ha fields (Bavaria)
BACKGROUND_SHARE = 0.12
# Non-field cells: Bavarian woods are mostly spruce/pine; villages and farmsteads; little open water in the
# agricultural Tertiary hills north of Munich (PASTIS default: forest .4, conifer .15, urban .3, water .15).
BACKGROUND_PROBS = (0.3, 0.4, 0.25, 0.05)   # forest, conifer, urban, water
UNLABELLED_SHARE = 0.08       # fields without a label (class "unknown" = 0)
P_CLOUDY = 0.45               # L1C series are not cloud-filtered: more and larger clouds than PASTIS
MAX_CLOUD_COVER = 1.0
# Class frequencies (ours; MTLCC publishes none): as skewed as PASTIS, meadow/wheat/maize dominate.
MTLCC_WEIGHTS: dict[int, float] = {
    3: 30, 22: 20, 26: 18, 23: 8, 5: 5, 25: 4, 1: 3, 12: 3, 16: 2.5, 24: 1.5, 9: 1.2, 2: 1.2, 8: 1.0,
    13: 0.6, 15: 0.6, 19: 0.5, 17: 0.4,
}
PERMANENT = {3, 8, 19}        # meadow, hop, asparagus stay from one year to the next
ROTATION_KEEP = 0.15          # chance an arable field grows the same crop again next year
# Tiles of the simulated AOI on a UTM 32N grid north of Munich.
AOI_ORIGIN = (680000.0, 5400000.0)
AOI_COLS = 40

_CLASS_IDS = np.array(sorted(MTLCC_WEIGHTS))
_CLASS_WEIGHTS = np.array([MTLCC_WEIGHTS[c] for c in _CLASS_IDS], dtype=np.float64)
_ARABLE = np.array([c not in PERMANENT for c in _CLASS_IDS])


@dataclass
class MtlccTile:
    """One tile and year: record arrays plus ground truth.

    x10/x20/x60 [nobs, h, w, C] int64 and doy/years [nobs] as in the record; n_obs: real observations
    (the rest is padding); labels [H, W] original class ids (0 = unknown); crop_class [H, W] class of
    every field pixel, unlabelled fields included; region [H, W] layout region (same in every year);
    cloud_mask [n_obs, H, W] bool: pixels under cloud, haze or shadow.
    """

    id: int
    year: int
    x10: np.ndarray
    x20: np.ndarray
    x60: np.ndarray
    doy: np.ndarray
    years: np.ndarray
    labels: np.ndarray
    crop_class: np.ndarray
    region: np.ndarray
    cloud_mask: np.ndarray
    n_obs: int

    def example(self) -> dict[str, object]:
        return encode_mtlcc_example(self.x10, self.x20, self.x60, self.doy, self.years, self.labels)


def _rngs(seed: int, tile_id: int, year: int | None) -> dict[str, np.random.Generator]:
    names = ("layout", "texture", "classes", "pheno", "dates", "weather", "clouds", "noise", "labels")
    seqs = np.random.SeedSequence([seed, tile_id, 0 if year is None else year, 0x3C7]).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, seqs)}


def draw_doys(rng: np.random.Generator, year: int, nobs: int) -> np.ndarray:
    """Sorted days of year of the tile's acquisitions (between 0.75 * nobs and nobs of them).

    2016: Sentinel-2A alone (10-day revisit, two overlapping orbits 3 days apart); 2017 on: 5-day
    revisit. Summer acquisitions are likelier to pass the scene-level cloud filter.
    """
    n_days = 366 if year % 4 == 0 else 365
    revisit = 10 if year <= 2016 else 5
    phase = int(rng.integers(1, revisit + 1))
    slots = np.arange(phase, n_days + 1, revisit)
    if revisit == 10:
        slots = np.sort(np.concatenate([slots, slots[slots + 3 <= n_days] + 3]))
    month = np.array([(dt.date(year, 1, 1) + dt.timedelta(days=int(d) - 1)).month for d in slots])
    clear = 0.3 + 0.6 * np.exp(-0.5 * ((month - 7) / 2.2) ** 2)
    n = min(int(rng.integers(int(0.75 * nobs), nobs + 1)), len(slots))
    return np.sort(rng.choice(slots, size=n, replace=False, p=clear / clear.sum()))


def check_size(size: int) -> None:
    if size <= 0 or size % 6:
        raise UserFacingError(f"--size {size}: MTLCC tiles must be a multiple of 6 px (the 60 m bands are "
                              f"6×6 blocks of 10 m pixels); use 48 (folder 480) or 24 (folder 240)")


def tile_classes(seed: int, tile_id: int, year: int, n_regions: int, cover: np.ndarray) -> np.ndarray:
    """Crop class per region in `year`: drawn for the base year (2016), then rotated once per year
    forwards (later years) or backwards (earlier years, an independent stream).

    Permanent crops (meadow, hop, asparagus) stay; arable fields change crop with prob. 1 - ROTATION_KEEP.
    """
    base = MTLCC_YEARS[0]
    rng = np.random.default_rng([seed, tile_id, 0xC1A55])
    fields = cover == FIELD
    cls = np.where(fields, rng.choice(_CLASS_IDS, size=n_regions, p=_CLASS_WEIGHTS / _CLASS_WEIGHTS.sum()), 0)
    arable_w = np.where(_ARABLE, _CLASS_WEIGHTS, 0)
    if year < base:
        rng = np.random.default_rng([seed, tile_id, 0xBAC4])
    for _ in range(abs(year - base)):
        redraw = fields & ~np.isin(cls, list(PERMANENT)) & (rng.random(n_regions) > ROTATION_KEEP)
        new = rng.choice(_CLASS_IDS, size=n_regions, p=arable_w / arable_w.sum())
        cls = np.where(redraw, new, cls)
    return cls


def simulate_mtlcc_tile(tile_id: int, year: int, size: int = 48, seed: int = 0,
                        nobs: int = NOBS) -> MtlccTile:
    """Simulate one tile in one year. The field layout depends on (seed, tile_id) only, so data16 and
    data17 show the same fields with rotated crops, a shifted calendar and different weather."""
    check_size(size)
    lay_r = _rngs(seed, tile_id, None)
    r = _rngs(seed, tile_id, year)
    layout = make_layout(lay_r["layout"], size, MEAN_FIELD_PX, BACKGROUND_SHARE, BACKGROUND_PROBS)
    texture = scene.draw_texture(lay_r["texture"], layout)
    cls = tile_classes(seed, tile_id, year, layout.n_regions, layout.cover)
    programs = [MTLCC_PROGRAMS[int(c)] if f else BACKGROUND_PROGRAMS[int(cv)]
                for c, f, cv in zip(cls, layout.cover == FIELD, layout.cover)]
    classes = scene.RegionClasses(cls=cls, programs=programs)
    shift, cloud_factor, rain = year_climate(year)

    doy = draw_doys(r["dates"], year, nobs)
    days = doy - 1  # season day = days since 1 January
    n = len(doy)
    fractions = scene.region_fractions(r["pheno"], classes, days, shift)
    moisture = atmosphere.soil_moisture(r["weather"], days, rain, (0, 365))
    aerosol = r["weather"].lognormal(0.0, 0.35, n).astype(np.float32)
    frac_pix = scene.pixel_fractions(fractions, layout, texture)
    clouds = atmosphere.draw_clouds(r["clouds"], n, (size, size), min(P_CLOUDY * cloud_factor, 0.9),
                                    max_cover=MAX_CLOUD_COVER)
    toa = scene.render_reflectance(frac_pix, moisture, texture, (size, size), MTLCC_BAND_IDX, clouds, aerosol)
    idx10, idx20, idx60 = MTLCC_BAND_IDX[:4], MTLCC_BAND_IDX[4:10], MTLCC_BAND_IDX[10:]
    x10 = scene.add_noise_and_quantise(r["noise"], toa[:, :4], idx10, np.int64)
    x20 = scene.add_noise_and_quantise(r["noise"], scene.block_mean(toa[:, 4:10], 2), idx20, np.int64)
    x60 = scene.add_noise_and_quantise(r["noise"], scene.block_mean(toa[:, 10:], 6), idx60, np.int64)

    def pad(a: np.ndarray) -> np.ndarray:  # [n, C, h, w] -> [nobs, h, w, C], zero-padded at the end
        out = np.zeros((nobs, a.shape[2], a.shape[3], a.shape[1]), np.int64)
        out[:n] = a.transpose(0, 2, 3, 1)
        return out

    # Labels: unlabelled fields (random share) and background are "unknown" (0).
    labelled = r["labels"].random(layout.n_regions) >= UNLABELLED_SHARE
    label_region = np.where((layout.cover == FIELD) & labelled, cls, MTLCC_UNKNOWN)
    doy_padded = np.zeros(nobs, np.int64)
    doy_padded[:n] = doy
    return MtlccTile(id=tile_id, year=year, x10=pad(x10), x20=pad(x20), x60=pad(x60), doy=doy_padded,
                     years=np.full(nobs, year, np.int64), labels=label_region[layout.region].astype(np.int64),
                     crop_class=cls[layout.region], region=layout.region, cloud_mask=clouds.mask, n_obs=n)


# ---------------------------------------------------------------------------------------------- writer
def default_tile_ids(n: int) -> list[int]:
    return list(range(n))


def split_of(position: int) -> str:
    """Deterministic split by position in the sorted id list: 3/5 train, 1/5 test, 1/5 eval."""
    return {3: "test_fold0", 4: "eval"}.get(position % 5, "train_fold0")


def _write_gzip_record(path: Path, example: dict[str, object]) -> None:
    """One-Example gzip TFRecord. Framing by `write_tfrecord`; gzip at level 6 because the default level
    9 is ~20x slower on these highly repetitive int64 buffers for a 2 % smaller file."""
    raw = path.with_name(path.name[:-3] + ".raw")
    write_tfrecord(raw, [example], compression=None)
    with open(raw, "rb") as src, gzip.GzipFile(path, "wb", compresslevel=6, mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


def _check_ids(ids, option: str) -> list[int]:
    ids = [int(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise UserFacingError(f"{option}: duplicate tile ids in {ids}")
    if any(i < 0 for i in ids):
        raise UserFacingError(f"{option}: tile ids must be non-negative integers, got {ids}")
    return ids


def _write_tile_year(job: tuple) -> None:
    """Simulate one tile-year and write its gzip TFRecord (a pool task of `simulate_mtlcc`)."""
    path, tid, year, size, seed = job
    _write_gzip_record(path, simulate_mtlcc_tile(tid, year, size=size, seed=seed).example())


def simulate_mtlcc(out_dir, n_tiles: int = 8, size: int = 48, seed: int = 0,
                   years: tuple[int, ...] = (2016, 2017), ids: list[int] | None = None,
                   test_ids: list[int] | None = None, eval_ids: list[int] | None = None,
                   workers: int = 0) -> Path:
    """Write a simulated MTLCC dataset (gzip TFRecords) under `out_dir/<10*size>/`; returns `out_dir`.

    Tiles: `ids` if given, else 0..n_tiles-1. Splits: by position in the sorted ids (see `split_of`),
    unless `test_ids` / `eval_ids` are given: then those tiles (simulated too) form test_fold0.tileids /
    eval.tileids and every other tile is in train_fold0.tileids (e.g. to reproduce a published protocol).
    `workers` > 0 simulates tile-years in that many processes (same files: deterministic per tile-year).
    """
    check_size(size)
    explicit = test_ids is not None or eval_ids is not None
    test_ids = _check_ids(test_ids or [], "--test-ids")
    eval_ids = _check_ids(eval_ids or [], "--eval-ids")
    if set(test_ids) & set(eval_ids):
        raise UserFacingError(f"tiles {sorted(set(test_ids) & set(eval_ids))} are in both --test-ids and --eval-ids")
    if ids is not None:
        ids = _check_ids(ids, "--ids")
    elif not explicit:
        ids = default_tile_ids(n_tiles)
    ids = sorted(set(ids or []) | set(test_ids) | set(eval_ids))
    if not ids:
        raise UserFacingError("nothing to simulate: --patches must be >= 1")
    years = tuple(int(y) for y in years)
    bad = [y for y in years if not 1000 <= y <= 9999]
    if bad or not years or len(set(years)) != len(years):
        raise UserFacingError(f"--year {' '.join(map(str, years))}: give distinct four-digit years, e.g. 2016 2017")
    if len({y % 100 for y in years}) != len(years):
        raise UserFacingError(f"--year {' '.join(map(str, years))}: years share a folder name data<yy>")
    folder = str(10 * size)
    with atomic_output_dir(out_dir) as tmp:
        root = tmp / folder
        (root / "tileids").mkdir(parents=True)
        for y in years:
            (root / f"data{y % 100:02d}").mkdir()
        jobs = [(root / f"data{y % 100:02d}" / f"{tid}.tfrecord.gz", tid, y, size, seed) for tid in ids for y in years]
        for _ in tqdm(ordered_map(_write_tile_year, jobs, workers), total=len(jobs), desc="simulate MTLCC",
                      unit="tile-year"):
            pass
        splits: dict[str, list[int]] = {"train_fold0": [], "test_fold0": [], "eval": []}
        for k, tid in enumerate(ids):
            if explicit:
                name = "test_fold0" if tid in test_ids else "eval" if tid in eval_ids else "train_fold0"
            else:
                name = split_of(k)
            splits[name].append(tid)
        for name, members in splits.items():
            (root / "tileids" / f"{name}.tileids").write_text("".join(f"{t}\n" for t in members))
        (root / "classes.txt").write_text("".join(f"{i}|{name}\n" for i, name in MTLCC_CLASSES.items()))
        ini = []
        for y in years:
            ini += [f"[{y}]", f"datadir = data{y % 100:02d}", f"pix10 = {size}", f"nobs = {NOBS}",
                    "nbands10 = 4", "nbands20 = 6", "nbands60 = 3", "tiletable = geotransforms.csv", ""]
        (root / "dataset.ini").write_text("\n".join(ini))
        rows = []
        for tid in ids:
            xmin = AOI_ORIGIN[0] + (tid % AOI_COLS) * 10.0 * size
            ymax = AOI_ORIGIN[1] - (tid // AOI_COLS) * 10.0 * size
            rows.append(f"{tid},{xmin:.1f},10.0,0.0,{ymax:.1f},0.0,-10.0,{MTLCC_SRID}\n")
        (root / "geotransforms.csv").write_text("".join(rows))
    return Path(out_dir)
