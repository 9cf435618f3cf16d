"""Labels of your own region: parcel polygons (or a label raster) -> PASTIS-style targets per patch.

Polygons are rasterised on the image grid with all-touched off (a pixel belongs to a parcel when its
centre lies inside). Per patch, a parcel with fewer than `MIN_PARCEL_PX` pixels in the patch, or with
less than half of its area inside the patch, is void (as in PASTIS and the simulator,
docs/simulator.md); instance codes, heatmap and zones are then computed exactly as for simulated
PASTIS (sitskit.simulate.instances).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sitskit import constants as C
from sitskit.errors import UserFacingError
from sitskit.simulate.instances import centerness, instance_codes

from . import require

MIN_PARCEL_PX = 4         # fewer pixels than this inside a patch -> void ("smaller than a few pixels")
VOID_INSIDE_FRAC = 0.5    # less than half of the parcel's area inside the patch -> void


@dataclass
class ClassTable:
    """Contiguous classes of the output file: 0 = background, crops, last = void (ignore index)."""

    names: list[str]
    colors: np.ndarray          # uint8 [K, 3]
    code_to_index: dict[str, int]

    @property
    def void(self) -> int:
        return len(self.names) - 1


def read_class_map(path: str | Path) -> dict[str, str]:
    """`code,class` rows (a header row naming `code` is skipped) -> agency crop code -> class name."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise UserFacingError(f"--class-map {path}: cannot read it ({exc.strerror})") from None
    out: dict[str, str] = {}
    for i, row in enumerate(rows, 1):
        if not row or (i == 1 and row[0].strip().lower() == "code"):
            continue
        if len(row) < 2 or not row[1].strip():
            raise UserFacingError(f"{path}: line {i} is not 'code,class name'")
        out[row[0].strip()] = row[1].strip()
    if not out:
        raise UserFacingError(f"{path}: no 'code,class' rows")
    return out


def class_table(code_map: dict[str, str]) -> ClassTable:
    """If every class name is a PASTIS class, the PASTIS indices (0..19) are kept, so a model trained on
    PASTIS applies directly; otherwise Background, the names in order of first appearance, Void label."""
    names = list(dict.fromkeys(code_map.values()))
    if set(names) <= set(C.PASTIS_CLASSES):
        classes = list(C.PASTIS_CLASSES)
        colors = np.array(C.PASTIS_COLORS, dtype=np.uint8)
    else:
        classes = ["Background"] + [n for n in names if n not in ("Background", "Void label")] + ["Void label"]
        import matplotlib
        cmap = matplotlib.colormaps["tab20"]
        colors = np.array([(0, 0, 0)] + [tuple(int(255 * v) for v in cmap(i % 20)[:3])
                                         for i in range(len(classes) - 2)] + [(255, 255, 255)], dtype=np.uint8)
    return ClassTable(classes, colors, {code: classes.index(name) for code, name in code_map.items()})


def _code_text(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def read_parcels(path: str | Path, class_field: str, table: ClassTable, crs: str):
    """Parcel layer -> GeoDataFrame in the image CRS with `class_index`, `parcel_id` (1..N, file order)
    and `area_px` (polygon area in pixels of the image grid is computed later). Refuses an empty layer, a
    missing class field, missing CRS and crop codes that the class map does not know."""
    gpd = require("geopandas")
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001  (pyogrio / fiona raise their own error families)
        raise UserFacingError(f"--labels {path}: cannot read it as a vector layer ({exc})") from None
    if len(gdf) == 0:
        raise UserFacingError(f"--labels {path}: the layer has no features")
    if class_field not in gdf.columns:
        raise UserFacingError(f"--labels {path}: no field {class_field!r} (fields: "
                              f"{', '.join(c for c in gdf.columns if c != 'geometry')})")
    if gdf.crs is None:
        raise UserFacingError(f"--labels {path}: the layer has no CRS")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty].copy()
    codes = [_code_text(v) for v in gdf[class_field]]
    unknown = sorted({c for c in codes if c not in table.code_to_index})
    if unknown:
        raise UserFacingError(f"--labels {path}: crop code(s) {unknown[:5]}{' …' if len(unknown) > 5 else ''} "
                              f"of field {class_field!r} are not in --class-map")
    gdf["declared_code"] = codes
    gdf["class_index"] = np.array([table.code_to_index[c] for c in codes], dtype=np.int64)
    gdf["parcel_id"] = np.arange(1, len(gdf) + 1, dtype=np.int64)
    if gdf.crs.to_string() != crs and gdf.crs != require("pyproj").CRS.from_user_input(crs):
        gdf = gdf.to_crs(crs)
    return gdf


def rasterize_ids(geometries, ids, transform, shape: tuple[int, int]) -> np.ndarray:
    """Parcel ids int32 [H, W] (0 = no parcel) on a grid; all_touched off; later features win overlaps."""
    features = require("rasterio.features")
    if len(geometries) == 0:
        return np.zeros(shape, np.int32)
    return features.rasterize(zip(geometries, (int(i) for i in ids)), out_shape=shape, transform=transform,
                              fill=0, all_touched=False, dtype="int32")


def patch_targets(parcel_ids: np.ndarray, parcel_class: dict[int, int], parcel_area_px: dict[int, float],
                  void: int) -> dict[str, np.ndarray]:
    """PASTIS-style label maps of one patch from its parcel-id raster.

    parcel_ids int32 [H, W]; parcel_class / parcel_area_px: id -> class index / whole-parcel area in
    pixels. Returns semantic uint8, parcel_ids int32, instances int64, heatmap float32, zones int64 [H, W].
    """
    ids, counts = np.unique(parcel_ids, return_counts=True)
    lut_class = np.zeros(int(ids.max()) + 1 if len(ids) else 1, np.int64)
    for pid, n in zip(ids.tolist(), counts.tolist()):
        if pid == 0:
            continue
        too_small = n < MIN_PARCEL_PX
        outside = n < VOID_INSIDE_FRAC * parcel_area_px[pid]
        lut_class[pid] = void if (too_small or outside) else parcel_class[pid]
    semantic = lut_class[parcel_ids].astype(np.uint8)
    instances = instance_codes(parcel_ids, semantic)
    heatmap, zones = centerness(instances)
    return {"semantic": semantic, "parcel_ids": parcel_ids.astype(np.int32), "instances": instances,
            "heatmap": heatmap, "zones": zones}


def raster_targets(labels: np.ndarray, void: int) -> dict[str, np.ndarray]:
    """Targets from a class-index raster [H, W]: parcels are the 4-connected same-class components of
    non-background pixels; components under MIN_PARCEL_PX pixels are void."""
    from scipy import ndimage
    parcel_ids = np.zeros(labels.shape, np.int32)
    next_id = 1
    for cls in np.unique(labels):
        if cls in (0, void):
            continue
        comp, n = ndimage.label(labels == cls)
        parcel_ids[comp > 0] = comp[comp > 0] + next_id - 1
        next_id += n
    semantic = labels.astype(np.uint8).copy()
    sizes = np.bincount(parcel_ids.ravel())
    semantic[(parcel_ids > 0) & (sizes[parcel_ids] < MIN_PARCEL_PX)] = void
    instances = instance_codes(parcel_ids, semantic)
    heatmap, zones = centerness(instances)
    return {"semantic": semantic, "parcel_ids": parcel_ids, "instances": instances,
            "heatmap": heatmap, "zones": zones}
