"""Your own region (docs/own_region.md): dated GeoTIFF scenes + parcel polygons -> sitskit HDF5, and
stitched GeoTIFF crop maps + parcel tables back out.

rasterio, geopandas, shapely and pyproj are the optional extra `sitskit[geo]`; every module imports them
through `require` so that a missing install gives one line naming the extra.
"""
from __future__ import annotations

import importlib

from sitskit.errors import UserFacingError

GEO_EXTRA_HINT = "pip install 'sitskit[geo]'"


def require(module: str):
    """Import one of the geo libraries (rasterio, geopandas, shapely, pyproj) or fail with the extra's name."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise UserFacingError(f"{top} is needed for GeoTIFF / vector files and is not installed: "
                              f"{GEO_EXTRA_HINT}") from None
