"""Simulated GeoTIFF scene -> HDF5 -> stitched GeoTIFF map, parcel table, instance polygons (docs/own_region.md)."""
from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")
# rasterio with affine >= 3 warns about `*` on its own transforms
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
import shapely

from sitskit.constants import PASTIS_CLASSES, PASTIS_VOID
from sitskit.data_prep.cli import main as data_prep
from sitskit.geo import maps
from sitskit.simulate.geotiff import CROP_CODES, simulate_geotiff

SIZE, PATCH, STRIDE, K = 64, 32, 24, len(PASTIS_CLASSES)  # patch starts 0, 24, 32 on each axis


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    sim = simulate_geotiff(root / "scene", size=SIZE, seed=1, n_dates=6)
    out = root / "scene.h5"
    assert data_prep(["geotiff", "--images", str(sim), "--labels", str(sim / "parcels.gpkg"), "--class-field",
                      "CODE", "--class-map", str(sim / "crop_codes.csv"), "--cloud-masks", str(sim / "clouds"),
                      "--out", str(out), "--patch-size", str(PATCH), "--stride", str(STRIDE)]) == 0
    return sim, out


def coverage(h5) -> tuple[np.ndarray, dict]:
    """How many patches cover each pixel, and the windows."""
    lay = maps.read_layout(h5)
    n = np.zeros((lay.height, lay.width), int)
    for r, c, h, w in lay.windows.values():
        n[r:r + h, c:c + w] += 1
    return n, lay.windows


def random_outputs(h5, seed=0):
    rng = np.random.default_rng(seed)
    with h5py.File(h5, "r") as f:
        keys = sorted(f["patches"])
    probs = {k: rng.dirichlet(np.ones(K), size=(PATCH, PATCH)).transpose(2, 0, 1).astype(np.float32) for k in keys}
    return probs, {k: p.argmax(0) for k, p in probs.items()}


def test_simulated_scene_files(scene):
    sim, h5 = scene
    tifs = sorted(sim.glob("S2_*.tif"))
    assert len(tifs) == 6 and len(list((sim / "clouds").glob("*.tif"))) == 6
    with rasterio.open(tifs[0]) as src:
        assert src.crs.to_epsg() == 32631 and src.count == 10 and src.dtypes[0] == "int16"
        assert (src.width, src.height) == (SIZE, SIZE) and src.res == (10.0, 10.0)
    with (sim / "crop_codes.csv").open() as fh:
        codes = {row["code"]: row["class"] for row in csv.DictReader(fh)}
    assert codes == {c: PASTIS_CLASSES[i] for i, c in CROP_CODES.items()}  # quoted "Fruits, vegetables, …"
    parcels = gpd.read_file(sim / "parcels.gpkg")
    assert len(parcels) > 5 and set(parcels["CODE"]) <= set(codes)
    # the polygons reproduce the simulated labels exactly wherever neither side is void
    with rasterio.open(sim / "truth" / "semantic.tif") as src:
        truth = src.read(1)
    with h5py.File(h5, "r") as f:
        g = f["patches/r000000_c000000"]
        sem = g["semantic"][()]
        assert g["valid_dates"][()].max() <= 6
    t = truth[:PATCH, :PATCH]
    both = (sem != PASTIS_VOID) & (t != PASTIS_VOID)
    assert both.mean() > 0.5 and (sem[both] == t[both]).all()


def test_stitched_map_grid_and_single_cover_pixels(scene, tmp_path):
    sim, h5 = scene
    probs, preds = random_outputs(h5)
    n, windows = coverage(h5)
    out_p = maps.write_geotiff_map(tmp_path / "p.tif", h5, probs=probs, prob_bands=True)
    out_c = maps.write_geotiff_map(tmp_path / "c.tif", h5, predictions=preds)
    out_s = maps.write_geotiff_map(tmp_path / "s.tif", h5, probs=probs, strip_rows=7)  # other windows
    with rasterio.open(next(sim.glob("S2_*.tif"))) as ref, \
            rasterio.open(out_p) as mp, rasterio.open(out_c) as mc, rasterio.open(out_s) as ms, \
            rasterio.open(maps.probs_path(out_p)) as pp:
        assert mp.crs == ref.crs and mp.transform == ref.transform and mp.shape == ref.shape
        assert mc.crs == ref.crs and mc.transform == ref.transform and mc.count == 1
        assert mp.colormap(1)[1][:3] == (122, 189, 82)
        assert maps.map_class_names(out_p) == PASTIS_CLASSES
        cls_p, cls_c, cls_s, conf, p3 = mp.read(1), mc.read(1), ms.read(1), pp.read(1), pp.read(2 + 3)
        assert pp.count == 1 + K
    np.testing.assert_array_equal(cls_p, cls_s)
    checked = 0
    for key, (r, c, h, w) in windows.items():
        single = n[r:r + h, c:c + w] == 1
        if not single.any():  # the middle patches (start 24) lie under their neighbours everywhere
            continue
        checked += 1
        np.testing.assert_array_equal(cls_p[r:r + h, c:c + w][single], preds[key][single])
        np.testing.assert_array_equal(cls_c[r:r + h, c:c + w][single], preds[key][single])
        np.testing.assert_array_equal(conf[r:r + h, c:c + w][single],
                                      np.rint(100 * probs[key].max(0))[single].astype(np.uint8))
        np.testing.assert_array_equal(p3[r:r + h, c:c + w][single],
                                      np.rint(100 * probs[key][3])[single].astype(np.uint8))
    assert checked == 4
    # an overlap pixel: the sine-weighted mean of the patches covering it, worked out directly
    y, x = 28, 28
    assert n[y, x] == 4
    num, den = np.zeros(K), 0.0
    for key, (r, c, h, w) in windows.items():
        if r <= y < r + h and c <= x < c + w:
            wt = np.sin(np.pi * (y - r + 0.5) / h) * np.sin(np.pi * (x - c + 0.5) / w)
            num += wt * probs[key][:, y - r, x - c]
            den += wt
    assert cls_p[y, x] == (num / den).argmax()
    # centre crop: the pixel goes to the patch in which it is farthest from the border (here r24_c24)
    assert cls_c[y, x] == preds["r000024_c000024"][y - 24, x - 24]


def test_no_valid_date_is_nodata(scene, tmp_path):
    _, h5 = scene
    local = tmp_path / "copy.h5"
    local.write_bytes(h5.read_bytes())
    with h5py.File(local, "r+") as f:
        f["patches/r000000_c000000/valid_dates"][0, 0:3] = 0
    probs, _ = random_outputs(local)
    with rasterio.open(maps.write_geotiff_map(tmp_path / "m.tif", local, probs=probs)) as src:
        cls = src.read(1)
        assert src.nodata == 255
    assert (cls[0, 0:3] == 255).all() and (cls[0, 3:] != 255).all() and (cls[1:] != 255).all()


def test_parcel_table_majority_equals_a_direct_count(scene, tmp_path):
    sim, h5 = scene
    _, preds = random_outputs(h5, seed=5)
    coarse = {k: (p // 7).astype(np.int64) for k, p in preds.items()}  # classes 0..2: clear majorities
    tif = maps.write_geotiff_map(tmp_path / "m.tif", h5, predictions=coarse)
    table = maps.parcel_table(tif, sim / "parcels.gpkg", tmp_path / "t.gpkg", class_field="CODE",
                              class_map=sim / "crop_codes.csv")
    with rasterio.open(tif) as src:
        cls, tr = src.read(1), src.transform
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    xs, ys = tr.c + (cols + 0.5) * tr.a, tr.f + (rows + 0.5) * tr.e
    parcels = gpd.read_file(sim / "parcels.gpkg")
    assert len(table) == len(parcels) and (tmp_path / "t.gpkg").exists()
    for geom, (_, row) in zip(parcels.geometry, table.iterrows()):
        inside = shapely.contains_xy(geom, xs, ys)
        counts = np.bincount(cls[inside], minlength=K)
        assert row["n_pixels"] == inside.sum()
        assert row["pred_index"] == counts.argmax() and row["pred_class"] == PASTIS_CLASSES[counts.argmax()]
        assert row["pred_share"] == pytest.approx(counts.max() / inside.sum())
        assert row["agree"] == (row["declared_class"] == row["pred_class"])
    # the truth as prediction: every parcel mostly inside its patches agrees with its declaration
    with h5py.File(h5, "r") as f:
        truth = {k: f[f"patches/{k}/semantic"][()] for k in f["patches"]}
    tif = maps.write_geotiff_map(tmp_path / "truth.tif", h5, predictions=truth)
    table = maps.parcel_table(tif, sim / "parcels.gpkg", class_field="CODE", class_map=sim / "crop_codes.csv")
    big = table["n_pixels"] >= 50
    assert big.sum() >= 3 and table.loc[big, "agree"].all()


def test_instance_polygons_are_exact_and_kept_once(scene, tmp_path):
    sim, h5 = scene
    with h5py.File(h5, "r") as f:
        inst = {k: f[f"patches/{k}/instances"][()] for k in f["patches"]}
        sem = {k: f[f"patches/{k}/semantic"][()] for k in f["patches"]}
    table = maps.instance_polygons(h5, inst, sem, out_gpkg=tmp_path / "inst.gpkg")
    assert len(table) > 5 and (tmp_path / "inst.gpkg").exists()
    np.testing.assert_allclose(table.geometry.area, table["n_pixels"] * 100.0)  # 10 m pixels, exact outlines
    assert table.crs.to_epsg() == 32631
    # every parcel once: as many polygons as declared parcels, and none overlaps another
    assert len(table) == len(gpd.read_file(sim / "parcels.gpkg"))
    geoms = list(table.geometry)
    assert all(geoms[i].intersection(geoms[j]).area == 0 for i in range(len(geoms)) for j in range(i))


def test_simulate_cli_writes_the_geotiff_format(tmp_path, capsys):
    out = tmp_path / "sim"
    assert data_prep(["simulate", "--format", "geotiff", "--size", "32", "--out", str(out)]) == 0
    tifs = sorted(out.glob("S2_*.tif"))
    assert 38 <= len(tifs) <= 61 and (out / "parcels.gpkg").exists() and (out / "crop_codes.csv").exists()
    assert data_prep(["simulate", "--format", "geotiff", "--size", "32", "--out", str(out)]) == 2  # not empty


def test_export_maps_from_a_predictions_file_with_recorded_parcels(scene, tmp_path):
    sim, h5 = scene
    probs, preds = random_outputs(h5, seed=2)
    from sitskit.finetune.predictions import write_predictions  # the predictions file of docs/predictions.md
    pred_file = write_predictions(tmp_path / "pred.h5", h5, [(k, preds[k], probs[k]) for k in preds],
                                  model="random", checkpoint="-")
    got = maps.export_maps(h5, tmp_path / "map.tif", predictions_h5=pred_file, parcels_out=tmp_path / "parcels.gpkg")
    assert got["probs"].exists() and got["parcels"].exists()
    table = gpd.read_file(got["parcels"])
    assert len(table) == len(gpd.read_file(sim / "parcels.gpkg"))  # the layer recorded at conversion
    assert set(table.columns) >= {"pred_class", "pred_share", "confidence", "declared_class", "agree"}
    assert ((table["confidence"] > 0) & (table["confidence"] <= 1)).all()


def test_unlabelled_region_is_pretrain_only(scene, tmp_path):
    from sitskit.data.datasets import build_dataset
    from sitskit.errors import UserFacingError
    sim, _ = scene
    out = tmp_path / "u.h5"
    assert data_prep(["geotiff", "--images", str(sim), "--out", str(out), "--patch-size", "32"]) == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["has_labels"] == 0 and (f["patches/r000000_c000000/semantic"][()] == 1).all()
    assert len(build_dataset(out, task="pretrain")) == 4
    with pytest.raises(UserFacingError, match="only task 'pretrain'"):
        build_dataset(out, task="semantic")


def test_model_classes_other_than_the_files_and_shape_errors(scene, tmp_path):
    from sitskit.errors import UserFacingError
    _, h5 = scene
    rng = np.random.default_rng(4)
    with h5py.File(h5, "r") as f:
        keys = sorted(f["patches"])
    probs3 = {k: rng.dirichlet(np.ones(3), size=(PATCH, PATCH)).transpose(2, 0, 1) for k in keys}
    tif = maps.write_geotiff_map(tmp_path / "m.tif", h5, probs=probs3, class_names=["bg", "crop", "void"])
    assert maps.map_class_names(tif) == ["bg", "crop", "void"]
    with rasterio.open(tif) as src:
        assert set(np.unique(src.read(1))) <= {0, 1, 2}
    with pytest.raises(UserFacingError, match=r"probs of patch r000000_c000000: shape \(3, 32, 32\), expected \(20"):
        maps.write_geotiff_map(tmp_path / "bad.tif", h5, probs=probs3)
    assert not list(tmp_path.glob("bad*"))  # nothing left behind
    with pytest.raises(UserFacingError, match="does not hold"):
        maps.write_geotiff_map(tmp_path / "bad.tif", h5, predictions={"r999999_c000000": np.zeros((PATCH, PATCH))})


def test_simulate_geotiff_refuses_pastis_only_options(tmp_path, capsys):
    assert data_prep(["simulate", "--format", "geotiff", "--with-s1", "--out", str(tmp_path / "s")]) == 2
    assert "not for --format geotiff" in capsys.readouterr().err and not (tmp_path / "s").exists()
