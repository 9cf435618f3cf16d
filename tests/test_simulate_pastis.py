"""PASTIS simulator: exact layout, dtypes, shapes, ranges, instance rules, determinism, bad input."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sitskit.constants import PASTIS_TILES, PASTIS_VOID
from sitskit.data_prep.cli import main as data_prep_main
from sitskit.errors import UserFacingError
from sitskit.simulate import simulate_pastis, simulate_pastis_patch
from sitskit.simulate.instances import centerness, instance_centres, instance_codes

SIZE = 32
N = 6


@pytest.fixture(scope="module")
def pastis_root(tmp_path_factory) -> Path:
    return simulate_pastis(tmp_path_factory.mktemp("sim") / "PASTIS", n_patches=N, size=SIZE, seed=3,
                           with_s1=True)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _meta(root: Path) -> dict:
    return json.loads((root / "metadata.geojson").read_text())


def test_layout_and_file_names(pastis_root):
    ids = [f["properties"]["ID_PATCH"] for f in _meta(pastis_root)["features"]]
    assert ids == [10000, 10001, 20000, 20001, 30000, 40000]
    expected = {"metadata.geojson", "NORM_S2_patch.json", "NORM_S1A_patch.json", "NORM_S1D_patch.json"}
    for i in ids:
        expected |= {f"DATA_S2/S2_{i}.npy", f"DATA_S1A/S1A_{i}.npy", f"DATA_S1D/S1D_{i}.npy",
                     f"ANNOTATIONS/TARGET_{i}.npy", f"ANNOTATIONS/ParcelIDs_{i}.npy",
                     f"INSTANCE_ANNOTATIONS/HEATMAP_{i}.npy", f"INSTANCE_ANNOTATIONS/INSTANCES_{i}.npy",
                     f"INSTANCE_ANNOTATIONS/ZONES_{i}.npy"}
    assert set(_digest(pastis_root)) == expected


def test_metadata_geojson(pastis_root):
    meta = _meta(pastis_root)
    assert meta["type"] == "FeatureCollection"
    assert "2154" in meta["crs"]["properties"]["name"]
    folds = []
    for feat in meta["features"]:
        props = feat["properties"]
        pid = props["ID_PATCH"]
        assert props["TILE"] == PASTIS_TILES[pid // 10000 - 1]
        assert 1 <= props["Fold"] <= 5
        folds.append(props["Fold"])
        dates = props["dates-S2"]
        assert list(dates) == [str(i) for i in range(len(dates))]
        days = [dt.datetime.strptime(str(v), "%Y%m%d").date() for v in dates.values()]
        assert days == sorted(set(days)), "dates must be chronological without duplicates"
        assert dt.date(2018, 9, 1) <= days[0] and days[-1] <= dt.date(2019, 11, 30)
        s2 = np.load(pastis_root / "DATA_S2" / f"S2_{pid}.npy", mmap_mode="r")
        assert s2.shape[0] == len(dates)
        for sat in ("S1A", "S1D"):
            s1 = np.load(pastis_root / f"DATA_{sat}" / f"{sat}_{pid}.npy", mmap_mode="r")
            assert s1.shape[0] == len(props[f"dates-{sat}"])
            assert 60 <= s1.shape[0] <= 80
        ring = np.array(feat["geometry"]["coordinates"][0])
        assert feat["geometry"]["type"] == "Polygon" and ring.shape == (5, 2)
        assert np.allclose(ring[0], ring[-1])
        assert np.allclose(np.ptp(ring, axis=0), 10 * SIZE)  # footprint in Lambert-93 metres
        inst = np.load(pastis_root / "INSTANCE_ANNOTATIONS" / f"INSTANCES_{pid}.npy")
        assert props["N_Parcel"] == inst.max()
        assert 0 < props["Parcel_Cover"] <= 1
    assert sorted(set(folds)) == [1, 2, 3, 4, 5]


def test_arrays_dtypes_shapes_ranges(pastis_root):
    for f in sorted((pastis_root / "DATA_S2").glob("*.npy")):
        pid = f.stem.split("_")[1]
        s2 = np.load(f)
        assert s2.dtype == np.int16 and s2.ndim == 4 and s2.shape[1:] == (10, SIZE, SIZE)
        assert s2.min() >= 0 and 3000 < s2.max() < 12000
        assert 500 < np.median(s2) < 4000
        for sat in ("S1A", "S1D"):
            s1 = np.load(pastis_root / f"DATA_{sat}" / f"{sat}_{pid}.npy")
            assert s1.dtype == np.float32 and s1.shape[1:] == (3, SIZE, SIZE)
            assert -25 < np.median(s1[:, 0]) < -3 and -32 < np.median(s1[:, 1]) < -8
            assert np.allclose(s1[:, 2], s1[:, 0] - s1[:, 1], atol=1e-4)
        target = np.load(pastis_root / "ANNOTATIONS" / f"TARGET_{pid}.npy")
        assert target.dtype == np.uint8 and target.shape == (3, SIZE, SIZE)
        assert target[0].max() <= 19 and target[1].max() <= 18 and target[2].max() <= 5
        ids = np.load(pastis_root / "ANNOTATIONS" / f"ParcelIDs_{pid}.npy")
        assert ids.shape == (SIZE, SIZE) and ids.dtype == np.int32
        assert np.all((ids == 0) == (target[0] == 0)), "parcel pixels are exactly the non-background ones"
        heat = np.load(pastis_root / "INSTANCE_ANNOTATIONS" / f"HEATMAP_{pid}.npy")
        assert heat.dtype == np.float32 and heat.shape == (SIZE, SIZE) and 0 <= heat.min() and heat.max() <= 1
        for name in ("INSTANCES", "ZONES"):
            arr = np.load(pastis_root / "INSTANCE_ANNOTATIONS" / f"{name}_{pid}.npy")
            assert arr.dtype == np.int64 and arr.shape == (SIZE, SIZE)


def test_norm_files_follow_reference_rule(pastis_root):
    meta = _meta(pastis_root)
    for sat, c in (("S2", 10), ("S1A", 3), ("S1D", 3)):
        norm = json.loads((pastis_root / f"NORM_{sat}_patch.json").read_text())
        assert sorted(norm) == [f"Fold_{k}" for k in range(1, 6)]
        fold1 = [f["properties"]["ID_PATCH"] for f in meta["features"] if f["properties"]["Fold"] == 1]
        arrays = [np.load(pastis_root / f"DATA_{sat}" / f"{sat}_{pid}.npy").astype(np.float64) for pid in fold1]
        mean = np.mean([a.mean(axis=(0, 2, 3)) for a in arrays], axis=0)
        std = np.mean([a.std(axis=(0, 2, 3)) for a in arrays], axis=0)
        assert len(norm["Fold_1"]["mean"]) == c
        np.testing.assert_allclose(norm["Fold_1"]["mean"], mean, rtol=1e-6)
        np.testing.assert_allclose(norm["Fold_1"]["std"], std, rtol=1e-6)


def test_instance_rules_on_written_files(pastis_root):
    for f in sorted((pastis_root / "ANNOTATIONS").glob("TARGET_*.npy")):
        pid = f.stem.split("_")[1]
        sem = np.load(f)[0]
        pids = np.load(pastis_root / "ANNOTATIONS" / f"ParcelIDs_{pid}.npy")
        inst = np.load(pastis_root / "INSTANCE_ANNOTATIONS" / f"INSTANCES_{pid}.npy")
        heat = np.load(pastis_root / "INSTANCE_ANNOTATIONS" / f"HEATMAP_{pid}.npy")
        zones = np.load(pastis_root / "INSTANCE_ANNOTATIONS" / f"ZONES_{pid}.npy")
        # consecutive codes 1..N after removing background, ordered like the sorted parcel ids
        codes = np.unique(inst)
        assert codes[0] == 0 and np.array_equal(codes, np.arange(len(codes)))
        assert np.all((inst == 0) == (sem == 0))
        raw = np.unique(pids[sem != 0])
        for code, raw_id in zip(codes[1:], raw):
            assert np.all(inst[pids == raw_id] == code)
        # void parcels keep an instance code
        if (sem == PASTIS_VOID).any():
            assert (inst[sem == PASTIS_VOID] > 0).all()
        # heatmap exactly 1 at every centre, zones cover every pixel with a valid code
        centres = instance_centres(inst)
        assert len(centres) == len(codes) - 1
        for code, (i, j) in centres.items():
            assert heat[i, j] == pytest.approx(1.0)
        assert set(np.unique(zones)) <= set(codes[1:].tolist()) and zones.min() >= 1


def test_centerness_matches_direct_formula():
    inst = np.zeros((12, 14), np.int64)
    inst[2:5, 1:9] = 1      # 3 x 8 box
    inst[7:12, 10:14] = 2   # touches the bottom/right edges: box cannot grow there
    heat, zones = centerness(inst)
    # instance 1: expanded rows 1..5 (h=4), cols 0..9 (w=9) -> centre (3, 4)
    # instance 2: rows 6..11 (h=5), cols 9..13 (w=4) -> centre (8, 11)
    k = (1 - 0.7) / (1 + 0.7) / 3
    ii, jj = np.mgrid[0:12, 0:14]
    g1 = np.exp(-(ii - 3) ** 2 / (2 * (k * 4) ** 2) - (jj - 4) ** 2 / (2 * (k * 9) ** 2))
    g2 = np.exp(-(ii - 8) ** 2 / (2 * (k * 5) ** 2) - (jj - 11) ** 2 / (2 * (k * 4) ** 2))
    np.testing.assert_allclose(heat, np.maximum(g1, g2), atol=1e-6)
    both = (g1 > 1e-12) | (g2 > 1e-12)
    assert np.array_equal(zones[both], np.where(g1 >= g2, 1, 2)[both])
    assert instance_centres(inst) == {1: (3, 4), 2: (8, 11)}


def test_instance_codes_without_background():
    pids = np.array([[7, 7], [9, 3]])
    sem = np.array([[2, 2], [5, 1]])
    assert instance_codes(pids, sem).tolist() == [[2, 2], [3, 1]]


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path, pastis_root):
    again = simulate_pastis(tmp_path / "again", n_patches=N, size=SIZE, seed=3, with_s1=True)
    assert _digest(again) == _digest(pastis_root)
    other = simulate_pastis(tmp_path / "other", n_patches=2, size=SIZE, seed=4)
    a = np.load(pastis_root / "DATA_S2" / "S2_10000.npy")
    b = np.load(other / "DATA_S2" / "S2_10000.npy")
    assert a.shape != b.shape or not np.array_equal(a, b)
    assert not np.array_equal(np.load(pastis_root / "ANNOTATIONS" / "TARGET_10000.npy"),
                              np.load(other / "ANNOTATIONS" / "TARGET_10000.npy"))


def test_workers_write_the_same_files(tmp_path, pastis_root):
    parallel = simulate_pastis(tmp_path / "parallel", n_patches=N, size=SIZE, seed=3, with_s1=True, workers=2)
    assert _digest(parallel) == _digest(pastis_root)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_leaves_nothing(tmp_path, workers):
    """`kill` (SIGTERM) midway: exit 143, one line, no output folder and no hidden partial folder."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sitskit.data_prep.cli", "simulate", "--format", "pastis",
                             "--out", str(out), "--patches", "400", "--size", "32", "--workers", workers],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*/DATA_S2/*.npy")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated"
    assert list(tmp_path.iterdir()) == []


def test_20m_bands_are_smoother_than_10m_bands():
    """PASTIS 20 m bands were bilinearly upsampled to 10 m: B8A varies less between neighbours than B8."""
    s2 = simulate_pastis_patch(30001, size=64, seed=0).s2.astype(np.float64)
    b8, b8a = s2[:, 6], s2[:, 7]
    assert np.abs(np.diff(b8a, axis=2)).mean() < 0.75 * np.abs(np.diff(b8, axis=2)).mean()


def test_s1_does_not_change_s2():
    with_s1 = simulate_pastis_patch(20001, size=SIZE, seed=3, with_s1=True)
    without = simulate_pastis_patch(20001, size=SIZE, seed=3, with_s1=False)
    assert np.array_equal(with_s1.s2, without.s2) and not without.s1


def test_explicit_ids_and_cli(tmp_path):
    out = tmp_path / "cli"
    rc = data_prep_main(["simulate", "--format", "pastis", "--out", str(out), "--size", "24",
                         "--ids", "40562,10003", "--seed", "1"])
    assert rc == 0
    assert sorted(p.name for p in (out / "DATA_S2").iterdir()) == ["S2_10003.npy", "S2_40562.npy"]
    assert np.load(out / "DATA_S2" / "S2_40562.npy").shape[2:] == (24, 24)


@pytest.mark.parametrize("argv, needle", [
    (["--format", "pastis", "--ids", "123"], "10000..49999"),
    (["--format", "pastis", "--ids", "10000,10000"], "duplicate"),
    (["--format", "mtlcc", "--with-s1"], "Sentinel-1"),
    (["--format", "mtlcc", "--size", "50"], "multiple of 6"),
    (["--format", "pastis", "--size", "33"], "even"),
    (["--format", "pastis", "--year", "19"], "four-digit"),
    (["--format", "mtlcc", "--year", "2016", "2016"], "distinct"),
    (["--format", "pastis", "--patches", "0"], "--patches"),
    (["--format", "pastis", "--workers", "-1"], "--workers"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, argv, needle):
    out = tmp_path / "bad"
    rc = data_prep_main(["simulate", "--out", str(out), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert not out.exists() and not list(tmp_path.iterdir()), "nothing may be left behind"


def test_existing_non_empty_out_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserFacingError, match="not empty"):
        simulate_pastis(tmp_path, n_patches=1, size=16)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        data_prep_main(["simulate", "--format", "sentinel3", "--out", str(tmp_path / "x")])


def test_show_writes_a_png(pastis_root, tmp_path, capsys):
    out = tmp_path / "fig" / "patch.png"
    assert data_prep_main(["show", str(pastis_root), "--patch", "20000", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert data_prep_main(["show", str(pastis_root), "--patch", "12345", "--out", str(tmp_path / "x.png")]) == 2
    assert "--patch 12345" in capsys.readouterr().err
    assert data_prep_main(["show", str(pastis_root), "--patch", "first", "--out", str(tmp_path / "f.png")]) == 0


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import sitskit.simulate.pastis as pastis_mod

    real, calls = pastis_mod.simulate_pastis_patch, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pastis_mod, "simulate_pastis_patch", flaky)
    with pytest.raises(KeyboardInterrupt):
        simulate_pastis(tmp_path / "out", n_patches=3, size=16)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_upsampling_matches_scipy_bilinear():
    from scipy import ndimage

    from sitskit.simulate.scene import upsample_bilinear

    x = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    expected = np.stack([ndimage.zoom(a, 2, order=1, grid_mode=True, mode="nearest") for a in x])
    np.testing.assert_allclose(upsample_bilinear(x), expected, atol=1e-6)
