"""Batching of variable-length series."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info

TIME_KEYS = ("image", "dates", "doy")  # leading axis is T; right-padded with zeros to the batch max


def pad_collate(samples: list[dict]) -> dict:
    """Stack a list of samples; series are right-padded on T and flagged in `pad_mask`.

    image [T_i, C, H, W] -> [B, T, C, H, W]; dates, doy [T_i] -> [B, T]; pad_mask bool [B, T] is True on
    padded steps, computed from the lengths (a real all-zero image is never mistaken for padding).
    Other tensors are stacked as they are; strings (`id`) stay a list.

    In a DataLoader worker the batch tensors are written straight into shared memory (as torch's
    default collate does), so that sending the batch to the main process does not copy it once more.
    """
    lengths = [len(s["dates"]) for s in samples]
    t_max = max(lengths)
    shared = get_worker_info() is not None
    batch: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, str):
            batch[key] = values
            continue
        values = [v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v)) for v in values]
        if key in TIME_KEYS:
            padded = _empty_like_batch(values[0], (len(values), t_max, *values[0].shape[1:]), shared)
            for i, v in enumerate(values):
                padded[i, : v.shape[0]] = v
                padded[i, v.shape[0]:] = 0
            batch[key] = padded
        else:
            out = _empty_like_batch(values[0], (len(values), *values[0].shape), shared)
            batch[key] = torch.stack(values, out=out)
    batch["pad_mask"] = torch.arange(t_max)[None, :] >= torch.tensor(lengths)[:, None]
    return batch


def _empty_like_batch(elem: torch.Tensor, shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An uninitialised tensor of `shape` with elem's dtype/device, in shared memory when `shared`."""
    if not shared:
        return elem.new_empty(shape)
    numel = int(np.prod(shape))
    storage = elem._typed_storage()._new_shared(numel, device=elem.device)
    return elem.new(storage).view(shape)
