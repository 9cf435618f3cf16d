"""3D U-Net baseline of the U-TAE paper (docs/models.md, "Model zoo"): 1,553,796 parameters (10 ch / 20 cl).

Spatio-temporal 3x3x3 convolutions (BatchNorm3d, LeakyReLU), two 2x2x2 max-poolings, transposed-conv
upsampling with skip connections, a final Conv3d to K classes and a mean over the valid dates.

Padded dates change nothing: the valid dates of each sample are moved to the front (in order) and the
time axis is zero-extended to a multiple of 4; after every layer the positions beyond a sample's valid
length at that temporal resolution (ceil(n / 2**level)) are set to 0, i.e. exactly what the convolutions'
zero padding shows a series of length n alone. The same extension is applied to a series alone, so a
sample gives the same logits whatever the batch's longest series. In training, BatchNorm statistics
are taken over the valid positions only (`MaskedBatchNorm3d`).
"""
from __future__ import annotations

import torch
from torch import nn

from sitskit.models.layers import check_inputs
from sitskit.models.registry import register_model


class MaskedBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d whose training statistics ignore masked positions (same parameters and buffers).

    x: [B, C, T, H, W], valid: [B, 1, T, 1, 1] float 0/1 | None -> [B, C, T, H, W]
    """

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if valid is None or not self.training:
            return super().forward(x)
        count = valid.sum() * x.shape[-1] * x.shape[-2]
        mean = (x * valid).sum(dim=(0, 2, 3, 4)) / count
        var = ((x - mean[None, :, None, None, None]).pow(2) * valid).sum(dim=(0, 2, 3, 4)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * count / (count - 1).clamp_min(1))
        shape = (1, -1, 1, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape)


class ConvUnit(nn.Module):
    """Conv3d(3x3x3) or ConvTranspose3d(x2) -> MaskedBatchNorm3d -> LeakyReLU, then zero the masked steps."""

    def __init__(self, c_in: int, c_out: int, transpose: bool = False):
        super().__init__()
        self.conv = (nn.ConvTranspose3d(c_in, c_out, 3, stride=2, padding=1, output_padding=1) if transpose
                     else nn.Conv3d(c_in, c_out, 3, padding=1))
        self.norm = MaskedBatchNorm3d(c_out)
        self.act = nn.LeakyReLU()

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x), valid)) * valid


class DoubleUnit(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int):
        super().__init__()
        self.first, self.second = ConvUnit(c_in, c_mid), ConvUnit(c_mid, c_out)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x, valid), valid)


def valid_masks(lengths: torch.Tensor, t: int, levels: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per temporal level l (length t / 2**l): [B, 1, t_l, 1, 1] with 1 on the first ceil(n / 2**l) steps."""
    masks = []
    for level in range(levels):
        n_l = torch.div(lengths + 2**level - 1, 2**level, rounding_mode="floor")
        steps = torch.arange(t // 2**level, device=lengths.device)
        masks.append((steps[None] < n_l[:, None]).to(dtype)[:, None, :, None, None])
    return masks


def valid_first(x: torch.Tensor, pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each sample's valid dates to the front (keeping their order), zero the rest.

    x: [B, T, C, H, W] -> (x' [B, T, C, H, W], lengths [B])
    """
    b, t = x.shape[:2]
    if pad_mask is None:
        return x, torch.full((b,), t, dtype=torch.long, device=x.device)
    order = torch.argsort(pad_mask.to(torch.int8), dim=1, stable=True)
    x = torch.take_along_dim(x, order[:, :, None, None, None], dim=1)
    lengths = (~pad_mask).sum(dim=1)
    keep = torch.arange(t, device=x.device)[None] < lengths[:, None]
    return x * keep[:, :, None, None, None].to(x.dtype), lengths


@register_model("unet3d")
class UNet3D(nn.Module):
    """forward(x [B,T,C,H,W], dates [B,T], pad_mask [B,T] | None) -> logits [B,K,H,W]; H, W divisible by 4."""

    def __init__(self, in_channels: int = 10, num_classes: int = 20, feats: int = 8):
        super().__init__()
        self.in_channels = in_channels
        f = feats
        self.en3 = DoubleUnit(in_channels, 4 * f, 4 * f)
        self.en4 = DoubleUnit(4 * f, 8 * f, 8 * f)
        self.pool = nn.MaxPool3d(2)
        self.center_in = ConvUnit(8 * f, 16 * f)
        self.center_conv = ConvUnit(16 * f, 16 * f)
        self.center_up = nn.ConvTranspose3d(16 * f, 8 * f, 3, stride=2, padding=1, output_padding=1)
        self.dc4 = DoubleUnit(16 * f, 8 * f, 8 * f)
        self.trans3 = ConvUnit(8 * f, 4 * f, transpose=True)
        self.dc3 = DoubleUnit(8 * f, 4 * f, 2 * f)
        self.final = nn.Conv3d(2 * f, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(x, dates, pad_mask, self.in_channels, "unet3d")
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"unet3d: H and W must be divisible by 4, got {tuple(x.shape[-2:])}")
        x, lengths = valid_first(x, pad_mask)
        t = -(-x.shape[1] // 4) * 4
        x = nn.functional.pad(x.transpose(1, 2), (0, 0, 0, 0, 0, t - x.shape[1]))  # [B, C, t, H, W]
        v0, v1, v2 = valid_masks(lengths, t, 3, x.dtype)
        en3 = self.en3(x, v0)
        en4 = self.en4(self.pool(en3), v1)
        center = self.center_conv(self.center_in(self.pool(en4), v2), v2)
        up4 = self.center_up(center) * v1
        dc4 = self.dc4(torch.cat([up4, en4], dim=1), v1)
        dc3 = self.dc3(torch.cat([self.trans3(dc4, v0), en3], dim=1), v0)
        final = self.final(dc3)  # [B, K, t, H, W]
        return (final * v0).sum(dim=2) / lengths.to(x.dtype)[:, None, None, None]
