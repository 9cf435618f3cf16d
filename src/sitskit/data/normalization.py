"""Per-channel normalisation statistics: image = (raw - mean) / std, mean/std float32 [C]."""
from __future__ import annotations

import h5py
import numpy as np
from tqdm import tqdm

from sitskit.errors import UserFacingError


def source_stats(f: h5py.File, sat: str, folds: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """The source's own statistics. PASTIS: the plain average of the per-fold entries of the selected
    folds, as the reference loader does (train [1,2,3] averages three rows; val/test use their own fold);
    all five folds when `folds` is None. MTLCC: one row (mean 0, std 10 000, i.e. x * 1e-4)."""
    group = f.get(f"norm/{sat}")
    if group is None:
        raise UserFacingError(f"{f.filename}: no source statistics for {sat}")
    mean, std, fold_ids = group["mean"][()], group["std"][()], group["fold"][()].tolist()
    if len(fold_ids) > 1:
        wanted = folds or fold_ids
        missing = [k for k in wanted if k not in fold_ids]
        if missing:
            raise UserFacingError(f"{f.filename}: no normalisation statistics for fold(s) {missing}")
        rows = [fold_ids.index(k) for k in wanted]
        mean, std = mean[rows].mean(0), std[rows].mean(0)
    else:
        mean, std = mean[0], std[0]
    return mean.astype(np.float32), std.astype(np.float32)


def pooled_stats(f: h5py.File, keys: list[str], sat: str, date_index: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over every pixel and kept date of the given patches (float64 accumulation)."""
    total = s1 = s2 = None
    for key, idx in tqdm(list(zip(keys, date_index)), desc="normalisation statistics", unit="patch",
                         disable=None, leave=False):
        if not len(idx):
            continue
        x = f[f"patches/{key}/{sat}/data"][np.asarray(idx)].astype(np.float64)
        x = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
        s1 = x.sum(1) if s1 is None else s1 + x.sum(1)
        s2 = (x * x).sum(1) if s2 is None else s2 + (x * x).sum(1)
        total = x.shape[1] if total is None else total + x.shape[1]
    if total is None:
        raise UserFacingError("norm='train': the selection has no dates to compute statistics from")
    mean = s1 / total
    std = np.sqrt(np.maximum(s2 / total - mean**2, 0.0))
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)
