"""MTLCC TFRecords -> HDF5: values equal the records (nearest upsampling checked against torch), labels
remapped with the original ids kept, padding dates dropped; corrupt/unknown inputs refused."""
from __future__ import annotations

import datetime as dt
import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sitskit.data_prep import convert_mtlcc
from sitskit.data_prep.cli import main as cli_main
from sitskit.formats.mtlcc_record import decode_mtlcc_example, encode_mtlcc_example
from sitskit.formats.tfrecord import read_tfrecord, write_tfrecord
from sitskit.simulate import simulate_mtlcc


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mtlcc") / "MTLCC"
    simulate_mtlcc(root, n_tiles=6, size=24, seed=5)
    return root


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    return convert_mtlcc(source, tmp_path_factory.mktemp("h5") / "mtlcc.h5", size=240, workers=2)


def _classes(base: Path) -> list[int]:
    return [int(line.split("|")[0]) for line in (base / "classes.txt").read_text().splitlines() if "|" in line]


def _upsample(x: np.ndarray, px: int) -> np.ndarray:
    """[T, h, w, C] -> [T, C, px, px] with torch's nearest interpolation (what MTLCC-pytorch/STCLN use)."""
    t = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)
    return F.interpolate(t, size=(px, px), mode="nearest").numpy()


def test_every_tile_year_equals_the_records(source, converted):
    base = source / "240"
    class_ids = _classes(base)
    splits = {name: {int(t) for t in (base / "tileids" / f"{f}.tileids").read_text().split()}
              for name, f in (("train", "train_fold0"), ("test", "test_fold0"), ("eval", "eval"))}
    n = 0
    with h5py.File(converted, "r") as f:
        assert [c.decode() if isinstance(c, bytes) else c for c in f.attrs["bands_S2"]][:4] == ["B4", "B3", "B2", "B8"]
        for year in (2016, 2017):
            for path in sorted((base / f"data{year % 100}").glob("*.tfrecord.gz")):
                tid = int(path.name.split(".")[0])
                (ex,) = [decode_mtlcc_example(e) for e in read_tfrecord(path)]
                keep = ex["doy"] > 0
                expected = np.concatenate([ex["x10"].transpose(0, 3, 1, 2), _upsample(ex["x20"], 24),
                                           _upsample(ex["x60"], 24)], axis=1)[keep]
                g = f[f"patches/{year}_{tid}"]
                np.testing.assert_array_equal(g["S2/data"][()], expected)
                assert g["S2/data"].dtype == np.int16 and g["S2/data"].shape[1] == 13
                doy = ex["doy"][keep]
                np.testing.assert_array_equal(g["S2/doy"][()], doy)
                assert [d.decode() for d in g["S2/date"][()]] == [
                    (dt.date(year, 1, 1) + dt.timedelta(int(d) - 1)).isoformat() for d in doy]
                np.testing.assert_array_equal(g["semantic_original"][()], ex["labels"][0])
                np.testing.assert_array_equal(g["semantic"][()],
                                              np.searchsorted(class_ids, ex["labels"][0]))  # ids are sorted
                assert g.attrs["year"] == year and g.attrs["id"] == tid
                assert g.attrs["split"] == next(s for s, ids in splits.items() if tid in ids)
                n += 1
        assert n == len(f["patches"]) == 12
        np.testing.assert_array_equal(f.attrs["class_original_ids"], class_ids)
        assert f.attrs["ignore_index"] == 0


def test_info_lists_splits_years_and_original_ids(converted, capsys):
    assert cli_main(["info", str(converted)]) == 0
    text = capsys.readouterr().out
    assert "per year: 2016: 6, 2017: 6" in text and "per split:" in text and "original ids [0, 1, 2, 3, 5" in text


def test_dataset_reads_back_raw_values(source, converted):
    from sitskit.data import build_dataset
    ds = build_dataset(converted, task="semantic", split="eval", years=[2017], norm=None)
    assert ds.ids and all(i.startswith("2017_") for i in ds.ids)
    with h5py.File(converted) as f:
        for i, key in enumerate(ds.ids):
            s = ds[i]
            np.testing.assert_array_equal(s["image"].numpy(), f[f"patches/{key}/S2/data"][()].astype(np.float32))
            np.testing.assert_array_equal(s["semantic"].numpy(), f[f"patches/{key}/semantic"][()])
            np.testing.assert_array_equal(s["dates"].numpy(), s["doy"].numpy() - 1)
    source_norm = build_dataset(converted, split="train")
    np.testing.assert_array_equal(source_norm.norm_mean, 0)
    np.testing.assert_array_equal(source_norm.norm_std, 1e4)


# ------------------------------------------------------------------------------------------ validation
def _first_tile(base: Path) -> Path:
    return min((base / "data16").glob("*.tfrecord.gz"))


def _flip_data_byte(path: Path):
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] ^= 0xFF  # inside the record payload -> data CRC mismatch
    path.write_bytes(gzip.compress(bytes(raw)))
    return "bad data CRC"


def _truncate(path: Path):
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return "truncated"


def _unknown_class(path: Path):
    (ex,) = [decode_mtlcc_example(e) for e in read_tfrecord(path)]
    labels = ex["labels"].copy()
    labels[:, 0, 0] = 4  # 4 is not an MTLCC class id
    write_tfrecord(path, [encode_mtlcc_example(ex["x10"], ex["x20"], ex["x60"], ex["doy"], ex["year"], labels)])
    return "class ids [4] not in classes.txt"


def _unsorted_dates(path: Path):
    (ex,) = [decode_mtlcc_example(e) for e in read_tfrecord(path)]
    doy = ex["doy"].copy()
    doy[[0, 1]] = doy[[1, 0]]
    write_tfrecord(path, [encode_mtlcc_example(ex["x10"], ex["x20"], ex["x60"], doy, ex["year"], ex["labels"])])
    return f"unsorted dates (doy {doy[0]} then {doy[1]})"


def _unlisted(path: Path):
    shutil.copy(path, path.with_name("99999.tfrecord.gz"))
    return "99999.tfrecord.gz: file not listed in any tileids file"


def _missing(path: Path):
    path.unlink()
    return f"data16/{path.name} is missing"


@pytest.mark.parametrize("breaker", [_flip_data_byte, _truncate, _unknown_class, _unsorted_dates, _unlisted, _missing],
                         ids=lambda b: b.__name__.strip("_"))
def test_bad_records_are_refused(breaker, source, tmp_path, capsys):
    root = tmp_path / "src"
    shutil.copytree(source, root)
    path = _first_tile(root / "240")
    expected = breaker(path)
    rc = cli_main(["mtlcc", "--root", str(root), "--out", str(tmp_path / "o.h5"), "--size", "240"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err
    assert expected in err, err
    if breaker is not _unlisted:
        assert f"tile {path.name.split('.')[0]} (2016)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
