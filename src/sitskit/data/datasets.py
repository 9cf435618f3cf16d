"""Map-style torch Datasets over a sitskit HDF5 file (docs/datasets.md).

A sample is a dict: image float32 [T, C, H, W], dates int64 [T] (days since the dataset reference date;
MTLCC: since 1 January of the series' year), doy int64 [T], id (str), plus semantic int64 [H, W]
(task "semantic"/"panoptic") and the PaPs targets (task "panoptic"). Randomness (crop position, date draw,
noise, flips/rotations) is drawn from numpy's Generator seeded with (seed, epoch, index), so any worker
and any resumed run sees the same sample for the same (epoch, index).
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import ClassVar

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc/zstd filters for reading)
import numpy as np
import torch
from torch.utils.data import Dataset

from sitskit.data_prep.h5schema import has_checksums, open_sits, read_error
from sitskit.errors import UserFacingError

from . import normalization, subsets, transforms

TASKS = ("pretrain", "semantic", "panoptic")


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class SITSDataset(Dataset):
    """Common machinery; PastisDataset / MTLCCDataset choose patches and targets."""

    dataset_name = ""

    def __init__(self, h5_path, task="pretrain", folds=None, split=None, years=None, norm="source",
                 crop=None, crop_mode="random", num_dates=None, max_doy=None, max_date=None, augment=False,
                 noise_sigma=0.0, noise_prob=0.0, label_subset=None, seed=0, sat="S2", crop_cells=None):
        if task not in TASKS:
            raise UserFacingError(f"task {task!r}: use one of {', '.join(TASKS)}")
        if crop_mode not in ("random", "grid"):
            raise UserFacingError(f"crop_mode {crop_mode!r}: use 'random' or 'grid'")
        if not 0.0 <= noise_prob <= 1.0 or noise_sigma < 0:
            raise UserFacingError("noise_prob must lie in [0, 1] and noise_sigma be >= 0")
        self.path = Path(h5_path)
        self.task, self.sat, self.seed, self.epoch = task, sat, int(seed), 0
        self.augment, self.noise_sigma, self.noise_prob = augment, float(noise_sigma), float(noise_prob)
        self.num_dates = num_dates
        self._file: h5py.File | None = None
        self._pid: int | None = None

        with open_sits(self.path) as f:
            attrs = dict(f.attrs)
            if attrs["dataset"] != self.dataset_name:
                raise UserFacingError(f"{self.path}: holds {attrs['dataset']}, not {self.dataset_name}")
            if sat not in [_str(s) for s in attrs["sats"]]:
                raise UserFacingError(f"{self.path}: no {sat} series (has {[_str(s) for s in attrs['sats']]})")
            index = {k: f["index"][k][()] for k in f["index"]}
            self.keys_all = [_str(k) for k in index["key"]]
            rows = self._select(index, folds, split, years, label_subset)
            self.band_names = [_str(b) for b in attrs[f"bands_{sat}"]]
            self.class_names = [_str(c) for c in attrs["class_names"]]
            self.num_classes = int(attrs["num_classes"])
            self.ignore_index = int(attrs["ignore_index"])
            self.reflectance_scale = float(attrs["reflectance_scale"]) if sat == "S2" else 1.0
            # dates of every selected patch, then the early-season cut-off
            self._dates, self._doy, self._keep = {}, {}, {}
            cutoff = _dt.date.fromisoformat(str(max_date)).toordinal() if max_date else None
            for r in dict.fromkeys(rows):
                g = f[f"patches/{self.keys_all[r]}/{sat}"]
                day, doy = g["day"][()].astype(np.int64), g["doy"][()].astype(np.int64)
                keep = np.ones(len(day), dtype=bool)
                if max_doy is not None:
                    keep &= doy <= int(max_doy)
                if cutoff is not None:
                    ordinal = np.array([_dt.date.fromisoformat(_str(d)).toordinal() for d in g["date"][()]])
                    keep &= ordinal <= cutoff
                self._dates[r], self._doy[r], self._keep[r] = day, doy, np.flatnonzero(keep)
            need = num_dates or 1
            self.dropped_ids = [self.keys_all[r] for r in rows if len(self._keep[r]) < need]
            rows = [r for r in rows if len(self._keep[r]) >= need]  # MTLCC-pytorch drops short series too
            if not rows:
                raise UserFacingError(f"{self.path}: the selection is empty (folds={folds}, split={split}, "
                                      f"years={years}, label_subset={label_subset!r}, num_dates={num_dates})")
            self.rows = rows
            self.ids = [self.keys_all[r] for r in rows]
            self.height, self.width = int(index["height"][rows[0]]), int(index["width"][rows[0]])
            self.norm_mean, self.norm_std = self._norm(f, norm, folds)

        self.crop = int(crop) if crop else None
        if self.crop and (self.crop > self.height or self.crop > self.width):
            raise UserFacingError(f"crop {self.crop} is larger than the {self.height}x{self.width} patches")
        if crop_cells is not None:  # explicit grid cells (row, col) in crop units, e.g. STCLN's 2 crops
            if not self.crop:
                raise UserFacingError("crop_cells needs crop")
            outside = [(cy, cx) for cy, cx in crop_cells
                       if cy < 0 or cx < 0 or (cy + 1) * self.crop > self.height or (cx + 1) * self.crop > self.width]
            if outside:
                raise UserFacingError(f"crop_cells {outside} fall outside the {self.height}x{self.width} patches "
                                      f"for crop {self.crop}")
            self._crops = [(r, (cy * self.crop, cx * self.crop)) for r in rows for cy, cx in crop_cells]
        elif self.crop and crop_mode == "grid":
            grid = transforms.crop_grid(self.height, self.width, self.crop)
            self._crops = [(r, yx) for r in rows for yx in grid]
        else:
            self._crops = [(r, None) for r in rows]

    # ----------------------------------------------------------------------------- selection
    def _select(self, index, folds, split, years, label_subset) -> list[int]:
        raise NotImplementedError

    def _apply_subset(self, index, rows: list[int], label_subset, match_field: str) -> list[int]:
        explicit = subsets.explicit_ids(label_subset)
        if label_subset is None:
            return rows
        if explicit is not None:
            by_id: dict[int, list[int]] = {}
            for r in rows:
                by_id.setdefault(int(index[match_field][r]), []).append(r)
            missing = [i for i in dict.fromkeys(explicit) if i not in by_id]
            if missing:
                raise UserFacingError(f"{self.path}: label_subset ids not in the selection: "
                                      f"{missing[:10]}{' …' if len(missing) > 10 else ''}")
            return [r for i in explicit for r in by_id[i]]  # list order, duplicates kept
        attrs_void = [self.ignore_index_attr] + self.background_attr
        classes = subsets.dominant_class(index["class_pixels"], attrs_void)
        return subsets.stratified(rows, classes, label_subset, self.seed)

    def _norm(self, f, norm, folds):
        if norm is None:
            c = len(self.band_names)
            return np.zeros(c, np.float32), np.ones(c, np.float32)
        if isinstance(norm, (tuple, list)) and len(norm) == 2:
            mean, std = (np.asarray(v, dtype=np.float32).reshape(-1) for v in norm)
            return mean, std
        if norm == "source":
            return normalization.source_stats(f, self.sat, folds)
        if norm == "train":
            rows = list(dict.fromkeys(self.rows))
            return normalization.pooled_stats(f, [self.keys_all[r] for r in rows], self.sat,
                                              [self._keep[r] for r in rows])
        raise UserFacingError(f"norm {norm!r}: use 'source', 'train', None or a (mean, std) pair")

    # ----------------------------------------------------------------------------------- access
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._crops)

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():  # one handle per worker process
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = state["_pid"] = None
        return state

    def __getitem__(self, i: int) -> dict:
        try:
            return self._read_sample(i)
        except (OSError, RuntimeError) as exc:  # HDF5: checksum mismatch, undecodable chunk, damaged B-tree
            key = self.keys_all[self._crops[i][0]]
            raise read_error(self.path, key, exc, checksummed=has_checksums(self._h5())) from None

    def _read_sample(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        row, yx = self._crops[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.crop and yx is None:
            yx = (int(rng.integers(self.height - self.crop + 1)), int(rng.integers(self.width - self.crop + 1)))
        ys, xs = (slice(yx[0], yx[0] + self.crop), slice(yx[1], yx[1] + self.crop)) if self.crop \
            else (slice(None), slice(None))
        keep = self._keep[row]
        if self.num_dates:
            keep = keep[transforms.draw_dates(len(keep), self.num_dates, rng)]
        key = self.keys_all[row]
        group = self._h5()[f"patches/{key}"]
        data = group[self.sat]["data"]
        if len(keep) == data.shape[0] and not self.crop:  # whole series: straight into one buffer
            raw = np.empty(data.shape, data.dtype)
            data.read_direct(raw)
        elif len(keep) == data.shape[0]:
            raw = data[:, :, ys, xs]
        elif len(keep) and keep[-1] - keep[0] + 1 == len(keep):  # contiguous (early season): a slice
            raw = data[int(keep[0]): int(keep[-1]) + 1, :, ys, xs]
        else:
            raw = data[keep, :, ys, xs]
        if self.noise_sigma > 0 and rng.random() < self.noise_prob:
            raw = transforms.add_noise(raw.astype(np.float32), self.noise_sigma, self.reflectance_scale, rng)
        # (raw - mean) / std in float32: the subtraction converts the integers as it reads them (one pass
        # less than astype first, same values), then the division runs in place
        image = np.empty(raw.shape, np.float32)
        np.subtract(raw, self.norm_mean[None, :, None, None], out=image)
        np.divide(image, self.norm_std[None, :, None, None], out=image)
        maps = self._targets(group, ys, xs) if self.task != "pretrain" else {}
        if self.augment:
            k, flip = transforms.draw_geometry(rng)
            image = transforms.apply_geometry(image, k, flip)
            maps = {n: transforms.apply_geometry(m, k, flip) for n, m in maps.items()}
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                  "dates": torch.from_numpy(self._dates[row][keep]),
                  "doy": torch.from_numpy(self._doy[row][keep]), "id": key}
        sample.update(self._finish_targets(maps))
        return sample

    def _targets(self, group, ys, xs) -> dict[str, np.ndarray]:
        return {"semantic": group["semantic"][ys, xs].astype(np.int64)}

    def _finish_targets(self, maps: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(np.ascontiguousarray(m)) for n, m in maps.items()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path.name}, task={self.task}, {len(self.ids)} patches, "
                f"{len(self)} samples, sat={self.sat}, crop={self.crop})")


class PastisDataset(SITSDataset):
    """PASTIS(-R): official folds 1..5; `folds=None` takes all. Panoptic targets as the PaPs reference."""

    dataset_name = "pastis"
    ignore_index_attr = 19
    background_attr: ClassVar[list[int]] = [0]

    def _select(self, index, folds, split, years, label_subset):
        if split is not None or years is not None:
            raise UserFacingError("PASTIS is split by folds: use folds=[…], not split/years")
        if folds is not None:
            folds = [int(k) for k in folds]
            bad = [k for k in folds if k not in range(1, 6)]
            if bad:
                raise UserFacingError(f"folds {bad}: PASTIS folds are 1..5")
        all_rows = list(range(len(index["key"])))
        if subsets.explicit_ids(label_subset) is not None:
            # Published lists are taken as given (the reference never checks their folds); folds only
            # choose the normalisation statistics then.
            return self._apply_subset(index, all_rows, label_subset, "id")
        rows = [r for r in all_rows if folds is None or int(index["fold"][r]) in folds]
        return self._apply_subset(index, rows, label_subset, "id")

    def _targets(self, group, ys, xs):
        maps = super()._targets(group, ys, xs)
        if self.task == "panoptic":
            if "instances" not in group:
                raise UserFacingError(f"{self.path}: no instance annotations for task 'panoptic'")
            maps["heatmap"] = group["heatmap"][ys, xs].astype(np.float32)
            maps["instances"] = group["instances"][ys, xs].astype(np.int64)
            maps["zones"] = group["zones"][ys, xs].astype(np.int64)
        return maps

    def _finish_targets(self, maps):
        out = super()._finish_targets(maps)
        if self.task == "panoptic":
            out["size"], out["object_class"] = (torch.from_numpy(a) for a in paps_object_targets(
                maps["instances"], maps["zones"], maps["semantic"]))
        return out


def paps_object_targets(instances: np.ndarray, zones: np.ndarray, semantic: np.ndarray):
    """PaPs per-zone targets, computed after cropping/augmentation so they match the pixels returned.

    size float32 [2, H, W]: rows and columns occupied by the zone's instance (`any` over the other axis,
    as the reference does), written on the whole zone; object_class int64 [H, W]: the instance's class.
    """
    size = np.zeros((2, *instances.shape), np.float32)
    obj = np.zeros(instances.shape, np.int64)
    for code in np.unique(instances):
        if code == 0:
            continue
        mask = instances == code
        zone = zones == code
        size[0][zone] = mask.any(-1).sum()
        size[1][zone] = mask.any(-2).sum()
        obj[zone] = np.bincount(semantic[mask]).argmax()
    return size, obj


class MTLCCDataset(SITSDataset):
    """MTLCC: tiles of train_fold0 / test_fold0 / eval (`split`), series of 2016 and/or 2017 (`years`)."""

    dataset_name = "mtlcc"
    ignore_index_attr = 0
    background_attr: ClassVar[list[int]] = []

    def _select(self, index, folds, split, years, label_subset):
        if folds is not None:
            raise UserFacingError("MTLCC is split by split='train'|'test'|'eval' and years, not folds")
        if self.task == "panoptic":
            raise UserFacingError("MTLCC has no instance annotations: use task 'pretrain' or 'semantic'")
        splits = [_str(s).split(",") for s in index["split"]]
        if split is not None and split not in ("train", "test", "eval"):
            raise UserFacingError(f"split {split!r}: MTLCC splits are train, test, eval")
        rows = [r for r in range(len(splits)) if years is None or int(index["year"][r]) in [int(y) for y in years]]
        if subsets.explicit_ids(label_subset) is None:
            rows = [r for r in rows if split is None or split in splits[r]]
        return self._apply_subset(index, rows, label_subset, "id")


class GeotiffDataset(PastisDataset):
    """Your own region (`data_prep.py geotiff`, docs/own_region.md): patches split by spatial blocks into
    `split='train'|'val'|'test'` (None: all). Class list, ignore index and background come from the file;
    panoptic targets as for PASTIS."""

    dataset_name = "geotiff"

    def __init__(self, h5_path, *args, **kwargs):
        with open_sits(h5_path) as f:
            self.ignore_index_attr = int(f.attrs["ignore_index"])
            self.background_attr = [int(v) for v in f.attrs["background_ids"]]
            self.has_labels = bool(int(f.attrs.get("has_labels", 0)))
        super().__init__(h5_path, *args, **kwargs)

    def _select(self, index, folds, split, years, label_subset):
        if folds is not None:
            raise UserFacingError("a geotiff dataset is split by split='train'|'val'|'test', not folds")
        if self.task != "pretrain" and not self.has_labels:
            raise UserFacingError(f"{self.path}: converted without --labels/--label-raster; only task 'pretrain'")
        if split is not None and split not in ("train", "val", "test"):
            raise UserFacingError(f"split {split!r}: geotiff splits are train, val, test")
        rows = [r for r, s in enumerate(index["split"]) if split is None or _str(s) == split]
        return self._apply_subset(index, rows, label_subset, "id")


def build_dataset(h5_path, task="pretrain", folds=None, split=None, years=None, norm="source", crop=None,
                  crop_mode="random", num_dates=None, max_doy=None, max_date=None, augment=False,
                  noise_sigma=0.0, noise_prob=0.0, label_subset=None, seed=0, sat="S2", crop_cells=None):
    """The PASTIS or MTLCC dataset of `h5_path`, chosen from the file's `dataset` attribute."""
    with open_sits(h5_path) as f:
        name = f.attrs["dataset"]
    cls = {"pastis": PastisDataset, "mtlcc": MTLCCDataset, "geotiff": GeotiffDataset}.get(name)
    if cls is None:
        raise UserFacingError(f"{h5_path}: unknown dataset kind {name!r}")
    return cls(h5_path, task=task, folds=folds, split=split, years=years, norm=norm, crop=crop,
               crop_mode=crop_mode, num_dates=num_dates, max_doy=max_doy, max_date=max_date, augment=augment,
               noise_sigma=noise_sigma, noise_prob=noise_prob, label_subset=label_subset, seed=seed, sat=sat,
               crop_cells=crop_cells)
