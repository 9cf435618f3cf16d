"""Batching of variable-length series."""
from __future__ import annotations

import numpy as np
import torch

TIME_KEYS = ("image", "dates", "doy")  # leading axis is T; right-padded with zeros to the batch max


def pad_collate(samples: list[dict]) -> dict:
    """Stack a list of samples; series are right-padded on T and flagged in `pad_mask`.

    image [T_i, C, H, W] -> [B, T, C, H, W]; dates, doy [T_i] -> [B, T]; pad_mask bool [B, T] is True on
    padded steps, computed from the lengths (a real all-zero image is never mistaken for padding).
    Other tensors are stacked as they are; strings (`id`) stay a list.
    """
    lengths = [len(s["dates"]) for s in samples]
    t_max = max(lengths)
    batch: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, str):
            batch[key] = values
            continue
        values = [v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v)) for v in values]
        if key in TIME_KEYS:
            padded = values[0].new_zeros((len(values), t_max, *values[0].shape[1:]))
            for i, v in enumerate(values):
                padded[i, : v.shape[0]] = v
            batch[key] = padded
        else:
            batch[key] = torch.stack(values)
    batch["pad_mask"] = torch.arange(t_max)[None, :] >= torch.tensor(lengths)[:, None]
    return batch
