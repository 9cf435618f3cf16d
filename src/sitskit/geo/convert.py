"""`python data_prep.py geotiff …`: dated GeoTIFF scenes (+ parcels) -> one sitskit HDF5 file.

The area is cut into patches (sitskit.geo.patches); each patch is read from every scene by window,
validated, labelled (sitskit.geo.labels) and written by the common writer (data_prep.runner /
h5schema.H5Writer: temp file, per-patch commit, --resume, --workers, atomic rename). Layout and
attributes: docs/hdf5_format.md and docs/own_region.md.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from sitskit import constants as C
from sitskit.data_prep import runner
from sitskit.data_prep.runner import PatchError, PatchRecord, Plan
from sitskit.errors import UserFacingError

from . import labels as L
from . import patches as P
from . import rasters as R
from . import require

INDEX_FIELDS = ("id", "fold", "tile", "split", "year", "class_pixels", "row", "col")


def default_reference_date(first: _dt.date) -> _dt.date:
    """1 September before the first date (the start of a PASTIS-style season)."""
    return _dt.date(first.year if first.month >= 9 else first.year - 1, 9, 1)


def read_patch(args: dict) -> PatchRecord:
    """Read, validate and label one patch (runs in a worker process)."""
    key = args["key"]
    try:
        return _read_patch(args)
    except UserFacingError as exc:
        raise PatchError(f"patch {key}: {exc}") from None


def _read_patch(args: dict) -> PatchRecord:
    row, col, size = args["row"], args["col"], args["size"]
    scenes: list[R.Scene] = args["scenes"]
    data = np.empty((len(scenes), args["n_bands"], size, size), np.int16)
    n_valid = np.zeros((size, size), np.uint16)
    for t, scene in enumerate(scenes):
        data[t], valid = R.read_scene_window(scene, row, col, size, size, args["cloud_band"])
        n_valid += valid
    dates = [s.date for s in scenes]
    ref = _dt.date.fromisoformat(args["reference_date"])
    sats = {"S2": {"data": data, "dates": dates, "day": [(d - ref).days for d in dates],
                   "doy": [d.timetuple().tm_yday for d in dates], "year": [d.year for d in dates]}}
    arrays: dict[str, np.ndarray] = {"valid_dates": n_valid}
    transform = P.window_transform(args["transform"], row, col)
    n_classes = args["num_classes"]
    n_parcel, cover = 0, 0.0
    if args["parcels"] is not None:
        shapely = require("shapely")
        ids, cls, area, wkb = args["parcels"]
        geoms = shapely.from_wkb(wkb) if len(wkb) else []
        affine = require("affine").Affine.from_gdal(*transform)
        pid = L.rasterize_ids(geoms, ids, affine, (size, size))
        arrays.update(L.patch_targets(pid, dict(zip(ids, cls)), dict(zip(ids, area)), args["void"]))
    elif args["label_raster"] is not None:
        arrays.update(L.raster_targets(_read_label_window(args, row, col, size), args["void"]))
    else:  # unlabelled: an all-void map keeps the schema (prediction writers size their output on it)
        arrays["semantic"] = np.full((size, size), args["void"], np.uint8)
    if "parcel_ids" in arrays:
        n_parcel = int(len(np.unique(arrays["instances"])) - 1)
        cover = round(float((arrays["parcel_ids"] != 0).mean()), 4)
    class_pixels = np.bincount(arrays["semantic"].reshape(-1).astype(np.int64), minlength=n_classes)
    attrs = {"id": int(args["id"]), "fold": 0, "split": args["split"], "year": int(dates[-1].year),
             "tile": args["tile"], "row": int(row), "col": int(col),
             "geotransform": np.array(transform, np.float64), "crs": args["crs"],
             "footprint": json.dumps(P.footprint(transform, size, size)),
             "n_parcel": n_parcel, "parcel_cover": cover, "class_pixels": class_pixels}
    return PatchRecord(args["key"], sats, arrays, attrs)


def _read_label_window(args: dict, row: int, col: int, size: int) -> np.ndarray:
    rasterio = require("rasterio")
    path, lut = args["label_raster"]
    with rasterio.open(path) as src:
        raw = src.read(1, window=rasterio.windows.Window(col, row, size, size)).astype(np.int64)
    lut_keys = np.array(sorted(lut), np.int64)
    pos = np.searchsorted(lut_keys, raw).clip(0, max(len(lut_keys) - 1, 0))
    known = lut_keys[pos] == raw if len(lut_keys) else np.zeros(raw.shape, bool)
    if not known.all():
        bad = sorted(set(raw[~known].tolist()))[:5]
        raise UserFacingError(f"{path}: label value(s) {bad} are not in --class-map")
    return np.array([lut[int(k)] for k in lut_keys], np.int64)[pos]


def _label_raster_lut(path: str, grid: R.Grid, code_map: dict[str, str] | None):
    """Label raster on the image grid -> (path, {raster value: class index}) and the class table."""
    rasterio = require("rasterio")
    with rasterio.open(path) as src:
        if (src.height, src.width) != (grid.height, grid.width) or not np.allclose(
                src.transform.to_gdal(), grid.transform) or R._crs_text(src.crs) != grid.crs:
            raise UserFacingError(f"--label-raster {path}: not on the image grid ({src.height}x{src.width} px, "
                                  f"{R._crs_text(src.crs)}); {R.WARP_HINT.format(ref='<first scene>')}")
        values = np.unique(src.read(1))
    if code_map is None:  # the raster already holds class indices 0..K-1 (0 background, K-1 void)
        k = int(values.max()) + 2
        code_map = {str(v): (C.PASTIS_CLASSES[v] if k <= len(C.PASTIS_CLASSES) else f"class {v}")
                    for v in range(1, k - 1)}
        table = L.class_table(code_map) if code_map else L.class_table({"1": "class 1"})
        lut = {v: v for v in range(k)}
        return (str(path), lut), table
    table = L.class_table(code_map)
    try:
        lut = {int(code): idx for code, idx in table.code_to_index.items()}
    except ValueError:
        raise UserFacingError(f"--class-map: a label raster needs integer codes, got "
                              f"{list(table.code_to_index)[:5]}") from None
    lut.setdefault(0, 0)
    return (str(path), lut), table


def plan_geotiff(images, *, dates_csv=None, date_regex=None, bands=None, cloud_masks=None,
                 cloud_band=None, labels=None, class_field=None, class_map=None, label_raster=None,
                 patch_size=128, stride=None, split_block=1024, seed=0, reference_date=None) -> Plan:
    scenes = R.list_scenes(images, dates_csv=dates_csv, date_regex=date_regex, cloud_masks=cloud_masks)
    bands = list(bands) if bands else list(C.PASTIS_BANDS)
    grid = R.check_stack(scenes, len(bands), cloud_band)
    if cloud_band is not None and not 1 <= cloud_band <= grid.count:
        raise UserFacingError(f"--cloud-band {cloud_band}: scenes have bands 1..{grid.count}")
    windows = P.patch_windows(grid.height, grid.width, patch_size, stride)
    splits = P.spatial_block_split(windows, split_block, seed)
    ref = _dt.date.fromisoformat(str(reference_date)) if reference_date else default_reference_date(scenes[0].date)

    if labels and label_raster:
        raise UserFacingError("give either --labels (polygons) or --label-raster, not both")
    code_map = L.read_class_map(class_map) if class_map else None
    parcels_of: list | None = None
    raster_arg = None
    if labels:
        if not class_field or code_map is None:
            raise UserFacingError("--labels needs --class-field and --class-map")
        table = L.class_table(code_map)
        gdf = L.read_parcels(labels, class_field, table, grid.crs)
        pixel_area = abs(grid.transform[1] * grid.transform[5] - grid.transform[2] * grid.transform[4])
        areas = (gdf.geometry.area / pixel_area).to_numpy()
        shapely = require("shapely")
        geoms, ids, cls = gdf.geometry.values, gdf["parcel_id"].to_numpy(), gdf["class_index"].to_numpy()
        tree = gdf.sindex
        parcels_of = []
        for w in windows:
            fp = shapely.geometry.shape(P.footprint(P.window_transform(grid.transform, w.row, w.col), w.size, w.size))
            hit = np.sort(tree.query(fp, predicate="intersects"))
            parcels_of.append((ids[hit].tolist(), cls[hit].tolist(), areas[hit].tolist(),
                               shapely.to_wkb(np.asarray(geoms[hit]))))
    elif label_raster:
        raster_arg, table = _label_raster_lut(label_raster, grid, code_map)
    else:
        table = L.ClassTable(["Background", "Void label"], np.array([(0, 0, 0), (255, 255, 255)], np.uint8), {})
    has_labels = bool(labels or label_raster)

    tile = Path(str(scenes[0].path)).parent.name
    jobs = []
    for i, (w, split) in enumerate(zip(windows, splits)):
        jobs.append((w.key, {
            "key": w.key, "id": i, "row": w.row, "col": w.col, "size": w.size, "split": split, "tile": tile,
            "scenes": scenes, "n_bands": len(bands), "cloud_band": cloud_band, "transform": grid.transform,
            "crs": grid.crs, "reference_date": ref.isoformat(), "num_classes": len(table.names),
            "void": table.void, "parcels": parcels_of[i] if parcels_of is not None else None,
            "label_raster": raster_arg}))
    mean, std = R.band_statistics(scenes, cloud_band)
    extra = {"norm/S2/mean": mean[None], "norm/S2/std": std[None], "norm/S2/fold": np.array([0], np.int16)}
    root_attrs = {
        "dataset": "geotiff", "sats": ["S2"], "bands_S2": bands,
        "wavelengths_nm_S2": [C.S2_WAVELENGTH_NM.get(b, -1) for b in bands],
        "reference_date": ref.isoformat(), "crs": grid.crs, "class_names": table.names,
        "class_colors": table.colors, "num_classes": len(table.names), "ignore_index": table.void,
        "void_ids": [table.void], "background_ids": [0], "has_labels": int(has_labels),
        "has_instances": int(has_labels), "reflectance_scale": C.REFLECTANCE_SCALE,
        "area_transform": np.array(grid.transform, np.float64), "area_height": grid.height,
        "area_width": grid.width, "patch_size": patch_size, "stride": stride or patch_size,
        "split_block": split_block, "split_seed": seed,
        "scene_files": [s.path.name for s in scenes],
    }
    return Plan(jobs, read_patch, root_attrs, extra, [], INDEX_FIELDS)


def convert_geotiff(images, out, *, workers=0, resume=False, skip_bad=False, force=False,
                    compression="zstd", **options) -> Path:
    """Convert a scene stack (+ labels) into one HDF5 file; returns its path. Options: see plan_geotiff."""
    for name in ("labels", "class_map", "label_raster", "dates_csv"):  # absolute: predict reads them later
        if options.get(name):
            options[name] = str(Path(options[name]).resolve())
    plan = plan_geotiff(images, **options)
    settings = {"dataset": "geotiff", "compression": compression, "skip_bad": skip_bad,
                **{k: (str(v) if v is not None and not isinstance(v, (int, float, list)) else v)
                   for k, v in options.items()}}
    return runner.run(plan, out, source=str(plan.jobs[0][1]["scenes"][0].path.parent), workers=workers,
                      resume=resume, skip_bad=skip_bad, force=force, compression=compression,
                      settings=settings)
