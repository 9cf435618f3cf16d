"""MTLCC simulator: layout, Example schema, CRC-valid gzip TFRecords, labels, padding, years, determinism."""
from __future__ import annotations

import configparser
import hashlib
from pathlib import Path

import numpy as np
import pytest

from sitskit.constants import MTLCC_CLASSES, MTLCC_ORIGINAL_IDS, MTLCC_SRID
from sitskit.data_prep.cli import main as data_prep_main
from sitskit.formats.mtlcc_record import decode_mtlcc_example
from sitskit.formats.tfrecord import decode_example, iter_records
from sitskit.simulate import simulate_mtlcc, simulate_mtlcc_tile
from sitskit.simulate.mtlcc import NOBS

N_TILES = 5


@pytest.fixture(scope="module")
def mtlcc_root(tmp_path_factory) -> Path:
    return simulate_mtlcc(tmp_path_factory.mktemp("sim") / "MTLCC", n_tiles=N_TILES, size=24, seed=5)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> dict[str, np.ndarray]:
    records = list(iter_records(path))  # verifies length and data CRCs
    assert len(records) == 1, "one Example per tile"
    return decode_mtlcc_example(decode_example(records[0]), where=str(path))


def test_layout(mtlcc_root):
    files = set(_digest(mtlcc_root))
    expected = {"240/classes.txt", "240/dataset.ini", "240/geotransforms.csv", "240/tileids/train_fold0.tileids",
                "240/tileids/test_fold0.tileids", "240/tileids/eval.tileids"}
    expected |= {f"240/data{y}/{t}.tfrecord.gz" for y in (16, 17) for t in range(N_TILES)}
    assert files == expected


def test_side_files(mtlcc_root):
    root = mtlcc_root / "240"
    rows = [line.split("|") for line in (root / "classes.txt").read_text().splitlines()]
    assert len(rows) == 18 and [int(i) for i, _ in rows] == MTLCC_ORIGINAL_IDS
    assert all(name == MTLCC_CLASSES[int(i)] for i, name in rows)
    ini = configparser.ConfigParser()
    ini.read(root / "dataset.ini")
    assert ini.sections() == ["2016", "2017"]
    for year in ("2016", "2017"):
        sec = ini[year]
        assert sec["datadir"] == f"data{year[2:]}" and int(sec["pix10"]) == 24 and int(sec["nobs"]) == NOBS
        assert (int(sec["nbands10"]), int(sec["nbands20"]), int(sec["nbands60"])) == (4, 6, 3)
        assert (root / sec["tiletable"]).exists()
    splits = {name: [int(v) for v in (root / "tileids" / f"{name}.tileids").read_text().split()]
              for name in ("train_fold0", "test_fold0", "eval")}
    all_ids = sorted(i for ids in splits.values() for i in ids)
    assert all_ids == list(range(N_TILES)) and all(splits.values())
    geo = [line.split(",") for line in (root / "geotransforms.csv").read_text().splitlines()]
    assert sorted(int(r[0]) for r in geo) == all_ids
    for r in geo:
        assert len(r) == 8 and float(r[2]) == 10 and float(r[3]) == 0 and float(r[5]) == 0
        assert float(r[6]) == -10 and int(r[7]) == MTLCC_SRID


def test_records_schema_shapes_and_values(mtlcc_root):
    for year in (16, 17):
        for path in sorted((mtlcc_root / "240" / f"data{year}").glob("*.tfrecord.gz")):
            ex = _read(path)
            assert ex["x10"].shape == (NOBS, 24, 24, 4)
            assert ex["x20"].shape == (NOBS, 12, 12, 6)
            assert ex["x60"].shape == (NOBS, 4, 4, 3)
            assert ex["labels"].shape == (NOBS, 24, 24)
            assert ex["doy"].shape == ex["year"].shape == (NOBS,)
            assert (ex["year"] == 2000 + year).all()
            valid = ex["doy"] > 0
            n = int(valid.sum())
            assert 0.75 * NOBS - 1 <= n <= NOBS
            assert valid[:n].all() and not valid[n:].any(), "padding is at the end"
            assert np.all(np.diff(ex["doy"][:n]) > 0) and ex["doy"][:n].max() <= 366
            for key in ("x10", "x20", "x60"):
                assert (ex[key][n:] == 0).all()
                real = ex[key][:n]
                assert real.min() >= 0 and real.max() < 15000
            # L1C TOA: blue (B2, x10 ch 2) has a path term, B10 (x60 ch 2) is nearly dark
            assert np.median(ex["x10"][:n, ..., 2]) > 500
            assert np.median(ex["x60"][:n, ..., 2]) < 150
            assert np.median(ex["x60"][:n, ..., 1]) < np.median(ex["x20"][:n, ..., 3])  # B9 < B8A
            labels = ex["labels"]
            assert (labels == labels[0]).all(), "label map repeated over T"
            assert set(np.unique(labels)) <= set(MTLCC_ORIGINAL_IDS)


def test_block_aggregation_of_coarse_bands():
    tile = simulate_mtlcc_tile(3, 2016, size=24, seed=1)
    n = tile.n_obs
    # 20 m and 60 m bands are smoother than the 10 m ones (block means of the 10 m rendering + noise)
    grad10 = np.abs(np.diff(tile.x10[:n, ..., 3].astype(float), axis=2)).mean()
    grad20 = np.abs(np.diff(tile.x20[:n, ..., 3].astype(float), axis=2)).mean()
    assert grad20 < 2 * grad10


def test_years_share_fields_but_differ(mtlcc_root):
    a = _read(mtlcc_root / "240" / "data16" / "2.tfrecord.gz")
    b = _read(mtlcc_root / "240" / "data17" / "2.tfrecord.gz")
    t16 = simulate_mtlcc_tile(2, 2016, size=24, seed=5)
    t17 = simulate_mtlcc_tile(2, 2017, size=24, seed=5)
    assert np.array_equal(t16.region, t17.region), "same fields in both years"
    assert np.array_equal(a["labels"][0], t16.labels) and np.array_equal(b["labels"][0], t17.labels)
    assert not np.array_equal(a["doy"], b["doy"])


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path, mtlcc_root):
    again = simulate_mtlcc(tmp_path / "again", n_tiles=N_TILES, size=24, seed=5)
    assert _digest(again) == _digest(mtlcc_root)
    other = simulate_mtlcc(tmp_path / "other", n_tiles=1, size=24, seed=6, years=(2016,))
    assert not np.array_equal(_read(other / "240" / "data16" / "0.tfrecord.gz")["x10"],
                              _read(mtlcc_root / "240" / "data16" / "0.tfrecord.gz")["x10"])


def test_workers_write_the_same_files(tmp_path, mtlcc_root):
    parallel = simulate_mtlcc(tmp_path / "parallel", n_tiles=N_TILES, size=24, seed=5, workers=2)
    assert _digest(parallel) == _digest(mtlcc_root)


def test_cli_ids_and_size_48(tmp_path):
    out = tmp_path / "m"
    assert data_prep_main(["simulate", "--format", "mtlcc", "--out", str(out), "--ids", "17,4",
                           "--year", "2017"]) == 0
    assert sorted(p.name for p in (out / "480" / "data17").iterdir()) == ["17.tfrecord.gz", "4.tfrecord.gz"]
    assert not (out / "480" / "data16").exists()
    assert _read(out / "480" / "data17" / "17.tfrecord.gz")["x60"].shape == (NOBS, 8, 8, 3)


def test_show_writes_a_png(mtlcc_root, tmp_path, capsys):
    out = tmp_path / "tile.png"
    assert data_prep_main(["show", str(mtlcc_root), "--patch", "1", "--year", "2017", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data_prep_main(["show", str(mtlcc_root), "--patch", "1", "--year", "2015",
                           "--out", str(tmp_path / "x.png")]) == 2
    assert "2015" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert data_prep_main(["show", str(mtlcc_root), "--out", str(tmp_path / "first.png")]) == 0  # first tile


def test_explicit_splits(tmp_path):
    out = tmp_path / "s"
    assert data_prep_main(["simulate", "--format", "mtlcc", "--out", str(out), "--size", "24", "--year", "2016",
                           "--ids", "1175,8813", "--test-ids", "1007,920", "--eval-ids", "5"]) == 0
    root = out / "240"
    read = {n: (root / "tileids" / f"{n}.tileids").read_text().split() for n in ("train_fold0", "test_fold0", "eval")}
    assert read == {"train_fold0": ["1175", "8813"], "test_fold0": ["920", "1007"], "eval": ["5"]}
    assert sorted(p.name for p in (root / "data16").iterdir()) == sorted(
        f"{i}.tfrecord.gz" for i in (5, 920, 1007, 1175, 8813))
