"""The scene stack: one multi-band GeoTIFF per acquisition date, all on one grid (docs/own_region.md).

Dates come from the file names (`*_YYYYMMDD*.tif` by default, `--date-regex` with one group) or from a
CSV `path,date`. Every scene must share CRS, transform, size and band count; reprojection is left to
gdalwarp / `rio warp`, whose call is named in the error.
"""
from __future__ import annotations

import csv
import datetime as _dt
import glob
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sitskit.errors import UserFacingError

from . import require

DEFAULT_DATE_REGEX = r"_(\d{8})(?=\D|$)"  # S2_20190412.tif, T31TCJ_20190412_L2A.tif
TIF_SUFFIXES = (".tif", ".tiff")
WARP_HINT = ("reproject every scene onto one grid first, e.g. `gdalwarp -t_srs EPSG:XXXX -tr 10 10 -te "
             "xmin ymin xmax ymax in.tif out.tif` or `rio warp in.tif out.tif --like {ref}`")


@dataclass(frozen=True)
class Scene:
    path: Path
    date: _dt.date
    mask: Path | None = None  # optional per-date cloud mask file (non-zero = cloudy)


@dataclass(frozen=True)
class Grid:
    """The common grid: `transform` in GDAL order (x0, xres, 0, y0, 0, -yres), `crs` as text."""

    crs: str
    transform: tuple[float, ...]
    height: int
    width: int
    count: int

    @property
    def affine(self):
        return require("affine").Affine.from_gdal(*self.transform)


def expand_images(images: str | list[str]) -> list[Path]:
    """A folder, a glob, one file or a list of them -> the GeoTIFF paths, sorted."""
    items = [images] if isinstance(images, (str, Path)) else list(images)
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += [q for q in p.iterdir() if q.suffix.lower() in TIF_SUFFIXES]
        elif any(ch in str(item) for ch in "*?["):
            paths += [Path(q) for q in glob.glob(str(item))]
        elif p.exists():
            paths.append(p)
        else:
            raise UserFacingError(f"--images {item}: no such file or folder")
    paths = sorted(set(paths))
    if not paths:
        raise UserFacingError(f"--images {images}: no .tif files found")
    return paths


def date_from_name(path: Path, regex: str) -> _dt.date:
    m = re.search(regex, path.name)
    if not m:
        raise UserFacingError(f"{path}: cannot read a date from the file name (expected *_YYYYMMDD*.tif; "
                              f"pass --date-regex or --dates-csv)")
    text = m.group(1) if m.groups() else m.group(0)
    try:
        return _dt.datetime.strptime(text.replace("-", ""), "%Y%m%d").date()
    except ValueError:
        raise UserFacingError(f"{path}: {text!r} in the file name is not a valid YYYYMMDD date") from None


def read_dates_csv(csv_path: str | Path) -> dict[str, _dt.date]:
    """`path,date` rows (header optional; date YYYY-MM-DD or YYYYMMDD) -> file name -> date."""
    out: dict[str, _dt.date] = {}
    try:
        with Path(csv_path).open(newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise UserFacingError(f"--dates-csv {csv_path}: cannot read it ({exc.strerror})") from None
    for i, row in enumerate(rows, 1):
        if not row or (i == 1 and row[0].strip().lower() == "path"):
            continue
        if len(row) < 2:
            raise UserFacingError(f"{csv_path}: line {i} is not 'path,date'")
        try:
            date = _dt.datetime.strptime(row[1].strip().replace("-", ""), "%Y%m%d").date()
        except ValueError:
            raise UserFacingError(f"{csv_path}: line {i}: {row[1]!r} is not a YYYY-MM-DD date") from None
        out[Path(row[0].strip()).name] = date
    return out


def list_scenes(images, dates_csv=None, date_regex: str | None = None, cloud_masks=None) -> list[Scene]:
    """Dated scenes in chronological order; refuses unparsable, missing or duplicated dates."""
    paths = expand_images(images)
    table = read_dates_csv(dates_csv) if dates_csv else None
    regex = date_regex or DEFAULT_DATE_REGEX
    dated = []
    for p in paths:
        if table is not None:
            if p.name not in table:
                raise UserFacingError(f"{p}: not listed in --dates-csv {dates_csv}")
            dated.append((table[p.name], p))
        else:
            dated.append((date_from_name(p, regex), p))
    dated.sort()
    for (d0, p0), (d1, p1) in itertools.pairwise(dated):
        if d0 == d1:
            raise UserFacingError(f"{p1}: same date {d1} as {p0}; keep one scene per date")
    masks: dict[_dt.date, Path] = {}
    if cloud_masks:
        for m in expand_images(cloud_masks):
            masks[date_from_name(m, regex)] = m
        missing = [p for d, p in dated if d not in masks]
        if missing:
            raise UserFacingError(f"{missing[0]}: no cloud mask with the same date in --cloud-masks")
    return [Scene(p, d, masks.get(d)) for d, p in dated]


def _crs_text(crs) -> str:
    if crs is None:
        return ""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def check_stack(scenes: list[Scene], n_bands: int | None, cloud_band: int | None = None) -> Grid:
    """Open every scene (and mask) once; all must match the first scene's grid. Returns that grid.

    `n_bands`: the image bands expected per scene (plus one if `cloud_band` is a band of the scene).
    """
    rasterio = require("rasterio")
    ref = None
    for s in scenes:
        for path, is_mask in ((s.path, False), (s.mask, True)):
            if path is None:
                continue
            try:
                with rasterio.open(path) as src:
                    info = (_crs_text(src.crs), tuple(src.transform.to_gdal()), src.height, src.width,
                            src.count, src.dtypes[0])
            except rasterio.errors.RasterioIOError as exc:
                raise UserFacingError(f"{path}: not a readable GeoTIFF ({exc})") from None
            crs, transform, h, w, count, dtype = info
            if not crs:
                raise UserFacingError(f"{path}: has no CRS; assign one with `gdal_edit.py -a_srs EPSG:XXXX`")
            if ref is None:
                ref = Grid(crs, transform, h, w, count)
                ref_path = path
                expected = (n_bands or count) + (1 if cloud_band else 0)
                if count != expected:
                    raise UserFacingError(f"{path}: has {count} bands, expected {expected} "
                                          f"(--bands names {n_bands}{' + --cloud-band' if cloud_band else ''})")
            hint = WARP_HINT.format(ref=ref_path)
            if crs != ref.crs:
                raise UserFacingError(f"{path}: CRS {crs} differs from {ref_path} ({ref.crs}); {hint}")
            if (h, w) != (ref.height, ref.width):
                raise UserFacingError(f"{path}: size {h}x{w} px differs from {ref_path} "
                                      f"({ref.height}x{ref.width}); {hint}")
            if not np.allclose(transform, ref.transform, rtol=0, atol=1e-6 * abs(ref.transform[1])):
                raise UserFacingError(f"{path}: geotransform {transform} differs from {ref_path} "
                                      f"({ref.transform}); {hint}")
            if is_mask:
                if count != 1:
                    raise UserFacingError(f"{path}: a cloud mask must have 1 band, it has {count}")
            else:
                if count != ref.count:
                    raise UserFacingError(f"{path}: has {count} bands, {ref_path} has {ref.count}")
                if np.dtype(dtype).kind not in "iu":
                    raise UserFacingError(f"{path}: dtype {dtype}; expected integer reflectance x 10 000 "
                                          f"(e.g. uint16 L2A); scale float scenes with gdal_calc.py")
    return ref


def read_scene_window(scene: Scene, row: int, col: int, size_h: int, size_w: int,
                      cloud_band: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One date of one patch: int16 data [C, h, w] and valid bool [h, w] (not nodata, not cloudy).

    Raises UserFacingError naming the file if values do not fit int16.
    """
    rasterio = require("rasterio")
    window = rasterio.windows.Window(col, row, size_w, size_h)
    with rasterio.open(scene.path) as src:
        raw = src.read(window=window)
        nodata = src.nodata
    valid = np.ones(raw.shape[1:], bool)
    if cloud_band:
        valid &= raw[cloud_band - 1] == 0
        raw = np.delete(raw, cloud_band - 1, axis=0)
    if nodata is not None:
        valid &= ~(raw == nodata).all(0)
    if scene.mask is not None:
        with rasterio.open(scene.mask) as src:
            valid &= src.read(1, window=window) == 0
    if raw.size and (raw.min() < -32768 or raw.max() > 32767):
        raise UserFacingError(f"{scene.path}: values outside int16 (max {raw.max()}) in rows {row}..{row + size_h}; "
                              f"expected reflectance x 10 000")
    return raw.astype(np.int16), valid


def band_statistics(scenes: list[Scene], cloud_band: int | None = None, max_px: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std [C] over all dates, from a decimated read (at most max_px per side), valid
    pixels only: the file's `/norm/S2` statistics (the `norm="source"` option)."""
    rasterio = require("rasterio")
    sums = sq = None
    n = 0
    for s in scenes:
        with rasterio.open(s.path) as src:
            f = max(1, int(np.ceil(max(src.height, src.width) / max_px)))
            shape = (src.count, max(1, src.height // f), max(1, src.width // f))
            raw = src.read(out_shape=shape, resampling=rasterio.enums.Resampling.nearest).astype(np.float64)
            nodata = src.nodata
        if cloud_band:
            keep = raw[cloud_band - 1] == 0
            raw = np.delete(raw, cloud_band - 1, axis=0)
        else:
            keep = np.ones(raw.shape[1:], bool)
        if nodata is not None:
            keep &= ~(raw == nodata).all(0)
        x = raw[:, keep]
        sums = x.sum(1) if sums is None else sums + x.sum(1)
        sq = (x ** 2).sum(1) if sq is None else sq + (x ** 2).sum(1)
        n += x.shape[1]
    if not n:
        raise UserFacingError(f"{scenes[0].path}: no valid pixel in any scene (all nodata or cloudy)")
    mean = sums / n
    std = np.sqrt(np.maximum(sq / n - mean ** 2, 0.0))
    return mean, np.where(std > 0, std, 1.0)
