"""sitskit.data: values read back through the Datasets equal the sources; crops, date draws, early season,
augmentation, noise, normalisation, limited-label subsets, determinism and pad_collate."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sitskit.data import build_dataset, pad_collate
from sitskit.data.protocol_ids import PROTOCOL_IDS
from sitskit.data_prep import convert_mtlcc, convert_pastis
from sitskit.errors import UserFacingError
from sitskit.simulate import simulate_mtlcc, simulate_pastis

REF_DATE = dt.date(2018, 9, 1)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pastis") / "PASTIS"
    simulate_pastis(root, n_patches=6, size=32, seed=7, with_s1=True)
    return root


@pytest.fixture(scope="module")
def h5(source, tmp_path_factory) -> Path:
    return convert_pastis(source, tmp_path_factory.mktemp("h5") / "p.h5", sats=("S2", "S1A"))


def _meta(root: Path) -> dict[int, dict]:
    feats = json.loads((root / "metadata.geojson").read_text())["features"]
    return {int(f["properties"]["ID_PATCH"]): f["properties"] for f in feats}


def _days(props: dict, sat: str) -> np.ndarray:
    raw = props[f"dates-{sat}"]
    raw = json.loads(raw) if isinstance(raw, str) else raw
    dates = [dt.datetime.strptime(str(raw[str(i)]), "%Y%m%d").date() for i in range(len(raw))]
    return np.array([(d - REF_DATE).days for d in dates])


def _raw(root: Path, pid, sat="S2") -> np.ndarray:
    return np.load(root / f"DATA_{sat}" / f"{sat}_{pid}.npy")


@pytest.mark.parametrize("sat", ["S2", "S1A"])
def test_samples_equal_the_source_files(sat, source, h5):
    meta = _meta(source)
    ds = build_dataset(h5, task="semantic", norm=None, sat=sat)
    assert sorted(ds.ids) == sorted(str(i) for i in meta) and len(ds) == len(meta)
    assert ds.band_names == (["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"] if sat == "S2"
                             else ["VV", "VH", "VV/VH"])
    for i in range(len(ds)):
        s = ds[i]
        pid = int(s["id"])
        assert s["image"].dtype == torch.float32 and s["dates"].dtype == torch.int64
        np.testing.assert_array_equal(s["image"].numpy(), _raw(source, pid, sat).astype(np.float32))
        np.testing.assert_array_equal(s["dates"].numpy(), _days(meta[pid], sat))
        target = np.load(source / "ANNOTATIONS" / f"TARGET_{pid}.npy")
        np.testing.assert_array_equal(s["semantic"].numpy(), target[0])
    assert ds.num_classes == 20 and ds.ignore_index == 19 and ds.class_names[1] == "Meadow"


def test_source_normalisation_averages_the_selected_folds(source, h5):
    norm = json.loads((source / "NORM_S2_patch.json").read_text())
    train = build_dataset(h5, folds=[1, 2, 3])
    np.testing.assert_allclose(train.norm_mean, np.mean([norm[f"Fold_{k}"]["mean"] for k in (1, 2, 3)], 0), rtol=1e-6)
    np.testing.assert_allclose(train.norm_std, np.mean([norm[f"Fold_{k}"]["std"] for k in (1, 2, 3)], 0), rtol=1e-6)
    test = build_dataset(h5, folds=[4])
    np.testing.assert_allclose(test.norm_mean, norm["Fold_4"]["mean"], rtol=1e-6)
    s = test[0]
    raw = _raw(source, int(s["id"])).astype(np.float32)
    expected = (raw - test.norm_mean[:, None, None]) / test.norm_std[:, None, None]
    np.testing.assert_allclose(s["image"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_train_normalisation_is_pooled_over_selected_patches(source, h5):
    ds = build_dataset(h5, folds=[1, 2], norm="train")
    x = np.concatenate([_raw(source, int(i)).astype(np.float64).transpose(1, 0, 2, 3).reshape(10, -1)
                        for i in ds.ids], axis=1)
    np.testing.assert_allclose(ds.norm_mean, x.mean(1), rtol=1e-5)
    np.testing.assert_allclose(ds.norm_std, x.std(1), rtol=1e-4)
    other = build_dataset(h5, folds=[4], norm=(ds.norm_mean, ds.norm_std))
    np.testing.assert_array_equal(other.norm_mean, ds.norm_mean)


def test_grid_crops_tile_the_patch(h5):
    full = build_dataset(h5, task="semantic", norm=None, folds=[1])
    grid = build_dataset(h5, task="semantic", norm=None, folds=[1], crop=16, crop_mode="grid")
    assert len(grid) == 4 * len(full)
    for p in range(len(full)):
        whole = full[p]
        rebuilt = torch.zeros_like(whole["image"])
        labels = torch.full_like(whole["semantic"], -1)
        for c in range(4):
            s = grid[4 * p + c]
            assert s["id"] == whole["id"]
            y, x = (c // 2) * 16, (c % 2) * 16
            rebuilt[..., y:y + 16, x:x + 16] = s["image"]
            labels[y:y + 16, x:x + 16] = s["semantic"]
        assert torch.equal(rebuilt, whole["image"]) and torch.equal(labels, whole["semantic"])
    cells = build_dataset(h5, task="semantic", norm=None, folds=[1], crop=16, crop_cells=[(1, 1), (0, 0)])
    assert len(cells) == 2 * len(full)
    assert torch.equal(cells[0]["image"], grid[3]["image"]) and torch.equal(cells[1]["image"], grid[0]["image"])
    with pytest.raises(UserFacingError, match="outside"):
        build_dataset(h5, crop=16, crop_cells=[(2, 0)])


def _locate(big: torch.Tensor, small: torch.Tensor) -> tuple[int, int]:
    n = small.shape[-1]
    for y in range(big.shape[-2] - n + 1):
        for x in range(big.shape[-1] - n + 1):
            if torch.equal(big[..., y:y + n, x:x + n], small):
                return y, x
    raise AssertionError("crop not found in the patch")


def test_random_crops_are_a_function_of_seed_epoch_index(h5):
    a = build_dataset(h5, norm=None, crop=8, seed=1)
    b = build_dataset(h5, norm=None, crop=8, seed=1)
    full = build_dataset(h5, norm=None)
    positions = {}
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(len(a)):
            sa, sb = a[i], b[i]
            assert torch.equal(sa["image"], sb["image"])
            positions[epoch, i] = _locate(full[i]["image"], sa["image"])
    assert any(positions[0, i] != positions[1, i] for i in range(len(a)))  # epochs differ
    c = build_dataset(h5, norm=None, crop=8, seed=2)
    assert any(_locate(full[i]["image"], c[i]["image"]) != positions[0, i] for i in range(len(c)))


def test_date_draw_is_sorted_seeded_and_consistent(h5):
    full = build_dataset(h5, norm=None)
    ds = build_dataset(h5, norm=None, num_dates=10, seed=3)
    for i in range(len(ds)):
        s, f = ds[i], full[i]
        d = s["dates"].numpy()
        assert len(d) == 10 and (np.diff(d) > 0).all()
        pos = np.searchsorted(f["dates"].numpy(), d)
        np.testing.assert_array_equal(f["dates"].numpy()[pos], d)
        assert torch.equal(s["image"], f["image"][pos]) and torch.equal(s["doy"], f["doy"][pos])
        assert torch.equal(ds[i]["dates"], s["dates"])  # same (seed, epoch, index) -> same draw
    with pytest.raises(UserFacingError, match="selection is empty"):
        build_dataset(h5, num_dates=500)


def test_early_season_cut_off(h5):
    full = build_dataset(h5, norm=None)
    by_doy = build_dataset(h5, norm=None, max_doy=120)
    by_date = build_dataset(h5, norm=None, max_date="2019-03-31")
    for i in range(len(full)):
        f = full[i]
        keep = (f["doy"] <= 120).numpy()
        assert torch.equal(by_doy[i]["image"], f["image"][keep]) and torch.equal(by_doy[i]["doy"], f["doy"][keep])
        cutoff = (dt.date(2019, 3, 31) - REF_DATE).days
        assert torch.equal(by_date[i]["dates"], f["dates"][f["dates"] <= cutoff])


def test_augmentation_moves_image_and_labels_together(h5):
    plain = build_dataset(h5, task="semantic", norm=None)
    aug = build_dataset(h5, task="semantic", norm=None, augment=True, seed=4)
    seen = set()
    for epoch in range(3):
        aug.set_epoch(epoch)
        for i in range(len(aug)):
            p, a = plain[i], aug[i]
            assert torch.equal(a["dates"], p["dates"])
            found = [(k, fl) for k in range(4) for fl in (False, True)
                     if torch.equal(_geo(p["image"], k, fl), a["image"])]
            assert found, "augmented image is not a rotation/flip of the original"
            k, fl = found[0]
            assert torch.equal(_geo(p["semantic"], k, fl), a["semantic"])
            seen.add((k, fl))
    assert len(seen) > 2


def _geo(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    t = torch.rot90(t, k, dims=(-2, -1))
    return torch.flip(t, dims=(-1,)) if flip else t


def test_noise_is_in_reflectance_units_and_follows_the_share(h5):
    plain = build_dataset(h5, norm=None)
    noisy = build_dataset(h5, norm=None, noise_sigma=0.01, noise_prob=1.0)
    diff = (noisy[0]["image"] - plain[0]["image"]).numpy()
    assert 90 < diff.std() < 110 and abs(diff.mean()) < 5  # 0.01 reflectance = 100 DN
    some = build_dataset(h5, norm=None, noise_sigma=0.01, noise_prob=0.5, seed=9)
    changed = [not torch.equal(some[i]["image"], plain[i]["image"]) for i in range(len(some))]
    some.set_epoch(1)
    changed += [not torch.equal(some[i]["image"], plain[i]["image"]) for i in range(len(some))]
    assert 0 < sum(changed) < len(changed)


def test_label_subsets(h5):
    all_ids = build_dataset(h5).ids
    explicit = [int(all_ids[2]), int(all_ids[0]), int(all_ids[2])]
    ds = build_dataset(h5, label_subset=explicit, folds=[1])
    assert ds.ids == [str(i) for i in explicit] and len(ds) == 3  # order and duplicates kept
    with pytest.raises(UserFacingError, match="99999"):
        build_dataset(h5, label_subset=[99999])
    one = build_dataset(h5, label_subset=1, seed=0)
    again = build_dataset(h5, label_subset=1, seed=0)
    assert one.ids == again.ids and 0 < len(one.ids) <= len(all_ids)
    half = build_dataset(h5, label_subset=0.5, seed=0)
    assert set(half.ids) <= set(all_ids)


def test_pastis_protocol_list_is_reproduced(tmp_path):
    ids = sorted(set(PROTOCOL_IDS["stcln_pastis_train"]))
    root = simulate_pastis(tmp_path / "P", size=16, ids=ids, seed=0)
    h5 = convert_pastis(root, tmp_path / "p.h5")
    ds = build_dataset(h5, task="semantic", folds=[1], label_subset="stcln_pastis_train", crop=8,
                       crop_cells=[(0, 0), (1, 1)])
    assert [int(i) for i in ds.ids] == PROTOCOL_IDS["stcln_pastis_train"]
    assert len(ds.ids) == 76 and len(set(ds.ids)) == 72 and len(ds) == 152
    ref = Path("/work/shared/reference/stcln_protocol_ids.txt")  # the published list, where available
    if ref.exists():
        line = ref.read_text().split("# PASTIS_TRAIN")[1].splitlines()[1]
        assert [int(v) for v in line.split(",")] == PROTOCOL_IDS["stcln_pastis_train"]


@pytest.mark.slow
def test_mtlcc_protocol_list_is_reproduced(tmp_path):
    ids = sorted(set(PROTOCOL_IDS["stcln_mtlcc_train"]))
    root = simulate_mtlcc(tmp_path / "M", size=24, ids=ids, years=(2016,))
    h5 = convert_mtlcc(root, tmp_path / "m.h5", years=(2016,), size=240)
    ds = build_dataset(h5, task="semantic", years=[2016], label_subset="stcln_mtlcc_train")
    assert [int(i.split("_")[1]) for i in ds.ids] == PROTOCOL_IDS["stcln_mtlcc_train"] and len(ds) == 78


def test_panoptic_targets(source, h5):
    ds = build_dataset(h5, task="panoptic", norm=None)
    s = ds[0]
    inst = np.load(source / "INSTANCE_ANNOTATIONS" / f"INSTANCES_{s['id']}.npy")
    zones = np.load(source / "INSTANCE_ANNOTATIONS" / f"ZONES_{s['id']}.npy")
    np.testing.assert_array_equal(s["instances"].numpy(), inst)
    np.testing.assert_array_equal(s["heatmap"].numpy(),
                                  np.load(source / "INSTANCE_ANNOTATIONS" / f"HEATMAP_{s['id']}.npy"))
    for code in np.unique(inst)[1:4]:
        rows, cols = np.nonzero(inst == code)
        zone = zones == code
        assert (s["size"][0].numpy()[zone] == len(set(rows))).all()
        assert (s["size"][1].numpy()[zone] == len(set(cols))).all()


def test_pad_collate_pads_time_and_masks_from_lengths():
    def sample(t, idx):
        img = torch.ones(t, 2, 4, 4) * (idx + 1)
        img[-1] = 0  # a real all-zero date must not be taken for padding
        return {"image": img, "dates": torch.arange(1, t + 1), "doy": torch.arange(1, t + 1),
                "id": str(idx), "semantic": torch.full((4, 4), idx)}
    batch = pad_collate([sample(3, 0), sample(5, 1)])
    assert batch["image"].shape == (2, 5, 2, 4, 4) and batch["id"] == ["0", "1"]
    assert batch["pad_mask"].tolist() == [[False, False, False, True, True], [False] * 5]
    assert batch["image"][0, 3:].abs().sum() == 0 and batch["dates"][0].tolist() == [1, 2, 3, 0, 0]
    assert batch["semantic"].shape == (2, 4, 4)


def test_dataloader_workers_see_the_same_samples(h5):
    ds = build_dataset(h5, task="semantic", crop=8, num_dates=6, augment=True, seed=5)
    ds.set_epoch(2)
    one = list(DataLoader(ds, batch_size=3, collate_fn=pad_collate, num_workers=0))
    two = list(DataLoader(ds, batch_size=3, collate_fn=pad_collate, num_workers=2))
    for a, b in zip(one, two):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"]) and torch.equal(a["dates"], b["dates"])


def test_bad_files_and_arguments_are_clear_errors(h5, tmp_path):
    with pytest.raises(UserFacingError, match="no such file"):
        build_dataset(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserFacingError, match="not a readable HDF5 file"):
        build_dataset(tmp_path / "junk.h5")
    with pytest.raises(UserFacingError, match="PASTIS folds are 1..5"):
        build_dataset(h5, folds=[6])
    with pytest.raises(UserFacingError, match="use folds"):
        build_dataset(h5, split="train")
    with pytest.raises(UserFacingError, match="no S1D series"):
        build_dataset(h5, sat="S1D")
    with pytest.raises(UserFacingError, match="larger than"):
        build_dataset(h5, crop=64)
    with pytest.raises(UserFacingError, match="norm"):
        build_dataset(h5, norm="imagenet")
