"""Checksums on the data (format version 2): Fletcher32 is the last filter of every chunked dataset with each
--compression, a flipped byte in a stored chunk is reported by `data_prep.py verify` and is one clear error
when read through sitskit.data (in a DataLoader worker too); version 1 files (no checksums) still read."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from torch.utils.data import DataLoader

from sitskit.data import build_dataset
from sitskit.data_prep import convert_pastis, h5schema
from sitskit.data_prep.cli import main as data_prep
from sitskit.data_prep.h5schema import DataReadError
from sitskit.data_prep.verify import verify_file
from sitskit.errors import UserFacingError

BLOSC, DEFLATE, SHUFFLE, FLETCHER32 = 32001, h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from sitskit.simulate import simulate_pastis
    return simulate_pastis(tmp_path_factory.mktemp("src") / "PASTIS", n_patches=2, size=32, seed=3)


def filters(d: h5py.Dataset) -> list[int]:
    plist = d.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


def flip_byte(path: Path, dataset: str, chunk: int = 0) -> int:
    """Flip one byte in the middle of the `chunk`-th stored chunk of `dataset`; returns its first index
    (the date of a one-date chunk)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, 1)
        fh.write(bytes([byte ^ 0x5A]))
    return info.chunk_offset[0]


@pytest.mark.parametrize("compression, pipeline", [("zstd", [BLOSC, FLETCHER32]),
                                                   ("gzip", [SHUFFLE, DEFLATE, FLETCHER32]),
                                                   ("none", [FLETCHER32])])
def test_fletcher32_is_the_last_filter_and_catches_a_flipped_byte(compression, pipeline, source, tmp_path,
                                                                   capsys):
    h5 = convert_pastis(source, tmp_path / "p.h5", compression=compression)
    with h5py.File(h5, "r") as f:
        assert f.attrs["format_version"] == 2
        key = sorted(f["patches"])[1]
        for name in ("S2/data", "semantic", "instances"):
            assert filters(f[f"patches/{key}/{name}"]) == pipeline, name
        assert f[f"patches/{key}/S2/data"].chunks[0] == 1  # one date per chunk, as in version 1
        n_dates = f[f"patches/{key}/S2/data"].shape[0]
    np.testing.assert_array_equal(build_dataset(h5, norm=None)[1]["image"].numpy(),
                                  np.load(source / "DATA_S2" / f"S2_{key}.npy").astype(np.float32))
    capsys.readouterr()
    assert data_prep(["verify", str(h5)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"{h5}: OK, 2 patches")

    date = flip_byte(h5, f"patches/{key}/S2/data", chunk=n_dates // 2)
    assert data_prep(["verify", str(h5)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{h5}: patch {key}: S2/data date {date}: checksum mismatch",
                   (f"{h5}: CORRUPT, 1 of 2 patches unreadable; convert the source again (--force) or restore "
                    "the file")]
    ds = build_dataset(h5, norm=None)
    assert ds[0]["id"] != key  # the other patch still reads
    with pytest.raises(DataReadError) as err:
        ds[1]
    assert str(err.value) == (f"{h5}: patch {key}: data is corrupt (checksum mismatch in a stored chunk); "
                              f"run `python data_prep.py verify {h5}`")
    assert isinstance(err.value, UserFacingError)


def test_a_corrupt_label_map_names_the_patch(pastis_h5, tmp_path, capsys):
    h5 = tmp_path / "p.h5"
    shutil.copy(pastis_h5, h5)
    flip_byte(h5, "patches/20000/semantic")
    report = verify_file(h5)
    assert report.bad == {"20000": ["semantic: checksum mismatch"]} and report.n_patches == 5
    pretrain = build_dataset(h5)  # images only: unaffected
    assert [pretrain[i]["id"] for i in range(len(pretrain))] == ["10000", "10001", "20000", "30000", "40000"]
    semantic = build_dataset(h5, task="semantic")
    with pytest.raises(DataReadError, match=r"p\.h5: patch 20000: data is corrupt \(checksum mismatch"):
        semantic[2]


def test_the_error_crosses_a_dataloader_worker_as_one_line(pastis_h5, tmp_path):
    h5 = tmp_path / "p.h5"
    shutil.copy(pastis_h5, h5)
    flip_byte(h5, "patches/10001/S2/data", chunk=5)
    loader = DataLoader(build_dataset(h5), batch_size=None, num_workers=1)
    with pytest.raises(DataReadError) as err:
        list(loader)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{h5}: patch 10001: data is corrupt")
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is DataReadError and str(again) == message


def test_verify_counts_every_chunk_of_a_clean_file(pastis_h5):
    report = verify_file(pastis_h5)
    with h5py.File(pastis_h5, "r") as f:
        n_dates = int(f["index/n_dates_S2"][()].sum())
        n_datasets = []
        f.visititems(lambda n, o: n_datasets.append(n) if isinstance(o, h5py.Dataset) else None)
    assert report.ok and report.bad == {} and report.unchecked == []
    assert report.n_patches == 5 and report.n_datasets == len(n_datasets)
    # every S2 date is at least one chunk (one per 64 rows); every other dataset is at least one chunk
    assert report.n_chunks >= n_dates + len(n_datasets) - 5


def test_verify_names_a_missing_patch_group_and_a_broken_link(pastis_h5, tmp_path, capsys):
    h5 = tmp_path / "p.h5"
    shutil.copy(pastis_h5, h5)
    with h5py.File(h5, "r+") as f:
        del f["patches/30000"]
        f["patches/40000/S2/extra"] = h5py.SoftLink("/nowhere")
    report = verify_file(h5)
    assert report.n_patches == 5 and sorted(report.bad) == ["30000", "40000"]
    assert report.bad["30000"] == ["group: listed in /index but missing"]
    assert report.bad["40000"][0].startswith("S2/extra: unreadable structure (")
    assert data_prep(["verify", str(h5)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"{h5}: CORRUPT, 2 of 5 patches")


def test_format_1_without_checksums_still_reads_and_verify_says_so(source, tmp_path, monkeypatch, capsys):
    v2 = convert_pastis(source, tmp_path / "v2.h5")
    plain = h5schema.compression_options

    def without_checksum(spec):
        opts = plain(spec)
        opts.pop("fletcher32")
        return opts

    with monkeypatch.context() as m:  # what the version 1 writer produced
        m.setattr(h5schema, "compression_options", without_checksum)
        m.setattr(h5schema, "FORMAT_VERSION", 1)
        v1 = convert_pastis(source, tmp_path / "v1.h5")
    with h5py.File(v1, "r") as f:
        assert f.attrs["format_version"] == 1
        assert FLETCHER32 not in filters(f["patches/10000/S2/data"])
    old, new = build_dataset(v1, task="semantic"), build_dataset(v2, task="semantic")
    for i in range(len(new)):
        np.testing.assert_array_equal(old[i]["image"].numpy(), new[i]["image"].numpy())
        np.testing.assert_array_equal(old[i]["semantic"].numpy(), new[i]["semantic"].numpy())
    capsys.readouterr()
    assert data_prep(["verify", str(v1)]) == 0
    out = capsys.readouterr().out
    assert f"{v1}: format version 1 stores no checksums" in out and f"{v1}: OK, 2 patches" in out
    assert "checksums verified" not in out


def test_verify_refuses_what_is_not_a_sitskit_file(tmp_path, capsys):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    assert data_prep(["verify", str(text)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {text}: not a readable HDF5 file") and err.count("\n") == 1
    assert data_prep(["verify", str(tmp_path / "missing.h5")]) == 2
    assert f"{tmp_path / 'missing.h5'}: no such file" in capsys.readouterr().err
