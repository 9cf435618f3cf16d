"""`data_prep.py geotiff`: scene stack + parcel polygons -> sitskit HDF5 (docs/own_region.md).

Small hand-built scenes (64x64 px, 6 dates, 3 bands) on a UTM grid, with rectangular parcels on pixel
edges so that pixel counts are known exactly, and one triangle checked against pixel-centre tests.
"""
from __future__ import annotations

import datetime as dt
import sys

import h5py
import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")
# rasterio with affine >= 3 warns about `*` on its own transforms
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
from affine import Affine
from h5compare import h5_differences
from shapely.geometry import Point, Polygon, box

from sitskit.data.datasets import build_dataset
from sitskit.data_prep.cli import main as data_prep
from sitskit.errors import UserFacingError
from sitskit.geo import labels as L
from sitskit.geo import patches as P
from sitskit.geo import require
from sitskit.simulate.instances import centerness

X0, Y0, RES = 500000.0, 5000000.0, 10.0
TRANSFORM = Affine(RES, 0.0, X0, 0.0, -RES, Y0)
DATES = [dt.date(2019, 3, 1) + dt.timedelta(days=15 * i) for i in range(6)]
BANDS = ["B2", "B3", "B4"]


def write_scene(path, data, crs="EPSG:32631", transform=TRANSFORM, nodata=None):
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)


def make_stack(folder, h=64, w=64, n_bands=3, nodata_pixel=None):
    """Six dated scenes; data value = 100 * date index + 10 * band + (row + col) % 10 (checked below)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = np.mgrid[0:h, 0:w]
    for t, d in enumerate(DATES):
        data = np.stack([100 * (t + 1) + 10 * b + (rows + cols) % 10 for b in range(n_bands)]).astype(np.uint16)
        if nodata_pixel is not None:
            data[:, nodata_pixel[0], nodata_pixel[1]] = 0
        write_scene(folder / f"S2_{d:%Y%m%d}.tif", data, nodata=0 if nodata_pixel is not None else None)
    return folder


def px_box(r0, r1, c0, c1):
    """Polygon covering pixel rows r0..r1-1 and columns c0..c1-1 exactly."""
    return box(X0 + c0 * RES, Y0 - r1 * RES, X0 + c1 * RES, Y0 - r0 * RES)


TRIANGLE = Polygon([(X0 + 40 * RES, Y0 - 40 * RES), (X0 + 60 * RES, Y0 - 42 * RES), (X0 + 45 * RES, Y0 - 62 * RES)])


def make_parcels(path, extra=()):
    """A: 10x15 px wheat in patch (0, 0); B: 1x3 px maize (too small -> void); C: 10x12 px maize across the
    patch border at column 32 (4 columns left = 1/3 -> void there, 8 right = 2/3 -> maize); D: a maize
    triangle inside patch (32, 32)."""
    rows = [{"CODE": "WHT", "geometry": px_box(2, 12, 3, 18)},
            {"CODE": "MZ", "geometry": px_box(20, 21, 20, 23)},
            {"CODE": "MZ", "geometry": px_box(5, 15, 28, 40)},
            {"CODE": "MZ", "geometry": TRIANGLE}, *extra]
    gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:32631").to_file(path, driver="GPKG")
    return path


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    root = tmp_path_factory.mktemp("region")
    make_stack(root / "scenes", nodata_pixel=(63, 63))
    make_parcels(root / "parcels.gpkg")
    (root / "codes.csv").write_text("code,class\nWHT,wheat\nMZ,maize\n")
    return root


def convert_args(root, out, *extra):
    return ["geotiff", "--images", str(root / "scenes"), "--bands", *BANDS, "--labels", str(root / "parcels.gpkg"),
            "--class-field", "CODE", "--class-map", str(root / "codes.csv"), "--out", str(out),
            "--patch-size", "32", "--split-block", "32", *extra]


@pytest.fixture(scope="module")
def region_h5(region):
    out = region / "region.h5"
    assert data_prep(convert_args(region, out)) == 0
    return out


def test_images_dates_and_geotransform(region_h5):
    with h5py.File(region_h5, "r") as f:
        assert f.attrs["dataset"] == "geotiff" and f.attrs["crs"] == "EPSG:32631"
        assert [c for c in f.attrs["class_names"]] == ["Background", "wheat", "maize", "Void label"]
        assert f.attrs["ignore_index"] == 3 and f.attrs["reference_date"] == "2018-09-01"
        assert sorted(f["patches"]) == ["r000000_c000000", "r000000_c000032", "r000032_c000000", "r000032_c000032"]
        g = f["patches/r000032_c000032"]
        data = g["S2/data"][()]
        assert data.shape == (6, 3, 32, 32) and data.dtype == np.int16
        rows, cols = np.mgrid[32:64, 32:64]
        expected = 300 + 10 + (rows + cols) % 10
        expected[31, 31] = 0  # the nodata pixel (63, 63)
        np.testing.assert_array_equal(data[2, 1], expected)  # windowed read is exact
        assert [d.decode() for d in g["S2/date"][()]] == [d.isoformat() for d in DATES]
        assert g["S2/day"][0] == (DATES[0] - dt.date(2018, 9, 1)).days
        np.testing.assert_allclose(g.attrs["geotransform"], [X0 + 320, 10, 0, Y0 - 320, 0, -10])
        assert g.attrs["crs"] == "EPSG:32631" and g.attrs["row"] == 32 and g.attrs["col"] == 32
        valid = g["valid_dates"][()]
        assert valid[31, 31] == 0 and (np.delete(valid.ravel(), -1) == 6).all()  # the nodata pixel


def test_rasterisation_pixel_counts_void_rule_and_instances(region_h5):
    with h5py.File(region_h5, "r") as f:
        p00, p01, p11 = (f[f"patches/{k}"] for k in ("r000000_c000000", "r000000_c000032", "r000032_c000032"))
        sem00, pid00 = p00["semantic"][()], p00["parcel_ids"][()]
        assert (sem00 == 1).sum() == 150                      # A: 10 x 15 px wheat
        assert ((pid00 == 1) == (sem00 == 1)).all()
        assert (pid00 == 2).sum() == 3 and (sem00[pid00 == 2] == 3).all()   # B: 3 px < MIN_PARCEL_PX -> void
        assert (pid00 == 3).sum() == 40 and (sem00[pid00 == 3] == 3).all()  # C: 1/3 inside -> void
        assert (sem00 == 2).sum() == 0
        sem01 = p01["semantic"][()]
        assert (sem01 == 2).sum() == 80 and (p01["parcel_ids"][()] == 3).sum() == 80  # C: 2/3 inside -> maize
        # D: all-touched off = exactly the pixels whose centre is inside the triangle
        centres = [(r, c) for r in range(32, 64) for c in range(32, 64)
                   if TRIANGLE.contains(Point(X0 + (c + 0.5) * RES, Y0 - (r + 0.5) * RES))]
        sem11 = p11["semantic"][()]
        assert (sem11 == 2).sum() == len(centres) > 100
        assert all(sem11[r - 32, c - 32] == 2 for r, c in centres)
        # instances: consecutive codes by sorted parcel id, void parcels keep theirs; heatmap/zones by the
        # PASTIS rules
        inst00 = p00["instances"][()]
        assert sorted(np.unique(inst00)) == [0, 1, 2, 3]
        assert (inst00[pid00 == 1] == 1).all() and (inst00[pid00 == 3] == 3).all()
        heat, zones = centerness(inst00)
        np.testing.assert_array_equal(p00["heatmap"][()], heat)
        np.testing.assert_array_equal(p00["zones"][()], zones)
        assert p00.attrs["n_parcel"] == 3
        np.testing.assert_array_equal(p00.attrs["class_pixels"], [32 * 32 - 193, 150, 0, 43])


def test_build_dataset_semantic_and_panoptic(region_h5):
    with h5py.File(region_h5, "r") as f:
        splits = [s.decode() for s in f["index/split"][()]]
    assert set(splits) <= {"train", "val", "test"} and len(set(splits)) == 3  # 4 blocks: 2 / 1 / 1
    sizes = {s: len(build_dataset(region_h5, task="semantic", split=s)) for s in ("train", "val", "test")}
    assert sizes == {s: splits.count(s) for s in ("train", "val", "test")}
    ds = build_dataset(region_h5, task="panoptic", norm="source")
    assert ds.num_classes == 4 and ds.ignore_index == 3
    sample = ds[ds.ids.index("r000000_c000000")]
    assert sample["image"].shape == (6, 3, 32, 32) and sample["semantic"].shape == (32, 32)
    assert int((sample["semantic"] == 1).sum()) == 150
    assert set(sample) >= {"heatmap", "instances", "zones", "size", "object_class"}
    assert float(sample["size"][0][sample["instances"] == 1].max()) == 10  # A spans 10 rows
    with pytest.raises(UserFacingError, match="split"):
        build_dataset(region_h5, task="semantic", folds=[1])


def test_workers_give_the_same_file(region, region_h5, tmp_path):
    out = tmp_path / "w.h5"
    assert data_prep(convert_args(region, out, "--workers", "2")) == 0
    assert h5_differences(region_h5, out) == []


def test_patch_windows_cover_the_area_and_split_by_block():
    wins = P.patch_windows(100, 70, 32, 24)
    assert [w.row for w in wins if w.col == 0] == [0, 24, 48, 68]
    assert [w.col for w in wins if w.row == 0] == [0, 24, 38]
    covered = np.zeros((100, 70), bool)
    for w in wins:
        covered[w.row:w.row + 32, w.col:w.col + 32] = True
    assert covered.all()
    splits = P.spatial_block_split(wins, 24, seed=3)
    blocks = {}
    for w, s in zip(wins, splits):
        blocks.setdefault((w.row // 24, w.col // 24), set()).add(s)
    assert all(len(v) == 1 for v in blocks.values())  # a block never mixes splits
    assert splits == P.spatial_block_split(wins, 24, seed=3)  # seeded
    assert sorted(set(splits)) == ["test", "train", "val"]  # 6 blocks: 4 / 1 / 1
    with pytest.raises(UserFacingError, match="larger than"):
        P.patch_windows(20, 70, 32)


# ----------------------------------------------------------------------------------- bad input: exit 2
def _bad_scene_crs(root):
    write_scene(root / "scenes" / "S2_20190415.tif", np.ones((3, 64, 64), np.uint16), crs="EPSG:32632")
    return "S2_20190415.tif: CRS EPSG:32632 differs"


def _bad_scene_size(root):
    write_scene(root / "scenes" / "S2_20190430.tif", np.ones((3, 64, 60), np.uint16))
    return "S2_20190430.tif: size 64x60 px differs"


def _bad_band_count(root):
    write_scene(root / "scenes" / "S2_20190515.tif", np.ones((4, 64, 64), np.uint16))
    return "S2_20190515.tif: has 4 bands"


def _bad_date(root):
    write_scene(root / "scenes" / "S2_spring.tif", np.ones((3, 64, 64), np.uint16))
    return "S2_spring.tif: cannot read a date"


def _empty_layer(root):
    gpd.GeoDataFrame({"CODE": []}, geometry=[], crs="EPSG:32631").to_file(root / "parcels.gpkg", driver="GPKG")
    return "the layer has no features"


def _unknown_code(root):
    make_parcels(root / "parcels.gpkg", extra=[{"CODE": "XYZ", "geometry": px_box(40, 50, 2, 9)}])
    return "crop code(s) ['XYZ']"


@pytest.mark.parametrize("spoil", [_bad_scene_crs, _bad_scene_size, _bad_band_count, _bad_date, _empty_layer,
                                   _unknown_code])
def test_bad_input_is_one_line_exit_2_nothing_left(tmp_path, capsys, spoil):
    make_stack(tmp_path / "scenes")
    make_parcels(tmp_path / "parcels.gpkg")
    (tmp_path / "codes.csv").write_text("code,class\nWHT,wheat\nMZ,maize\n")
    expected = spoil(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = tmp_path / "region.h5"
    assert data_prep(convert_args(tmp_path, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    if "differs" in expected:
        assert "gdalwarp" in err and "rio warp" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no region.h5, no .partial


def test_label_raster_gives_components_as_parcels(tmp_path):
    make_stack(tmp_path / "scenes")
    lab = np.zeros((1, 64, 64), np.uint8)
    lab[0, 2:12, 3:18] = 7      # code 7 -> wheat: one 150 px parcel
    lab[0, 20:22, 20:22] = 9    # code 9 -> maize: 4 px parcel (kept, = MIN_PARCEL_PX)
    lab[0, 40:41, 40:43] = 9    # 3 px -> void
    write_scene(tmp_path / "labels.tif", lab)
    (tmp_path / "codes.csv").write_text("code,class\n7,wheat\n9,maize\n")
    out = tmp_path / "r.h5"
    assert data_prep(["geotiff", "--images", str(tmp_path / "scenes"), "--bands", *BANDS, "--label-raster",
                      str(tmp_path / "labels.tif"), "--class-map", str(tmp_path / "codes.csv"), "--out", str(out),
                      "--patch-size", "32"]) == 0
    with h5py.File(out, "r") as f:
        s00, s11 = f["patches/r000000_c000000/semantic"][()], f["patches/r000032_c000032/semantic"][()]
        assert (s00 == 1).sum() == 150 and (s00 == 2).sum() == 4 and (s11 == 3).sum() == 3
        assert sorted(np.unique(f["patches/r000000_c000000/instances"][()])) == [0, 1, 2]


def test_class_table_keeps_pastis_indices_for_pastis_names():
    t = L.class_table({"BTH": "Soft winter wheat", "MIS": "Corn"})
    assert t.code_to_index == {"BTH": 2, "MIS": 3} and t.void == 19 and len(t.names) == 20
    t = L.class_table({"a": "wheat", "b": "maize", "c": "wheat"})
    assert t.names == ["Background", "wheat", "maize", "Void label"] and t.code_to_index == {"a": 1, "b": 2, "c": 1}


def test_missing_geo_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "rasterio", None)
    with pytest.raises(UserFacingError, match=r"pip install 'sitskit\[geo\]'"):
        require("rasterio")


@pytest.mark.slow  # two CLI processes, ~10 s
def test_killed_conversion_resumes_to_the_same_file(region, region_h5, tmp_path):
    import os
    import signal
    import subprocess

    from sitskit.data_prep.h5schema import _TEST_KILL_HOOK_ENV as KILL_HOOK_ENV
    out = tmp_path / "k.h5"
    args = [sys.executable, "-m", "sitskit.data_prep.cli", *convert_args(region, out)]
    env = {**os.environ, KILL_HOOK_ENV: "2.5", "OMP_NUM_THREADS": "1"}  # halfway through the 3rd patch
    killed = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and out.with_name("k.h5.partial").exists()
    env.pop(KILL_HOOK_ENV)
    done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert h5_differences(region_h5, out) == []


def test_parcels_in_another_crs_are_reprojected(region, tmp_path):
    (tmp_path / "scenes").symlink_to(region / "scenes")
    (tmp_path / "codes.csv").write_text("code,class\nWHT,wheat\nMZ,maize\n")
    gpd.read_file(region / "parcels.gpkg").to_crs("EPSG:4326").to_file(tmp_path / "parcels.gpkg", driver="GPKG")
    out = tmp_path / "r.h5"
    assert data_prep(convert_args(tmp_path, out)) == 0
    with h5py.File(out, "r") as f:
        assert (f["patches/r000000_c000000/semantic"][()] == 1).sum() == 150  # edges land back on pixel edges


def test_out_of_range_values_name_the_patch_and_skip_bad_skips_it(tmp_path, capsys):
    make_stack(tmp_path / "scenes")
    make_parcels(tmp_path / "parcels.gpkg")
    (tmp_path / "codes.csv").write_text("code,class\nWHT,wheat\nMZ,maize\n")
    with rasterio.open(tmp_path / "scenes" / "S2_20190415.tif", "r+") as dst:
        data = dst.read()
        data[0, 40, 40] = 40000  # uint16 above the int16 range, inside patch r000032_c000032 only
        dst.write(data)
    out = tmp_path / "r.h5"
    assert data_prep(convert_args(tmp_path, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "patch r000032_c000032" in err and "S2_20190415.tif" in err
    assert not out.exists() and not out.with_name("r.h5.partial").exists()
    assert data_prep([*convert_args(tmp_path, out), "--skip-bad"]) == 0
    with h5py.File(out, "r") as f:
        assert sorted(f["patches"]) == ["r000000_c000000", "r000000_c000032", "r000032_c000000"]
    assert "r000032_c000032" in out.with_name("r.h5.skipped.json").read_text()


def test_dates_from_regex_or_csv_and_a_cloud_band(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    rows = np.mgrid[0:32, 0:32][0]
    for t, d in enumerate(DATES[:3]):
        data = np.stack([np.full((32, 32), 100 * t + b, np.uint16) for b in range(3)]
                        + [((rows < 4) & (t < 2)).astype(np.uint16)])  # band 4: clouds on rows 0-3, dates 0-1
        write_scene(folder / f"scene-{d:%Y-%m-%d}.tif", data)
    out = tmp_path / "a.h5"
    base = ["geotiff", "--images", str(folder), "--bands", *BANDS, "--cloud-band", "4", "--patch-size", "32"]
    assert data_prep([*base, "--date-regex", r"scene-(\d{4}-\d\d-\d\d)", "--out", str(out)]) == 0
    (tmp_path / "dates.csv").write_text("path,date\n" + "".join(
        f"{folder}/scene-{d:%Y-%m-%d}.tif,{d:%Y%m%d}\n" for d in DATES[:3]))
    out2 = tmp_path / "b.h5"
    assert data_prep([*base, "--dates-csv", str(tmp_path / "dates.csv"), "--out", str(out2)]) == 0
    for path in (out, out2):
        with h5py.File(path, "r") as f:
            g = f["patches/r000000_c000000"]
            assert [d.decode() for d in g["S2/date"][()]] == [d.isoformat() for d in DATES[:3]]
            assert g["S2/data"].shape == (3, 3, 32, 32) and g["S2/data"][2, 1, 0, 0] == 201  # mask band dropped
            valid = g["valid_dates"][()]
            assert (valid[:4] == 1).all() and (valid[4:] == 3).all()


def test_without_the_geo_extra_the_command_names_it(region, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rasterio", None)
    assert data_prep(convert_args(region, tmp_path / "x.h5")) == 2
    assert "pip install 'sitskit[geo]'" in capsys.readouterr().err
