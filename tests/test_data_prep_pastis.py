"""PASTIS folder -> HDF5: every field read back equals the source; validation of bad inputs."""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from h5compare import h5_differences

from sitskit.data_prep import convert_pastis
from sitskit.data_prep.cli import main as cli_main


def simulate_pastis(out, **kw):
    from sitskit.simulate import simulate_pastis as sim
    return sim(out, **kw)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pastis") / "PASTIS"
    simulate_pastis(root, n_patches=6, size=32, seed=3, with_s1=True)
    return root


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("h5") / "pastis.h5"
    convert_pastis(source, out, sats=("S2", "S1A", "S1D"))
    return out


def _metadata(root: Path) -> dict[int, dict]:
    feats = json.loads((root / "metadata.geojson").read_text())["features"]
    return {int(f["properties"]["ID_PATCH"]): f for f in feats}


def _dates(props: dict, sat: str) -> list[dt.date]:
    raw = props[f"dates-{sat}"]
    raw = json.loads(raw) if isinstance(raw, str) else raw
    return [dt.datetime.strptime(str(raw[str(i)]), "%Y%m%d").date() for i in range(len(raw))]


def test_every_patch_and_field_equals_the_source(source, converted):
    meta = _metadata(source)
    with h5py.File(converted, "r") as f:
        assert sorted(f["patches"]) == sorted(str(i) for i in meta)
        assert f.attrs["format"] == "sitskit-sits" and f.attrs["dataset"] == "pastis"
        for pid, feat in meta.items():
            g, props = f[f"patches/{pid}"], feat["properties"]
            for sat in ("S2", "S1A", "S1D"):
                src = np.load(source / f"DATA_{sat}" / f"{sat}_{pid}.npy")
                got = g[sat]["data"][()]
                np.testing.assert_array_equal(got, src)
                assert got.dtype == (np.int16 if sat == "S2" else src.dtype)
                # one date, all bands, 64 rows
                assert g[sat]["data"].chunks == (1, src.shape[1], min(src.shape[2], 64), src.shape[3])
                dates = _dates(props, sat)
                assert [d.decode() for d in g[sat]["date"][()]] == [d.isoformat() for d in dates]
                assert g[sat]["day"][()].tolist() == [(d - dt.date(2018, 9, 1)).days for d in dates]
                assert g[sat]["doy"][()].tolist() == [d.timetuple().tm_yday for d in dates]
            target = np.load(source / "ANNOTATIONS" / f"TARGET_{pid}.npy")
            np.testing.assert_array_equal(g["target"][()], target)
            np.testing.assert_array_equal(g["semantic"][()], target[0])
            np.testing.assert_array_equal(g["parcel_ids"][()], np.load(source / "ANNOTATIONS" / f"ParcelIDs_{pid}.npy"))
            for name, stem in (("heatmap", "HEATMAP"), ("instances", "INSTANCES"), ("zones", "ZONES")):
                src = np.load(source / "INSTANCE_ANNOTATIONS" / f"{stem}_{pid}.npy")
                np.testing.assert_array_equal(g[name][()], src)
                assert g[name].dtype == src.dtype
            assert g.attrs["fold"] == props["Fold"] and g.attrs["tile"] == props["TILE"]
            assert json.loads(g.attrs["footprint"]) == feat["geometry"]
            np.testing.assert_array_equal(g.attrs["class_pixels"], np.bincount(target[0].ravel(), minlength=20))
        for sat in ("S2", "S1A", "S1D"):
            norm = json.loads((source / f"NORM_{sat}_patch.json").read_text())
            np.testing.assert_array_equal(f[f"norm/{sat}/mean"][()], [norm[f"Fold_{k}"]["mean"] for k in range(1, 6)])
            np.testing.assert_array_equal(f[f"norm/{sat}/std"][()], [norm[f"Fold_{k}"]["std"] for k in range(1, 6)])
        assert [k.decode() for k in f["index/key"][()]] == [str(i) for i in sorted(meta)]


def test_workers_and_gzip_give_the_same_content(source, converted, tmp_path):
    par = convert_pastis(source, tmp_path / "par.h5", sats=("S2", "S1A", "S1D"), workers=2, compression="gzip")
    assert h5_differences(converted, par, ignore_attrs=("created_utc", "conversion_settings")) == []
    with h5py.File(par) as f:
        assert f["patches/10000/S2/data"].compression == "gzip"


def test_info_summarises_the_file(converted, capsys):
    assert cli_main(["info", str(converted)]) == 0
    text = capsys.readouterr().out
    assert "patches: 6" in text and "per fold:" in text and "Meadow" in text and "S1A: 3 bands" in text


# ------------------------------------------------------------------------------------------ validation
def _corrupt_truncate(root, pid):
    p = root / "DATA_S2" / f"S2_{pid}.npy"
    p.write_bytes(p.read_bytes()[:-100])
    return f"S2_{pid}.npy", "cannot read"


def _save(root, rel, fn):
    p = root / rel
    np.save(p, fn(np.load(p)))


def _set_dates(root, pid, sat, fn):
    path = root / "metadata.geojson"
    meta = json.loads(path.read_text())
    for feat in meta["features"]:
        if feat["properties"]["ID_PATCH"] == pid:
            raw = feat["properties"][f"dates-{sat}"]
            raw = json.loads(raw) if isinstance(raw, str) else raw
            feat["properties"][f"dates-{sat}"] = fn(raw)
    path.write_text(json.dumps(meta))


def _swap_first_dates(d):
    d = dict(d)
    d["0"], d["1"] = d["1"], d["0"]
    return d


def _dup_first_date(d):
    d = dict(d)
    d["1"] = d["0"]
    return d


def _drop_last_date(d):
    return {k: v for k, v in d.items() if int(k) < len(d) - 1}


CASES = {
    "missing_file": (lambda r, p: (r / "DATA_S2" / f"S2_{p}.npy").unlink(), "metadata entry without file"),
    "orphan_file": (lambda r, p: shutil.copy(r / "DATA_S2" / f"S2_{p}.npy", r / "DATA_S2" / "S2_99999.npy"),
                    "S2_99999.npy: file without a metadata.geojson entry"),
    "truncated": (_corrupt_truncate, None),
    "wrong_dtype": (lambda r, p: _save(r, f"DATA_S2/S2_{p}.npy", lambda a: a.astype(np.float64)), "dtype float64"),
    "wrong_bands": (lambda r, p: _save(r, f"DATA_S2/S2_{p}.npy", lambda a: a[:, :9]), "9 bands, expected 10"),
    "nan_s1": (lambda r, p: _save(r, f"DATA_S1A/S1A_{p}.npy", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.nan, a).astype(a.dtype)),
               "NaN or inf"),
    "t_mismatch": (lambda r, p: _set_dates(r, p, "S2", _drop_last_date), "but metadata lists"),
    "unsorted_dates": (lambda r, p: _set_dates(r, p, "S2", _swap_first_dates), "unsorted dates"),
    "duplicated_dates": (lambda r, p: _set_dates(r, p, "S2", _dup_first_date), "duplicated dates"),
    "label_range": (lambda r, p: _save(r, f"ANNOTATIONS/TARGET_{p}.npy", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, 25, a).astype(a.dtype)),
                    "class ids [25] outside 0..19"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_with_one_clear_line(case, source, tmp_path, capsys):
    root = tmp_path / "src"
    shutil.copytree(source, root)
    pid = 20000
    breaker, expected = CASES[case]
    ret = breaker(root, pid)
    if expected is None:  # breaker returned (file name, message)
        fname, expected = ret
        expected_parts = [fname, expected]
    else:
        expected_parts = [expected]
    out = tmp_path / "out.h5"
    rc = cli_main(["pastis", "--root", str(root), "--out", str(out), "--sats", "S2", "S1A", "S1D"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err
    for part in expected_parts:
        assert part in err, err
    if case != "orphan_file":
        assert f"patch {pid}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing half-written


def test_skip_bad_converts_the_rest_and_reports(source, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(source, root)
    _save(root, "DATA_S2/S2_20000.npy", lambda a: a[:, :9])
    (root / "DATA_S2" / "S2_10001.npy").unlink()
    out = tmp_path / "out.h5"
    assert cli_main(["pastis", "--root", str(root), "--out", str(out), "--skip-bad"]) == 0
    report = json.loads((tmp_path / "out.h5.skipped.json").read_text())
    assert {r["what"] for r in report} == {"patch 20000", "patch 10001"}
    with h5py.File(out) as f:
        assert sorted(f["patches"]) == sorted(str(i) for i in _metadata(root) if i not in (20000, 10001))


def test_existing_output_needs_force(converted, source, tmp_path, capsys):
    out = tmp_path / "x.h5"
    out.write_bytes(b"keep me")
    assert cli_main(["pastis", "--root", str(source), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert cli_main(["pastis", "--root", str(source), "--out", str(out), "--force"]) == 0
    assert h5py.is_hdf5(out)


def test_compression_level_is_checked_and_applied(source, tmp_path, capsys):
    out = tmp_path / "z.h5"
    assert cli_main(["pastis", "--root", str(source), "--out", str(out), "--compression", "zstd:30"]) == 2
    assert "level must be an integer in 1..9" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert cli_main(["pastis", "--root", str(source), "--out", str(out), "--compression", "gzip:9"]) == 0
    with h5py.File(out) as f:
        d = f["patches/10000/S2/data"]
        assert (d.compression, d.compression_opts, d.shuffle) == ("gzip", 9, True)
    zout = tmp_path / "zstd.h5"
    assert cli_main(["pastis", "--root", str(source), "--out", str(zout), "--compression", "zstd:7"]) == 0
    with h5py.File(zout) as f:
        filters = f["patches/10000/S2/data"]._filters
        expected = hdf5plugin.Blosc(cname="zstd", clevel=7, shuffle=hdf5plugin.Blosc.SHUFFLE)
        # the last three Blosc options are clevel, shuffle, codec (the first four are set by the filter)
        assert tuple(filters[str(hdf5plugin.BLOSC_ID)][4:]) == tuple(expected["compression_opts"][4:])


def test_large_patches_are_chunked_in_64_row_bands_and_read_back_exactly(tmp_path, capsys):
    """96 x 96 patches: 2 bands of rows per date (the second covers 32 rows), written through the
    pre-compressed path in workers and in-process alike; whole series, crops across the band edge and a date
    subset read back the source values; a date with two corrupt chunks is reported once."""
    from sitskit.data import build_dataset
    from sitskit.data_prep.verify import verify_file
    root = simulate_pastis(tmp_path / "PASTIS", n_patches=2, size=96, seed=4)
    h5 = convert_pastis(root, tmp_path / "p.h5")
    assert h5_differences(h5, convert_pastis(root, tmp_path / "w.h5", workers=2),
                          ignore_attrs=("created_utc", "conversion_settings")) == []
    key = min(_metadata(root))
    src = np.load(root / "DATA_S2" / f"S2_{key}.npy")
    with h5py.File(h5) as f:
        d = f[f"patches/{key}/S2/data"]
        assert d.chunks == (1, 10, 64, 96) and d.id.get_num_chunks() == 2 * src.shape[0]
        np.testing.assert_array_equal(d[()], src)
    full = build_dataset(h5, norm=None)
    np.testing.assert_array_equal(full[0]["image"].numpy(), src.astype(np.float32))
    crops = build_dataset(h5, norm=None, crop=48, crop_mode="grid")  # rows 48-95 straddle the band edge
    first = [crops[i]["image"].numpy() for i in range(4)]
    for (r, c), got in zip([(0, 0), (0, 48), (48, 0), (48, 48)], first):
        np.testing.assert_array_equal(got, src[:, :, r:r + 48, c:c + 48].astype(np.float32))
    for subset in ({"max_doy": 150}, {"num_dates": 5}):  # a contiguous run of dates; a random draw
        sample = build_dataset(h5, norm=None, crop=40, crop_mode="grid", **subset)[4]  # corner (40, 40)
        with h5py.File(h5) as f:
            keep = np.isin(f[f"patches/{key}/S2/day"][()], sample["dates"].numpy())
        assert 0 < keep.sum() < len(src)
        np.testing.assert_array_equal(sample["image"].numpy(), src[keep, :, 40:80, 40:80].astype(np.float32))

    with h5py.File(h5) as f:  # date 3: both its bands
        infos = [f[f"patches/{key}/S2/data"].id.get_chunk_info(2 * 3 + i) for i in (0, 1)]
    with open(h5, "r+b") as fh:
        for info in infos:
            fh.seek(info.byte_offset + info.size // 2)
            byte = fh.read(1)[0]
            fh.seek(-1, 1)
            fh.write(bytes([byte ^ 0x5A]))
    assert [info.chunk_offset for info in infos] == [(3, 0, 0, 0), (3, 0, 64, 0)]
    assert not verify_file(h5).ok
    assert cli_main(["verify", str(h5)]) == 1
    assert f"patch {key}: S2/data date 3: checksum mismatch\n" in capsys.readouterr().out  # once
