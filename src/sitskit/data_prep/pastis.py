"""PASTIS / PASTIS-R folder -> sitskit HDF5 (layout: docs/simulator.md, "PASTIS").

Differences from the reference loader, on purpose: dates must already be chronological and unique in the
files (the reference silently sorts/de-duplicates the date list but not the image axis, which misaligns
them); we reject such patches instead of guessing.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import re
from pathlib import Path

import numpy as np

from sitskit import constants as C
from sitskit.errors import UserFacingError

from . import runner
from .runner import PatchError, PatchRecord, Plan

SAT_CHANNELS = {"S2": 10, "S1A": 3, "S1D": 3}
INDEX_FIELDS = ("id", "fold", "tile", "split", "year", "class_pixels")
INSTANCE_FILES = {"heatmap": "HEATMAP", "instances": "INSTANCES", "zones": "ZONES"}


def _sat_file(root: Path, sat: str, pid: int) -> Path:
    return root / f"DATA_{sat}" / f"{sat}_{pid}.npy"


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise PatchError(f"{what}: missing file {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # truncated, pickled object, not an .npy at all
        raise PatchError(f"{what}: cannot read {path} (truncated or not a .npy array: {exc})") from None


def _parse_dates(raw, what: str, sat: str) -> list[_dt.date]:
    if isinstance(raw, str):  # newer geopandas writes the dict as a JSON string
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise PatchError(f"{what}: 'dates-{sat}' in metadata.geojson is not valid JSON") from None
    if not isinstance(raw, dict):
        raise PatchError(f"{what}: 'dates-{sat}' in metadata.geojson must be a {{index: YYYYMMDD}} dict")
    try:
        items = sorted(((int(k), int(v)) for k, v in raw.items()))
        dates = [_dt.datetime.strptime(str(v), "%Y%m%d").date() for _, v in items]
    except ValueError:
        raise PatchError(f"{what}: 'dates-{sat}' in metadata.geojson holds a non-YYYYMMDD date") from None
    if [k for k, _ in items] != list(range(len(items))):
        raise PatchError(f"{what}: 'dates-{sat}' keys are not 0..T-1")
    for a, b in itertools.pairwise(dates):
        if b <= a:
            kind = "duplicated" if a == b else "unsorted"
            raise PatchError(f"{what}: 'dates-{sat}' in metadata.geojson has {kind} dates ({a} then {b})")
    return dates


def _check_series(arr: np.ndarray, path: Path, what: str, sat: str, n_dates: int) -> np.ndarray:
    c = SAT_CHANNELS[sat]
    if arr.ndim != 4:
        raise PatchError(f"{what}: {path.name} has shape {arr.shape}, expected (T, {c}, H, W)")
    if arr.shape[1] != c:
        raise PatchError(f"{what}: {path.name} has {arr.shape[1]} bands, expected {c}")
    if arr.shape[0] != n_dates:
        raise PatchError(f"{what}: {path.name} has T={arr.shape[0]} images but metadata lists "
                         f"{n_dates} dates for {sat}")
    if sat == "S2":
        if arr.dtype.kind not in "iu":
            raise PatchError(f"{what}: {path.name} has dtype {arr.dtype}, expected int16 reflectance")
        if arr.size and (arr.min() < -32768 or arr.max() > 32767):
            raise PatchError(f"{what}: {path.name} has values outside int16")
        return arr.astype(np.int16, copy=False)
    if arr.dtype not in (np.float32, np.float16):
        raise PatchError(f"{what}: {path.name} has dtype {arr.dtype}, expected float32 or float16")
    if not np.isfinite(arr).all():
        raise PatchError(f"{what}: {path.name} contains NaN or inf")
    return arr


def _label_map(path: Path, what: str, shape: tuple[int, int], float_ok: bool = False) -> np.ndarray:
    arr = _load_npy(path, what)
    if arr.shape != shape:
        raise PatchError(f"{what}: {path.name} has shape {arr.shape}, expected {shape}")
    if arr.dtype.kind not in ("iuf" if float_ok else "iu"):
        raise PatchError(f"{what}: {path.name} has dtype {arr.dtype}, expected an integer map")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise PatchError(f"{what}: {path.name} contains NaN or inf")
    return arr


def read_patch(args: dict) -> PatchRecord:
    """Read and validate one patch (runs in a worker process)."""
    root, pid, props = Path(args["root"]), args["id"], args["props"]
    what = f"patch {pid}"
    sats = {}
    for sat in args["sats"]:
        dates = _parse_dates(props.get(f"dates-{sat}"), what, sat)
        path = _sat_file(root, sat, pid)
        data = _check_series(_load_npy(path, what), path, what, sat, len(dates))
        sats[sat] = {
            "data": data, "dates": dates,
            "day": [(d - C.PASTIS_REFERENCE_DATE).days for d in dates],
            "doy": [d.timetuple().tm_yday for d in dates], "year": [d.year for d in dates],
        }
    h, w = sats[args["sats"][0]]["data"].shape[2:]
    for sat, s in sats.items():
        if s["data"].shape[2:] != (h, w):
            raise PatchError(f"{what}: {sat} images are {s['data'].shape[2:]}, other series are {(h, w)}")
    tpath = root / "ANNOTATIONS" / f"TARGET_{pid}.npy"
    target = _load_npy(tpath, what)
    if target.ndim != 3 or target.shape[1:] != (h, w):
        raise PatchError(f"{what}: {tpath.name} has shape {target.shape}, expected (3, {h}, {w})")
    if target.dtype.kind not in "iu":
        raise PatchError(f"{what}: {tpath.name} has dtype {target.dtype}, expected uint8 labels")
    sem = target[0]
    if sem.min() < 0 or sem.max() >= C.PASTIS_NUM_CLASSES:
        bad = sorted(set(np.unique(sem).tolist()) - set(range(C.PASTIS_NUM_CLASSES)))
        raise PatchError(f"{what}: {tpath.name} has class ids {bad[:5]} outside 0..{C.PASTIS_NUM_CLASSES - 1}")
    arrays = {"semantic": sem.astype(np.uint8), "target": target,
              "parcel_ids": _label_map(root / "ANNOTATIONS" / f"ParcelIDs_{pid}.npy", what, (h, w))}
    if args["instances"]:
        for name, stem in INSTANCE_FILES.items():
            arrays[name] = _label_map(root / "INSTANCE_ANNOTATIONS" / f"{stem}_{pid}.npy", what, (h, w),
                                      float_ok=name == "heatmap")
    first = sats[args["sats"][0]]["dates"]
    attrs = {
        "id": int(pid), "fold": int(props.get("Fold", 0)), "tile": str(props.get("TILE", "")),
        "split": "", "year": int(first[-1].year) if first else 0,
        "n_parcel": int(props.get("N_Parcel", -1)), "parcel_cover": float(props.get("Parcel_Cover", np.nan)),
        "footprint": json.dumps(args["geometry"]) if args["geometry"] else "", "crs": args["crs"],
        "class_pixels": np.bincount(sem.reshape(-1).astype(np.int64), minlength=C.PASTIS_NUM_CLASSES),
    }
    return PatchRecord(str(pid), sats, arrays, attrs)


def _read_norm(root: Path, sat: str) -> dict[str, np.ndarray]:
    path = root / f"NORM_{sat}_patch.json"
    if not path.exists():
        raise UserFacingError(f"{path}: missing normalisation file for {sat}")
    try:
        stats = json.loads(path.read_text())
        folds = sorted(stats, key=lambda k: int(k.split("_")[1]))
        mean = np.array([stats[f]["mean"] for f in folds], dtype=np.float64)
        std = np.array([stats[f]["std"] for f in folds], dtype=np.float64)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UserFacingError(f"{path}: not a {{'Fold_k': {{'mean': [...], 'std': [...]}}}} file ({exc})") from None
    c = SAT_CHANNELS[sat]
    if mean.shape != (len(folds), c) or std.shape != mean.shape:
        raise UserFacingError(f"{path}: expected {c} values per fold, got mean {mean.shape} std {std.shape}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise UserFacingError(f"{path}: statistics contain NaN/inf or a non-positive std")
    return {f"norm/{sat}/mean": mean, f"norm/{sat}/std": std,
            f"norm/{sat}/fold": np.array([int(f.split("_")[1]) for f in folds], dtype=np.int16)}


def plan_pastis(root: str | Path, sats=("S2",)) -> Plan:
    root = Path(root)
    meta_path = root / "metadata.geojson"
    if not root.is_dir():
        raise UserFacingError(f"{root}: not a directory")
    if not meta_path.exists():
        raise UserFacingError(f"{meta_path}: missing (is {root} a PASTIS folder?)")
    sats = list(dict.fromkeys(sats))
    for sat in sats:
        if sat not in SAT_CHANNELS:
            raise UserFacingError(f"--sats: unknown satellite {sat!r} (use S2, S1A, S1D)")
        if not (root / f"DATA_{sat}").is_dir():
            raise UserFacingError(f"{root / f'DATA_{sat}'}: missing folder for requested satellite {sat}")
    try:
        meta = json.loads(meta_path.read_text())
        features = meta["features"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserFacingError(f"{meta_path}: not a GeoJSON FeatureCollection ({exc})") from None
    crs = C.PASTIS_CRS
    crs_name = (meta.get("crs") or {}).get("properties", {}).get("name", "")
    m = re.search(r"EPSG::?(\d+)", crs_name)
    if m:
        crs = f"EPSG:{m.group(1)}"

    extra: dict[str, np.ndarray] = {}
    for sat in sats:
        extra.update(_read_norm(root, sat))
    instances = (root / "INSTANCE_ANNOTATIONS").is_dir()
    problems: list[tuple[str, str]] = []
    jobs, seen = [], set()
    entries = []
    for i, feat in enumerate(features):
        props = feat.get("properties") or {}
        try:
            pid = int(props["ID_PATCH"])
        except (KeyError, TypeError, ValueError):
            raise UserFacingError(f"{meta_path}: feature {i} has no integer ID_PATCH") from None
        if pid in seen:
            raise UserFacingError(f"{meta_path}: ID_PATCH {pid} appears twice")
        seen.add(pid)
        entries.append((pid, props, feat.get("geometry")))
    for pid, props, geom in sorted(entries, key=lambda e: e[0]):
        missing = [p for sat in sats if not (p := _sat_file(root, sat, pid)).exists()]
        if missing:
            problems.append((f"patch {pid}", f"metadata entry without file {missing[0]}"))
            continue
        jobs.append((str(pid), {"root": str(root), "id": pid, "props": props, "geometry": geom,
                                "sats": sats, "instances": instances, "crs": crs}))
    for sat in sats:  # files without a metadata entry
        for path in sorted((root / f"DATA_{sat}").glob(f"{sat}_*.npy")):
            stem = path.stem.split("_", 1)[1]
            if not stem.isdigit() or int(stem) not in seen:
                problems.append((str(path), "file without a metadata.geojson entry"))

    bands = {sat: C.PASTIS_BANDS if sat == "S2" else C.PASTIS_S1_BANDS for sat in sats}
    root_attrs = {
        "dataset": "pastis", "sats": sats, "reference_date": C.PASTIS_REFERENCE_DATE.isoformat(),
        "crs": crs, "class_names": C.PASTIS_CLASSES,
        "class_colors": np.array(C.PASTIS_COLORS, dtype=np.uint8),
        "num_classes": C.PASTIS_NUM_CLASSES, "ignore_index": C.PASTIS_VOID, "void_ids": [C.PASTIS_VOID],
        "background_ids": [C.PASTIS_BACKGROUND], "has_instances": int(instances),
        "reflectance_scale": C.REFLECTANCE_SCALE, "folds": [1, 2, 3, 4, 5],
        **{f"bands_{sat}": b for sat, b in bands.items()},
        "wavelengths_nm_S2": [C.S2_WAVELENGTH_NM[b] for b in C.PASTIS_BANDS],
    }
    return Plan(jobs, read_patch, root_attrs, extra, problems, INDEX_FIELDS)


def convert_pastis(root: str | Path, out: str | Path, *, sats=("S2",), workers: int = 0,
                   resume: bool = False, skip_bad: bool = False, force: bool = False,
                   compression: str = "zstd") -> Path:
    """Convert a PASTIS(-R) folder into one HDF5 file; returns its path. See docs/hdf5_format.md."""
    plan = plan_pastis(root, sats)
    settings = {"dataset": "pastis", "sats": list(dict.fromkeys(sats)), "compression": compression,
                "skip_bad": skip_bad}
    return runner.run(plan, out, source=str(root), workers=workers, resume=resume, skip_bad=skip_bad,
                      force=force, compression=compression, settings=settings)
