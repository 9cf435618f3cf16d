"""Full-patch inference: one native forward, or an overlapping sliding window with smooth blending.

Models fine-tuned on crops (STCLN: 32x32) are evaluated on whole patches (PASTIS 128x128). The sliding
window covers every pixel; where windows overlap, their outputs are averaged with a separable sine
("cosine") weight that is highest at the window centre and small but never 0 at its border, so seams
vanish and the patch border, which only border windows see, is still defined.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of `window` px along an axis of `size` px with fractional `overlap`; the last
    window ends exactly at `size`, so every pixel is covered. Requires window <= size."""
    stride = max(1, round(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blend_weight(h: int, w: int, device=None) -> torch.Tensor:
    """[h, w] separable weight sin(pi (i + 0.5) / n): 1 near the centre, > 0 everywhere."""
    def axis(n):
        return torch.sin(math.pi * (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n)
    return axis(h)[:, None] * axis(w)[None, :]


@torch.no_grad()
def predict_patch(model_fn: ModelFn, image: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None,
                  window: int | tuple[int, int] | None = None, overlap: float = 0.5,
                  num_classes: int | None = None, batch_windows: int = 8, probs: bool = True) -> torch.Tensor:
    """Class scores of one patch (a batch of patches with window=None).

    image: [B, T, C, H, W] (B = 1 with a window); dates: [B, T]; pad_mask: [B, T] bool (True = padded) or None;
    model_fn(x [B, T, C, h, w], dates [B, T], pad_mask [B, T] | None) -> logits [B, K, h, w].
    window: None = one native forward; else the window size (int or (h, w)). A window larger than the patch
    is **clamped** to the patch size along that axis. overlap in [0, 1): share of a window shared with the
    next. batch_windows: windows per forward. probs: blend and return softmax probabilities (default) or
    raw logits. num_classes: if given, the model output is checked against it.
    Returns [B, K, H, W] float32 on image's device.
    """
    if image.ndim != 5 or (window is not None and image.shape[0] != 1):
        raise ValueError(f"image must be [1, T, C, H, W] (or [B, T, C, H, W] without a window), "
                         f"got {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")

    def forward(x, n):
        out = model_fn(x, dates.expand(n, -1), None if pad_mask is None else pad_mask.expand(n, -1)).float()
        if num_classes is not None and out.shape[1] != num_classes:
            raise ValueError(f"model returned {out.shape[1]} classes, expected {num_classes}")
        return out.softmax(1) if probs else out

    H, W = image.shape[-2:]
    if window is None:
        return forward(image, image.shape[0])
    wh, ww = (window, window) if isinstance(window, int) else window
    if wh < 1 or ww < 1:
        raise ValueError(f"window must be positive, got {window}")
    wh, ww = min(wh, H), min(ww, W)
    boxes = [(y, x) for y in window_starts(H, wh, overlap) for x in window_starts(W, ww, overlap)]
    weight = blend_weight(wh, ww, image.device)
    total = weight_sum = None
    for i in range(0, len(boxes), batch_windows):
        chunk = boxes[i:i + batch_windows]
        crops = torch.cat([image[..., y:y + wh, x:x + ww] for y, x in chunk])
        out = forward(crops, len(chunk)) * weight
        if total is None:
            total = out.new_zeros(1, out.shape[1], H, W)
            weight_sum = out.new_zeros(1, 1, H, W)
        for (y, x), o in zip(chunk, out):
            total[0, :, y:y + wh, x:x + ww] += o
            weight_sum[0, :, y:y + wh, x:x + ww] += weight
    return total / weight_sum

