"""Small layers shared by STCLN and U-TAE: positional encoding, masked group norm, per-frame application."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalPositionalEncoding(nn.Module):
    """Transformer sinusoids of a scalar position, `d` dims tiled `repeat` times (L-TAE convention).

    angle(p, i) = p / period^(2*floor(i/2)/d); sin on even i, cos on odd i. No parameters; the
    denominators are a non-persistent buffer so the module follows `.to(device)` and stays out of
    state dicts (the reference keeps them as a plain attribute moved once to CUDA).

    positions: [B, T] (int or float) -> [B, T, d * repeat]
    """

    def __init__(self, d: int, period: float = 1000.0, repeat: int = 1):
        super().__init__()
        self.d, self.period, self.repeat = d, period, repeat
        exponents = 2 * torch.div(torch.arange(d), 2, rounding_mode="floor").float() / d
        self.register_buffer("denom", torch.pow(float(period), exponents), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.float()[..., None] / self.denom
        table = torch.empty_like(angles)
        table[..., 0::2] = torch.sin(angles[..., 0::2])
        table[..., 1::2] = torch.cos(angles[..., 1::2])
        return table.repeat(*([1] * (table.dim() - 1)), self.repeat)


class SequenceGroupNorm(nn.GroupNorm):
    """GroupNorm over (channel group, time) of per-pixel sequences, optionally ignoring padded steps.

    Same parameters/keys as `nn.GroupNorm(num_groups, num_channels)` applied to [N, C, T] (what the
    reference does). With `pad_mask`, mean and variance are taken over the valid steps only, so
    padding a sequence with extra dates does not change the normalised valid steps.

    x: [N, T, C], pad_mask: [N, T] bool (True = padded) or None -> [N, T, C] (padded steps set to 0)
    """

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if pad_mask is None:
            return F.group_norm(x.transpose(1, 2), self.num_groups, self.weight, self.bias, self.eps).transpose(1, 2)
        n, t, c = x.shape
        g = self.num_groups
        x = x.float()  # statistics in float32, as autocast does for F.group_norm
        valid = (~pad_mask).to(x.dtype)[:, :, None, None]  # [N, T, 1, 1]
        xg = x.reshape(n, t, g, c // g)
        count = valid.sum(dim=1, keepdim=True).clamp_min(1.0) * (c // g)  # [N, 1, 1, 1]
        mean = (xg * valid).sum(dim=(1, 3), keepdim=True) / count
        centred = (xg - mean) * valid
        var = centred.pow(2).sum(dim=(1, 3), keepdim=True) / count
        out = (centred * torch.rsqrt(var + self.eps)).reshape(n, t, c)
        return (out * self.weight + self.bias) * valid.reshape(n, t, 1)


def apply_to_valid_frames(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                          pad_mask: torch.Tensor | None, fill_value: float = 0.0) -> torch.Tensor:
    """Run a per-image module on the non-padded frames only and put the results back in place.

    Padded frames never enter `fn`, so BatchNorm batch statistics (train mode) exclude them and no
    time is spent on them; their outputs are `fill_value`.

    x: [B, T, C, H, W], pad_mask: [B, T] bool (True = padded) or None -> [B, T, C', H', W']
    """
    return scatter_frames(fn(gather_frames(x, pad_mask)), pad_mask, x.shape[:2], fill_value)


def gather_frames(x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, ...] -> the valid frames [n_valid, ...] (all B*T frames when nothing is padded)."""
    if pad_mask is None or not bool(pad_mask.any()):
        return x.flatten(0, 1)
    return x[~pad_mask]


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out NHWC (and not also NCHW-contiguous, as when C or H*W is 1)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def scatter_frames(frames: torch.Tensor, pad_mask: torch.Tensor | None, batch_shape: tuple[int, int],
                   fill_value: float = 0.0) -> torch.Tensor:
    """Inverse of `gather_frames`: [n_valid, ...] -> [B, T, ...], padded frames = fill_value.

    Channels-last frames [n, C, H, W] stay channels-last per frame (the result's memory is [B, T, H, W, C]):
    scattering them into a [B, T, C, H, W]-ordered tensor would be a slow transposing copy, and the
    per-pixel layouts that follow (e.g. STCLN's tokens [B, H*W, T, C]) read C-contiguous runs."""
    if pad_mask is None or not bool(pad_mask.any()):
        return frames.unflatten(0, tuple(batch_shape))
    if is_channels_last(frames):
        _, c, h, w = frames.shape
        out = frames.new_full((*batch_shape, h, w, c), fill_value).permute(0, 1, 4, 2, 3)
    else:
        out = frames.new_full((*batch_shape, *frames.shape[1:]), fill_value)
    return out.index_put_((~pad_mask,), frames)


def check_inputs(x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None, in_channels: int,
                 model: str) -> None:
    """Shape checks shared by the models' forward (clear messages instead of deep matmul errors)."""
    if x.dim() != 5:
        raise ValueError(f"{model}: x must be [B, T, C, H, W], got shape {tuple(x.shape)}")
    b, t, c = x.shape[:3]
    if c != in_channels:
        raise ValueError(f"{model}: expected {in_channels} channels, got x of shape {tuple(x.shape)}")
    if tuple(dates.shape) != (b, t):
        raise ValueError(f"{model}: dates must be [B, T] = {(b, t)}, got {tuple(dates.shape)}")
    if pad_mask is not None:
        if tuple(pad_mask.shape) != (b, t) or pad_mask.dtype != torch.bool:
            raise ValueError(f"{model}: pad_mask must be bool [B, T] = {(b, t)}, got {pad_mask.dtype} "
                             f"{tuple(pad_mask.shape)}")
        if bool(pad_mask.all(dim=1).any()):
            raise ValueError(f"{model}: a sample in the batch has no valid date (pad_mask all True)")
