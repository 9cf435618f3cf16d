"""Simulated "own region": dated multi-band GeoTIFFs in a real projected CRS + a parcel GeoPackage.

Written by `python data_prep.py simulate --format geotiff --out DIR` (docs/own_region.md):

    DIR/S2_YYYYMMDD.tif      int16 [10, H, W] per date, PASTIS band order, reflectance x 10 000
    DIR/clouds/S2_YYYYMMDD_cloud.tif   uint8 [H, W], 1 = cloud, haze or shadow (optional input)
    DIR/parcels.gpkg         one polygon per field parcel, field `CODE` (RPG-style crop code)
    DIR/crop_codes.csv       code,class (class names are the PASTIS nomenclature)
    DIR/truth/semantic.tif   uint8 [H, W] the simulated semantic classes (PASTIS indices; for checks)

The scene is one simulated PASTIS patch of `size` px (sitskit.simulate.pastis: same layout, spectra,
phenology and clouds), placed at `origin` in `crs`.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sitskit.constants import PASTIS_BANDS, PASTIS_CLASSES
from sitskit.errors import UserFacingError

from .output import atomic_output_dir
from .pastis import check_size, simulate_pastis_patch

# RPG-style (French parcel register) crop codes for the 18 PASTIS crop classes; our choice of codes.
CROP_CODES: dict[int, str] = {
    1: "PPH", 2: "BTH", 3: "MIS", 4: "ORH", 5: "CZH", 6: "ORP", 7: "TRN", 8: "VRC", 9: "BTN",
    10: "TTH", 11: "BDH", 12: "FLA", 13: "PTC", 14: "LUZ", 15: "SOJ", 16: "VRG", 17: "MCR", 18: "SRS",
}
DEFAULT_CRS = "EPSG:32631"              # UTM 31N (northern France)
DEFAULT_ORIGIN = (500000.0, 5400000.0)  # upper-left corner, metres
PIXEL_M = 10.0


def _write_tif(path: Path, arr: np.ndarray, transform, crs: str, descriptions=None, **tags) -> None:
    import rasterio
    with rasterio.open(path, "w", driver="GTiff", height=arr.shape[-2], width=arr.shape[-1],
                       count=arr.shape[0], dtype=arr.dtype.name, crs=crs, transform=transform,
                       compress="deflate", tiled=True, blockxsize=128, blockysize=128) as dst:
        dst.write(arr)
        for i, d in enumerate(descriptions or [], 1):
            dst.set_band_description(i, d)
        if tags:
            dst.update_tags(**tags)


def parcel_polygons(parcel_ids: np.ndarray, crop_class: np.ndarray, transform, crs: str):
    """Vectorise a parcel-id raster [H, W] (0 = none): GeoDataFrame with parcel_id, CODE, geometry."""
    import geopandas as gpd
    from rasterio import features
    from shapely.geometry import shape
    from shapely.ops import unary_union

    pieces: dict[int, list] = {}
    for geom, value in features.shapes(parcel_ids.astype(np.int32), mask=parcel_ids != 0, transform=transform):
        pieces.setdefault(int(value), []).append(shape(geom))
    rows = []
    for pid in sorted(pieces):
        cls = int(np.bincount(crop_class[parcel_ids == pid]).argmax())
        rows.append({"parcel_id": pid, "CODE": CROP_CODES[cls], "geometry": unary_union(pieces[pid])})
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=crs)


def simulate_geotiff(out_dir, size: int = 256, seed: int = 0, year: int = 2019, n_dates: int | None = None,
                     crs: str = DEFAULT_CRS, origin: tuple[float, float] = DEFAULT_ORIGIN) -> Path:
    """Write one simulated scene as dated GeoTIFFs + parcels.gpkg + crop_codes.csv; returns `out_dir`.

    n_dates: keep this many evenly spread dates of the simulated 38–61 (all by default).
    """
    from sitskit.geo import require
    require("rasterio")
    require("geopandas")
    from rasterio.transform import from_origin

    check_size(size)
    p = simulate_pastis_patch(10000, size=size, seed=seed, year=year)
    t = len(p.dates)
    keep = np.arange(t) if not n_dates or n_dates >= t else np.unique(np.linspace(0, t - 1, n_dates).round().astype(int))
    if n_dates is not None and n_dates < 1:
        raise UserFacingError(f"--dates {n_dates}: must be >= 1")
    transform = from_origin(origin[0], origin[1], PIXEL_M, PIXEL_M)
    with atomic_output_dir(out_dir) as tmp:
        (tmp / "clouds").mkdir()
        for i in keep:
            stamp = p.dates[i].strftime("%Y%m%d")
            _write_tif(tmp / f"S2_{stamp}.tif", p.s2[i], transform, crs, PASTIS_BANDS,
                       DATE=p.dates[i].isoformat(), SCALE="10000")
            _write_tif(tmp / "clouds" / f"S2_{stamp}_cloud.tif", p.cloud_mask[i][None].astype(np.uint8),
                       transform, crs)
        (tmp / "truth").mkdir()
        _write_tif(tmp / "truth" / "semantic.tif", p.semantic[None].astype(np.uint8), transform, crs,
                   CLASS_NAMES=";".join(PASTIS_CLASSES))
        gdf = parcel_polygons(p.parcel_ids, p.crop_class, transform, crs)
        gdf.to_file(tmp / "parcels.gpkg", layer="parcels", driver="GPKG")
        with (tmp / "crop_codes.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["code", "class"])
            writer.writerows([code, PASTIS_CLASSES[c]] for c, code in CROP_CODES.items())
    return Path(out_dir)

