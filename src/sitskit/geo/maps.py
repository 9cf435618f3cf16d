"""Maps out: per-patch predictions -> one georeferenced GeoTIFF over the whole area, a parcel table, and
predicted parcels as polygons (docs/own_region.md).

The area grid and each patch's position come from the HDF5 file written by `data_prep.py geotiff`
(root `area_transform`, `area_height`, `area_width`, `crs`; patch `row`, `col`). The map is written in
horizontal strips (windowed writing), so memory is bounded by one strip of [K, strip, W] floats whatever
the area's size.

Stitching: with probabilities, overlapping patches are averaged with the separable sine weight of
sitskit.finetune.inference (1 at a patch centre, small but > 0 at its border), then arg-maxed; with class
maps only, every pixel takes the class of the patch in which it lies farthest from the border (a centre
crop). Pixels without any valid date (nodata / cloud in every scene) are nodata (255).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from sitskit.data_prep.h5schema import open_sits
from sitskit.errors import UserFacingError

from . import require

NODATA = 255
PERCENT = 100  # confidence / probability bands: uint8 percent (tag SCALE = 0.01)


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class AreaLayout:
    """Grid of the whole area and the window of every patch (row, col, height, width) by key."""

    crs: str
    transform: tuple[float, ...]
    height: int
    width: int
    windows: dict[str, tuple[int, int, int, int]]
    class_names: list[str]
    class_colors: np.ndarray
    ignore_index: int

    @property
    def affine(self):
        return require("affine").Affine.from_gdal(*self.transform)


def read_layout(data_h5) -> AreaLayout:
    """The area grid and patch windows of a `dataset = "geotiff"` file."""
    with open_sits(data_h5) as f:
        a = f.attrs
        if _s(a["dataset"]) != "geotiff" or "area_transform" not in a:
            raise UserFacingError(f"{data_h5}: not converted by `data_prep.py geotiff` (no area grid), "
                                  f"so there is no map to stitch")
        idx = f["index"]
        keys = [_s(k) for k in idx["key"][()]]
        windows = {k: (int(r), int(c), int(h), int(w)) for k, r, c, h, w in
                   zip(keys, idx["row"][()], idx["col"][()], idx["height"][()], idx["width"][()])}
        return AreaLayout(_s(a["crs"]), tuple(float(v) for v in a["area_transform"]), int(a["area_height"]),
                          int(a["area_width"]), windows, [_s(n) for n in a["class_names"]],
                          np.asarray(a["class_colors"], np.uint8), int(a["ignore_index"]))


def _colors(k: int) -> np.ndarray:
    """PASTIS colours for up to 20 classes, else tab20 cycled (uint8 [k, 3])."""
    from sitskit.constants import PASTIS_COLORS
    if k <= len(PASTIS_COLORS):
        return np.array(PASTIS_COLORS[:k], np.uint8)
    import matplotlib
    cmap = matplotlib.colormaps["tab20"]
    return np.array([[int(255 * v) for v in cmap(i % 20)[:3]] for i in range(k)], np.uint8)


def blend_weight(h: int, w: int) -> np.ndarray:
    """[h, w] sin(pi (i + 0.5) / n) x sin(pi (j + 0.5) / n): the weight of finetune.inference.blend_weight."""
    def axis(n):
        return np.sin(np.pi * (np.arange(n, dtype=np.float32) + 0.5) / n)
    return axis(h)[:, None] * axis(w)[None, :]


def centre_score(h: int, w: int) -> np.ndarray:
    """[h, w] distance to the nearest patch border (the centre-crop rule without probabilities)."""
    r = np.minimum(np.arange(h), np.arange(h)[::-1])
    c = np.minimum(np.arange(w), np.arange(w)[::-1])
    return np.minimum(r[:, None], c[None, :]).astype(np.float32)


def _check_patch(key: str, arr, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.shape != shape:
        raise UserFacingError(f"{what} of patch {key}: shape {arr.shape}, expected {shape}")
    return arr


def write_geotiff_map(out_tif, data_h5, predictions: Mapping | None = None, probs: Mapping | None = None, *,
                      confidence: bool = True, prob_bands: bool = False, strip_rows: int | None = None,
                      class_names: list[str] | None = None, class_colors=None) -> Path:
    """Stitch per-patch predictions into one GeoTIFF over the area of `data_h5`.

    predictions: key -> class index [H, W] (int); probs: key -> class probabilities [K, H, W] (float,
    summing to 1 over K). Give either or both: with probs the classes are the arg-max of the blended
    probabilities (`predictions` is then ignored for the map). Mappings may be lazy (read on access).
    `out_tif` (uint8, nodata 255): the class index with the class colour table, names in the band tags
    `class_names` (JSON list) and `class_<i>`. With probs, `confidence` and/or `prob_bands`, a sibling
    `<stem>_probs.tif` on the same grid (GeoTIFF keeps a colour table only on single-band files) holds
    uint8 percent bands: the blended max probability ("confidence_percent"), then one band per class.
    strip_rows: rows written per window (default: the patch height). class_names / class_colors
    (uint8 [K, 3]): the model's classes when they are not the data file's (e.g. a PASTIS model on an
    unlabelled region); default the file's. Returns the class map's path.
    """
    rasterio = require("rasterio")
    if predictions is None and probs is None:
        raise UserFacingError("write_geotiff_map: give predictions (class maps) or probs")
    lay = read_layout(data_h5)
    if class_names is not None:
        lay.class_names = [str(n) for n in class_names]
        lay.class_colors = _colors(len(lay.class_names)) if class_colors is None else np.asarray(class_colors, np.uint8)
        if lay.class_colors.shape != (len(lay.class_names), 3):
            raise UserFacingError(f"class_colors: shape {lay.class_colors.shape}, expected ({len(lay.class_names)}, 3)")
    k = len(lay.class_names)
    if k > NODATA:
        raise UserFacingError(f"{data_h5}: {k} classes do not fit a uint8 map with nodata {NODATA}")
    source = probs if probs is not None else predictions
    keys = [key for key in lay.windows if key in source]
    unknown = [key for key in source if key not in lay.windows]
    if unknown:
        raise UserFacingError(f"predictions for patch(es) {unknown[:3]} that {data_h5} does not hold")
    if not keys:
        raise UserFacingError(f"write_geotiff_map: no prediction for any patch of {data_h5}")
    confidence, prob_bands = probs is not None and confidence, probs is not None and prob_bands
    extra = int(confidence) + (k if prob_bands else 0)
    strip = int(strip_rows or max(h for _, _, h, _ in lay.windows.values()))
    out = Path(out_tif)
    side = probs_path(out)
    tmps = [out.with_name(out.name + ".partial"), side.with_name(side.name + ".partial")]
    profile = {"driver": "GTiff", "height": lay.height, "width": lay.width, "count": 1, "dtype": "uint8",
               "crs": lay.crs, "transform": lay.affine, "nodata": NODATA, "compress": "deflate", "tiled": True,
               "blockxsize": 256, "blockysize": 256, "BIGTIFF": "IF_SAFER"}
    try:
        with contextlib.ExitStack() as stack:
            dst = stack.enter_context(rasterio.open(tmps[0], "w", **profile))
            aux = stack.enter_context(rasterio.open(tmps[1], "w", **{**profile, "count": extra})) if extra else None
            f = stack.enter_context(h5py.File(data_h5, "r"))
            _write_strips(dst, aux, f, lay, keys, predictions, probs, k, strip, confidence, prob_bands)
            _describe(dst, aux, lay, confidence, prob_bands)
        tmps[0].replace(out)
        if extra:
            tmps[1].replace(side)
    except BaseException:
        for t in tmps:
            t.unlink(missing_ok=True)
        raise
    return out


def probs_path(map_tif) -> Path:
    """The confidence / probability GeoTIFF written beside a class map: `<stem>_probs.tif`."""
    p = Path(map_tif)
    return p.with_name(f"{p.stem}_probs{p.suffix or '.tif'}")


def _write_strips(dst, aux, f, lay: AreaLayout, keys, predictions, probs, k, strip, confidence, prob_bands):
    Window = require("rasterio.windows").Window
    weights: dict[tuple[int, int], np.ndarray] = {}
    for y0 in range(0, lay.height, strip):
        sh = min(strip, lay.height - y0)
        valid = np.zeros((sh, lay.width), bool)
        if probs is not None:
            acc = np.zeros((k, sh, lay.width), np.float32)
            wsum = np.zeros((sh, lay.width), np.float32)
        else:
            best = np.full((sh, lay.width), -1.0, np.float32)
            cls = np.full((sh, lay.width), NODATA, np.uint8)
        for key in keys:
            r, c, h, w = lay.windows[key]
            a, b = max(r, y0), min(r + h, y0 + sh)
            if a >= b:
                continue
            pr = slice(a - r, b - r)   # rows inside the patch
            sr = slice(a - y0, b - y0)  # rows inside the strip
            g = f[f"patches/{key}"]
            if "valid_dates" in g:
                valid[sr, c:c + w] |= g["valid_dates"][pr, :] > 0
            else:
                valid[sr, c:c + w] = True
            if probs is not None:
                p = _check_patch(key, probs[key], (k, h, w), "probs")[:, pr].astype(np.float32)
                wt = weights.setdefault((h, w), blend_weight(h, w))[pr]
                acc[:, sr, c:c + w] += p * wt
                wsum[sr, c:c + w] += wt
            else:
                pred = _check_patch(key, predictions[key], (h, w), "prediction")[pr]
                score = weights.setdefault((h, w), centre_score(h, w))[pr]
                view_best, view_cls = best[sr, c:c + w], cls[sr, c:c + w]
                take = score > view_best
                view_best[take] = score[take]
                view_cls[take] = pred[take]
        window = Window(0, y0, lay.width, sh)
        if probs is not None:
            covered = wsum > 0
            mean = acc / np.where(covered, wsum, 1)[None]
            cls = mean.argmax(0).astype(np.uint8)
            nod = ~(covered & valid)
            cls[nod] = NODATA
            dst.write(cls, 1, window=window)
            band = 1
            if confidence:
                conf = np.rint(PERCENT * mean.max(0)).astype(np.uint8)
                conf[nod] = NODATA
                aux.write(conf, band, window=window)
                band += 1
            if prob_bands:
                pb = np.rint(PERCENT * mean).astype(np.uint8)
                pb[:, nod] = NODATA
                aux.write(pb, list(range(band, band + k)), window=window)
        else:
            cls[~valid | (best < 0)] = NODATA
            dst.write(cls, 1, window=window)


def _describe(dst, aux, lay: AreaLayout, confidence: bool, prob_bands: bool) -> None:
    dst.write_colormap(1, {i: (*map(int, lay.class_colors[i]), 255) for i in range(len(lay.class_names))})
    dst.set_band_description(1, "class")
    dst.update_tags(1, class_names=json.dumps(lay.class_names), ignore_index=str(lay.ignore_index),
                    **{f"class_{i}": n for i, n in enumerate(lay.class_names)})
    dst.update_tags(SOFTWARE="sitskit")
    if aux is None:
        return
    band = 1
    if confidence:
        aux.set_band_description(band, "confidence_percent")
        aux.update_tags(band, SCALE="0.01")
        band += 1
    if prob_bands:
        for i, n in enumerate(lay.class_names):
            aux.set_band_description(band + i, f"prob_percent:{n}")
            aux.update_tags(band + i, SCALE="0.01")
    aux.update_tags(SOFTWARE="sitskit", class_names=json.dumps(lay.class_names))


def map_class_names(map_tif) -> list[str]:
    rasterio = require("rasterio")
    with rasterio.open(map_tif) as src:
        tags = src.tags(1)
    if "class_names" not in tags:
        raise UserFacingError(f"{map_tif}: no class_names tag (not written by write_geotiff_map)")
    return json.loads(tags["class_names"])


def parcel_table(map_tif, parcels, out_gpkg=None, *, class_field: str | None = None,
                 class_map=None, id_field: str | None = None):
    """Per parcel of `parcels` (vector file or GeoDataFrame): the predicted class of the map, its share
    of the parcel's pixels, a confidence, and beside it the declared class with an agree flag.

    Pixels of a parcel: centres inside the polygon (all-touched off, as for the labels), nodata excluded.
    Columns: parcel (id_field value or row number), n_pixels, pred_index, pred_class, pred_share,
    confidence (mean of the `<stem>_probs.tif` confidence band over the pixels of the predicted class
    when that file exists, else pred_share), and with class_field: declared_code, declared_class
    (through class_map, a `code,class` CSV; without it the code is taken as the class name), agree.
    Written to out_gpkg (layer "parcels") if given; returns the GeoDataFrame.
    """
    rasterio = require("rasterio")
    gpd = require("geopandas")
    from rasterio import features, windows

    from .labels import _code_text, read_class_map

    names = map_class_names(map_tif)
    gdf = parcels if isinstance(parcels, gpd.GeoDataFrame) else gpd.read_file(parcels)
    if len(gdf) == 0:
        raise UserFacingError(f"{parcels}: the parcel layer has no features")
    if class_field and class_field not in gdf.columns:
        raise UserFacingError(f"{parcels}: no field {class_field!r}")
    code_map = read_class_map(class_map) if class_map else None
    rows = []
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(rasterio.open(map_tif))
        gdf = gdf.to_crs(src.crs) if gdf.crs is not None and gdf.crs != src.crs else gdf
        side = probs_path(map_tif)
        conf_src = stack.enter_context(rasterio.open(side)) if side.exists() else None
        has_conf = conf_src is not None and conf_src.descriptions[0] == "confidence_percent"
        for i, geom in enumerate(gdf.geometry):
            row = {"parcel": gdf[id_field].iloc[i] if id_field else i + 1, "n_pixels": 0, "pred_index": -1,
                   "pred_class": "", "pred_share": np.nan, "confidence": np.nan}
            if geom is not None and not geom.is_empty:
                fw = windows.from_bounds(*geom.bounds, transform=src.transform)
                c0, r0 = max(int(np.floor(fw.col_off)), 0), max(int(np.floor(fw.row_off)), 0)
                c1 = min(int(np.ceil(fw.col_off + fw.width)), src.width)
                r1 = min(int(np.ceil(fw.row_off + fw.height)), src.height)
                win = windows.Window(c0, r0, c1 - c0, r1 - r0) if c1 > c0 and r1 > r0 else None
                if win is not None:  # None: the parcel lies outside the map
                    cls = src.read(1, window=win)
                    inside = features.geometry_mask([geom], out_shape=cls.shape, invert=True,
                                                    transform=src.window_transform(win), all_touched=False)
                    inside &= cls != NODATA
                    vals = cls[inside]
                    if vals.size:
                        counts = np.bincount(vals, minlength=len(names))
                        top = int(counts.argmax())
                        share = float(counts[top] / vals.size)
                        conf = share
                        if has_conf:
                            conf = float(conf_src.read(1, window=win)[inside & (cls == top)].mean() / PERCENT)
                        row.update(n_pixels=int(vals.size), pred_index=top, pred_class=names[top],
                                   pred_share=share, confidence=conf)
            if class_field:
                code = _code_text(gdf[class_field].iloc[i])
                declared = code_map.get(code, "") if code_map is not None else code
                row.update(declared_code=code, declared_class=declared,
                           agree=bool(row["pred_index"] >= 0 and declared == row["pred_class"]))
            rows.append(row)
    table = gpd.GeoDataFrame(rows, geometry=list(gdf.geometry), crs=gdf.crs)
    if out_gpkg is not None:
        _write_gpkg(table, out_gpkg)
    return table


def _write_gpkg(table, out_gpkg) -> None:
    out = Path(out_gpkg)
    tmp = out.with_name(out.stem + ".partial" + out.suffix)
    tmp.unlink(missing_ok=True)
    try:
        table.to_file(tmp, layer="parcels", driver="GPKG")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def instance_polygons(data_h5, instances: Mapping, classes: Mapping, scores: Mapping | None = None,
                      out_gpkg=None, class_names: list[str] | None = None):
    """Predicted parcels as polygons: vectorise each patch's instance map (rasterio.features.shapes).

    instances: key -> instance ids [H, W] (0 = none); classes: key -> class index [H, W] (an instance's
    class is the majority over its pixels); scores: optional key -> {instance id: score}. An instance
    seen by several overlapping patches is reported once: polygons of different patches that share
    area are views of one parcel and are merged (union; patch, instance, class and score of the largest
    view, n_pixels of the union). Columns: patch, instance, pred_index, pred_class,
    score, n_pixels, geometry. Written to out_gpkg (layer "parcels") if given; returns the GeoDataFrame.
    """
    gpd = require("geopandas")
    from rasterio import features
    from shapely.geometry import shape
    from shapely.ops import unary_union

    lay = read_layout(data_h5)
    names = [str(n) for n in class_names] if class_names is not None else lay.class_names
    affine_cls = require("affine").Affine
    x0, a, b, y0, d, e = lay.transform
    rows = []
    for key in (k for k in lay.windows if k in instances):
        r, c, h, w = lay.windows[key]
        inst = _check_patch(key, instances[key], (h, w), "instances").astype(np.int32)
        cls = _check_patch(key, classes[key], (h, w), "classes")
        affine = affine_cls.from_gdal(x0 + c * a + r * b, a, b, y0 + c * d + r * e, d, e)
        pieces: dict[int, list] = {}
        for geom, value in features.shapes(inst, mask=inst != 0, transform=affine):
            pieces.setdefault(int(value), []).append(shape(geom))
        for iid, parts in sorted(pieces.items()):
            mask = inst == iid
            top = int(np.bincount(np.asarray(cls)[mask].astype(np.int64)).argmax())
            score = float(scores[key].get(iid, np.nan)) if scores is not None and key in scores else np.nan
            rows.append({"patch": key, "instance": iid, "pred_index": top, "pred_class": names[top],
                         "score": score, "n_pixels": int(mask.sum()), "geometry": unary_union(parts)})
    rows = _merge_views(rows, abs(a * e - b * d))
    table = gpd.GeoDataFrame(rows, geometry="geometry", crs=lay.crs) if rows else gpd.GeoDataFrame(
        {"patch": [], "instance": [], "pred_index": [], "pred_class": [], "score": [], "n_pixels": []},
        geometry=[], crs=lay.crs)
    if out_gpkg is not None:
        _write_gpkg(table, out_gpkg)
    return table


def _merge_views(rows: list[dict], pixel_area: float) -> list[dict]:
    """Union the polygons of different patches that share area (connected components of the overlap graph)."""
    from shapely import STRtree
    from shapely.ops import unary_union
    if not rows:
        return rows
    geoms = [row["geometry"] for row in rows]
    parent = list(range(len(rows)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*STRtree(geoms).query(geoms)):
        if i < j and rows[i]["patch"] != rows[j]["patch"] and geoms[i].intersection(geoms[j]).area > 0:
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(root(i), []).append(i)
    merged = []
    for members in groups.values():
        best = dict(rows[max(members, key=lambda m: rows[m]["n_pixels"])])
        if len(members) > 1:
            best["geometry"] = unary_union([geoms[m] for m in members])
            best["n_pixels"] = round(best["geometry"].area / pixel_area)
        merged.append(best)
    return sorted(merged, key=lambda row: (row["patch"], row["instance"]))


class H5Arrays(Mapping):
    """Lazy key -> array view of `/patches/<key>/<name>` in an HDF5 file (e.g. a predictions file,
    docs/predictions.md): arrays are read when the map writer reaches their patch."""

    def __init__(self, f: h5py.File, name: str):
        self.group, self.name = f["patches"], name
        self._keys = [k for k in self.group if name in self.group[k]]

    def __getitem__(self, key):
        return self.group[f"{key}/{self.name}"][()]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def conversion_labels(data_h5) -> dict:
    """The --labels / --class-field / --class-map a `data_prep.py geotiff` file was converted with."""
    with open_sits(data_h5) as f:
        settings = json.loads(_s(f.attrs.get("conversion_settings", "{}")))
    return {k: settings.get(k) for k in ("labels", "class_field", "class_map")}


def export_maps(data_h5, map_tif, *, predictions_h5=None, predictions: Mapping | None = None,
                probs: Mapping | None = None, parcels_out=None, instances_out=None, instances: Mapping | None = None,
                parcels=None, class_field: str | None = None, class_map=None, prob_bands: bool = False,
                class_names: list[str] | None = None) -> dict:
    """Everything `finetune.py predict --geotiff MAP.tif [--parcels OUT.gpkg]` writes, in one call.

    Predictions come from a predictions file (`predictions_h5`: /patches/<key>/semantic and optional
    probs, docs/predictions.md) or from the `predictions` / `probs` mappings. The parcel table uses
    `parcels` / `class_field` / `class_map`, by default those the data file was converted with.
    `instances` (key -> instance ids [H, W]) with `instances_out` writes the predicted parcels.
    class_names: the model's classes (default: the predictions file's `class_names`, else the data file's).
    Returns {"map": path, "probs": path or None, "parcels": path or None, "instances": path or None}.
    """
    with contextlib.ExitStack() as stack:
        if predictions_h5 is not None:
            f = stack.enter_context(h5py.File(predictions_h5, "r"))
            predictions = H5Arrays(f, "semantic")
            found = H5Arrays(f, "probs")
            probs = found if len(found) else None
            if class_names is None and "class_names" in f.attrs:
                class_names = [_s(n) for n in f.attrs["class_names"]]
        out = write_geotiff_map(map_tif, data_h5, predictions=predictions, probs=probs, prob_bands=prob_bands,
                                class_names=class_names)
        result = {"map": out, "probs": probs_path(out) if probs is not None else None, "parcels": None,
                  "instances": None}
        if parcels_out is not None:
            recorded = conversion_labels(data_h5)
            parcels = parcels or recorded["labels"]
            if not parcels:
                raise UserFacingError(f"--parcels {parcels_out}: {data_h5} was converted without --labels; "
                                      f"give the parcel layer")
            parcel_table(out, parcels, parcels_out, class_field=class_field or recorded["class_field"],
                         class_map=class_map or recorded["class_map"])
            result["parcels"] = Path(parcels_out)
        if instances_out is not None and instances is not None:
            classes = predictions if predictions is not None else {k: np.asarray(p).argmax(0) for k, p in probs.items()}
            instance_polygons(data_h5, instances, classes, out_gpkg=instances_out, class_names=class_names)
            result["instances"] = Path(instances_out)
    return result


def plot_map(map_tif, out_png, parcels=None, title: str | None = None) -> Path:
    """Quick-look PNG of a class map (its colour table) with parcel outlines (vector file or GeoDataFrame)."""
    rasterio = require("rasterio")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = map_class_names(map_tif)
    with rasterio.open(map_tif) as src:
        cls = src.read(1)
        cmap = src.colormap(1)
        extent = (src.bounds.left, src.bounds.right, src.bounds.bottom, src.bounds.top)
        crs = src.crs
    rgb = np.zeros((*cls.shape, 3), np.uint8)
    for i in np.unique(cls):
        rgb[cls == i] = cmap.get(int(i), (128, 128, 128, 255))[:3] if i != NODATA else (200, 200, 200)
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110)
    ax.imshow(rgb, extent=extent, interpolation="nearest")
    if parcels is not None:
        gpd = require("geopandas")
        gdf = parcels if isinstance(parcels, gpd.GeoDataFrame) else gpd.read_file(parcels)
        # white: the black background borders between parcels would hide black outlines
        gdf.to_crs(crs).boundary.plot(ax=ax, color="white", linewidth=0.7)
    present = [int(i) for i in np.unique(cls) if i != NODATA]
    ax.legend(handles=[Patch(color=np.array(cmap[i][:3]) / 255, label=names[i]) for i in present],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.set_xlabel(f"x (m, {crs.to_string()})")
    ax.set_ylabel("y (m)")
    ax.ticklabel_format(style="plain", useOffset=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
