"""MTLCC gzip TFRecords -> sitskit HDF5 (format: docs/simulator.md, "MTLCC").

Per tile and year: x10 + x20 + x60 are brought to the 10 m grid by **nearest** upsampling (pixel
repetition ×2 / ×6, exactly what `F.interpolate(mode="nearest")` in MTLCC-pytorch and STCLN gives for
these integer factors) and concatenated in the record's channel order (constants.MTLCC_BANDS), giving
int16 [T, 13, H, W]; padding observations (doy 0) are dropped; the year comes from the folder name
(`data16` -> 2016: the stored year field is unreliable); labels (one map, repeated per date in the record)
are remapped to the contiguous index of classes.txt rows, with the original ids kept.
"""
from __future__ import annotations

import csv
import datetime as _dt
from pathlib import Path

import numpy as np

from sitskit import constants as C
from sitskit.errors import UserFacingError
from sitskit.formats.mtlcc_record import decode_mtlcc_example
from sitskit.formats.tfrecord import TFRecordError, read_tfrecord

from . import runner
from .runner import PatchError, PatchRecord, Plan

SPLIT_FILES = {"train": "train_fold0.tileids", "test": "test_fold0.tileids", "eval": "eval.tileids"}
INDEX_FIELDS = ("id", "fold", "tile", "split", "year", "class_pixels")


def _find(base: Path, root: Path, name: str) -> Path:
    for folder in (base, root):
        if (folder / name).exists():
            return folder / name
    raise UserFacingError(f"{base / name}: missing (is {root} an MTLCC folder?)")


def read_classes(path: Path) -> tuple[list[int], list[str]]:
    ids, names = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if "|" not in line:  # Dataset.py keeps only the rows with a '|'
            continue
        raw_id, name = line.split("|", 1)
        try:
            ids.append(int(raw_id))
        except ValueError:
            raise UserFacingError(f"{path}:{n}: class id {raw_id!r} is not an integer") from None
        names.append(name.strip())
    if not ids or len(set(ids)) != len(ids):
        raise UserFacingError(f"{path}: expected unique 'id|name' rows")
    return ids, names


def _read_tileids(path: Path) -> list[int]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(int(line.strip()))
            except ValueError:
                raise UserFacingError(f"{path}:{n}: tile id {line.strip()!r} is not an integer") from None
    return out


def _read_geotransforms(path: Path) -> dict[int, tuple[list[float], str]]:
    table = {}
    if not path.exists():
        return table
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or not row[0].strip().lstrip("-").isdigit():
                continue  # header
            try:
                gt = [float(v) for v in row[1:7]]
                srid = int(float(row[7])) if len(row) > 7 else C.MTLCC_SRID
            except (ValueError, IndexError):
                raise UserFacingError(f"{path}: bad row {row}") from None
            table[int(row[0])] = (gt, f"EPSG:{srid}")
    return table


def read_tile(args: dict) -> PatchRecord:
    """Read, validate and convert one tile-year (runs in a worker process)."""
    path, tid, year, px = Path(args["path"]), args["id"], args["year"], args["px"]
    what = f"tile {tid} ({year})"
    try:
        examples = list(read_tfrecord(path))
        if len(examples) != 1:
            raise PatchError(f"{what}: {path} holds {len(examples)} Examples, expected 1")
        ex = decode_mtlcc_example(examples[0], where=str(path))
    except TFRecordError as exc:
        raise PatchError(f"{what}: corrupt TFRecord: {exc}") from None
    x10, x20, x60, labels, doy = ex["x10"], ex["x20"], ex["x60"], ex["labels"], ex["doy"]
    t = len(doy)
    expect = {"x10": (t, px, px, 4), "x20": (t, px // 2, px // 2, 6), "x60": (t, px // 6, px // 6, 3),
              "labels": (t, px, px)}
    for name, shape in expect.items():
        if ex[name].shape != shape:
            raise PatchError(f"{what}: {path.name} '{name}' has shape {ex[name].shape}, expected {shape}")
    keep = doy > 0  # padding observations
    doy = doy[keep]
    if not len(doy):
        raise PatchError(f"{what}: {path.name} has no observation (all doy = 0)")
    ndays = 366 if _dt.date(year, 12, 31).timetuple().tm_yday == 366 else 365
    if doy.max() > ndays:
        raise PatchError(f"{what}: {path.name} has day of year {int(doy.max())} > {ndays}")
    steps = np.diff(doy)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        kind = "duplicated" if steps[i] == 0 else "unsorted"
        raise PatchError(f"{what}: {path.name} has {kind} dates (doy {int(doy[i])} then {int(doy[i + 1])})")
    up20 = x20[keep].repeat(2, axis=1).repeat(2, axis=2)
    up60 = x60[keep].repeat(6, axis=1).repeat(6, axis=2)
    image = np.concatenate([x10[keep], up20, up60], axis=-1).transpose(0, 3, 1, 2)
    if image.size and (image.min() < -32768 or image.max() > 32767):
        raise PatchError(f"{what}: {path.name} has reflectances outside int16")
    original = labels[0]
    lut = args["lut"]  # original id -> contiguous index
    unknown = sorted(set(np.unique(original).tolist()) - set(lut))
    if unknown:
        raise PatchError(f"{what}: {path.name} has class ids {unknown[:5]} not in classes.txt")
    semantic = np.vectorize(lut.get, otypes=[np.int64])(original) if original.size else original
    dates = [_dt.date(year, 1, 1) + _dt.timedelta(days=int(d) - 1) for d in doy]
    gt, crs = args["geo"] or ([np.nan] * 6, f"EPSG:{C.MTLCC_SRID}")
    attrs = {"id": int(tid), "fold": 0, "tile": str(tid), "split": args["split"], "year": int(year),
             "geotransform": np.asarray(gt, dtype=np.float64), "crs": crs,
             "class_pixels": np.bincount(semantic.reshape(-1), minlength=args["num_classes"])}
    sats = {"S2": {"data": image.astype(np.int16), "dates": dates, "day": (doy - 1).tolist(),
                   "doy": doy.tolist(), "year": [year] * len(doy)}}
    arrays = {"semantic": semantic.astype(np.uint8), "semantic_original": original.astype(np.int16)}
    return PatchRecord(f"{year}_{tid}", sats, arrays, attrs)


def plan_mtlcc(root: str | Path, years=(2016, 2017), size: int = 480) -> Plan:
    root = Path(root)
    if not root.is_dir():
        raise UserFacingError(f"{root}: not a directory")
    if size not in C.MTLCC_TILE_PX:
        raise UserFacingError(f"--size {size}: use 480 or 240")
    base = root / str(size) if (root / str(size)).is_dir() else root
    ids, names = read_classes(_find(base, root, "classes.txt"))
    lut = {cid: i for i, cid in enumerate(ids)}
    splits: dict[int, list[str]] = {}
    for split, fname in SPLIT_FILES.items():
        for tid in _read_tileids(_find(base, root, f"tileids/{fname}")):
            splits.setdefault(tid, [])
            if split not in splits[tid]:
                splits[tid].append(split)
    geo_path = base / "geotransforms.csv" if (base / "geotransforms.csv").exists() else root / "geotransforms.csv"
    geo = _read_geotransforms(geo_path)
    jobs, problems = [], []
    years = list(dict.fromkeys(int(y) for y in years))
    for year in years:
        folder = base / f"data{year % 100:02d}"
        if not folder.is_dir():
            raise UserFacingError(f"{folder}: missing folder for year {year}")
        for tid in sorted(splits):
            path = folder / f"{tid}.tfrecord.gz"
            if not path.exists():
                problems.append((f"tile {tid} ({year})", f"listed in tileids but file {path} is missing"))
                continue
            jobs.append((f"{year}_{tid}", {"path": str(path), "id": tid, "year": year,
                                           "px": C.MTLCC_TILE_PX[size], "lut": lut, "num_classes": len(ids),
                                           "split": ",".join(splits[tid]), "geo": geo.get(tid)}))
        for path in sorted(folder.glob("*.tfrecord.gz")):
            stem = path.name[: -len(".tfrecord.gz")]
            if not stem.isdigit() or int(stem) not in splits:
                problems.append((str(path), "file not listed in any tileids file"))
    jobs.sort(key=lambda j: (j[1]["year"], j[1]["id"]))
    bands = C.MTLCC_BANDS
    root_attrs = {
        "dataset": "mtlcc", "sats": ["S2"], "reference_date": "01-01 of each series' year (day = doy - 1)",
        "tile_size_m": size, "crs": f"EPSG:{C.MTLCC_SRID}", "class_names": names,
        "class_original_ids": np.array(ids, dtype=np.int16), "num_classes": len(ids),
        "ignore_index": lut.get(C.MTLCC_UNKNOWN, 0), "void_ids": [lut.get(C.MTLCC_UNKNOWN, 0)],
        "background_ids": [], "has_instances": 0, "reflectance_scale": C.REFLECTANCE_SCALE,
        "years": years, "bands_S2": bands, "wavelengths_nm_S2": [C.S2_WAVELENGTH_NM[b] for b in bands],
        "native_resolution_m_S2": [C.S2_RESOLUTION_M[b] for b in bands], "upsampling": "nearest",
        "class_colors": _mtlcc_colors(len(ids)),
    }
    # MTLCC's own normalisation: x * 1e-4, i.e. mean 0, std 10000 for every band.
    extra = {"norm/S2/mean": np.zeros((1, len(bands))), "norm/S2/std": np.full((1, len(bands)), 1e4),
             "norm/S2/fold": np.zeros(1, dtype=np.int16)}
    return Plan(jobs, read_tile, root_attrs, extra, problems, INDEX_FIELDS)


def _mtlcc_colors(k: int) -> np.ndarray:
    """Black for unknown, then evenly spaced hues (a display convenience, not part of MTLCC)."""
    import colorsys
    cols = [(0, 0, 0)] + [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(1, k - 1), 0.7, 0.9))
                          for i in range(k - 1)]
    return np.array(cols, dtype=np.uint8)


def convert_mtlcc(root: str | Path, out: str | Path, *, years=(2016, 2017), size: int = 480,
                  workers: int = 0, resume: bool = False, skip_bad: bool = False, force: bool = False,
                  compression: str = "zstd") -> Path:
    """Convert an MTLCC release folder (one tile size, some years) into one HDF5 file; returns its path."""
    plan = plan_mtlcc(root, years, size)
    settings = {"dataset": "mtlcc", "years": [int(y) for y in years], "size": size,
                "compression": compression, "skip_bad": skip_bad}
    return runner.run(plan, out, source=str(root), workers=workers, resume=resume, skip_bad=skip_bad,
                      force=force, compression=compression, settings=settings)
