"""U-TAE ablations of the U-TAE paper (docs/models.md, "Model zoo"), registered by name.

| name | what changes | parameters (10 ch / 20 cl) |
|---|---|---|
| `utae_skip_mean` | skips = plain mean over valid dates (`agg_mode="mean"`) | 1,087,260 |
| `utae_mean_attention` | skips weighted by the head-averaged attention (`agg_mode="att_mean"`) | 1,087,260 |
| `utae_batchnorm` | BatchNorm instead of GroupNorm in the encoder (`encoder_norm="batch"`) | 1,087,260 |
| `utae_single_date` | no temporal encoder: U-TAE's U-Net on one date per sample, the valid date whose calendar day of year is nearest `doy` | 1,004,060 |

The first three are `UTAE` with one option fixed (every other U-TAE option is accepted).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from sitskit.models.layers import check_inputs
from sitskit.models.registry import register_model
from sitskit.models.stenn import PASTIS_REFERENCE_DOY, calendar_doy
from sitskit.models.utae import UTAE, ConvBlock, unet_blocks


def _utae_variant(fixed: dict, doc: str):
    """A UTAE factory with the options in `fixed` set; its signature (checked by `build`) is UTAE's minus them."""

    def factory(**kwargs) -> UTAE:
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise ValueError(f"option(s) {clash} are fixed by this variant ({fixed})")
        return UTAE(**fixed, **kwargs)

    params = [p for name, p in inspect.signature(UTAE).parameters.items() if name not in fixed]
    factory.__signature__ = inspect.Signature(params, return_annotation=UTAE)
    factory.__doc__ = doc
    return factory


utae_skip_mean = register_model("utae_skip_mean")(_utae_variant(
    {"agg_mode": "mean"}, "U-TAE whose skip connections are the mean over the valid dates."))
utae_mean_attention = register_model("utae_mean_attention")(_utae_variant(
    {"agg_mode": "att_mean"}, "U-TAE whose skip connections use the L-TAE attention averaged over heads."))
utae_batchnorm = register_model("utae_batchnorm")(_utae_variant(
    {"encoder_norm": "batch"}, "U-TAE with a BatchNorm (instead of GroupNorm) spatial encoder."))


def nearest_doy_index(doy: torch.Tensor, target: int, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """Index of the valid date whose day of year is nearest `target` (circular distance; ties -> earliest).

    doy: [B, T] (1..365), pad_mask: [B, T] | None -> [B] long
    """
    gap = torch.remainder(doy.long() - target, 365)
    distance = torch.minimum(gap, 365 - gap)
    if pad_mask is not None:
        distance = distance.masked_fill(pad_mask, 10_000)
    return distance.argmin(dim=1)


@register_model("utae_single_date")
class SingleDateUNet(nn.Module):
    """U-TAE's encoder/decoder without temporal encoder, on the date nearest day of year `doy` (213 = 1 August).

    The skips are the selected date's encoder maps. forward(x [B,T,C,H,W], dates [B,T], pad_mask | None,
    doy [B,T] | None) -> logits [B,K,H,W]; day of year from `doy` if given, else from dates and
    `reference_doy` (`sitskit.models.stenn.calendar_doy`).
    """

    def __init__(self, in_channels: int = 10, num_classes: int = 20, doy: int = 213,
                 reference_doy: int = PASTIS_REFERENCE_DOY, encoder_widths: tuple[int, ...] = (64, 64, 64, 128),
                 decoder_widths: tuple[int, ...] = (32, 32, 64, 128), out_conv_width: int = 32,
                 encoder_norm: str = "group", padding_mode: str = "reflect"):
        super().__init__()
        if not 1 <= doy <= 366:
            raise ValueError(f"doy must be a day of year in 1..366, got {doy}")
        self.in_channels, self.doy, self.reference_doy = in_channels, doy, reference_doy
        ew, dw = list(encoder_widths), list(decoder_widths)
        self.n_stages = len(ew)
        self.in_conv, self.down_blocks, self.up_blocks = unet_blocks(in_channels, ew, dw, encoder_norm, padding_mode)
        self.out_conv = ConvBlock([dw[0], out_conv_width, num_classes], norm="batch", last_relu=False,
                                  padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None,
                doy: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(x, dates, pad_mask, self.in_channels, "utae_single_date")
        factor = 2 ** (self.n_stages - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"utae_single_date: H and W must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        day = calendar_doy(dates, self.reference_doy) if doy is None else doy
        index = nearest_doy_index(day, self.doy, pad_mask)
        out = self.in_conv(x[torch.arange(x.shape[0], device=x.device), index])
        maps = [out]
        for down in self.down_blocks:
            out = down(out)
            maps.append(out)
        for i, up in enumerate(self.up_blocks):
            out = up(out, maps[-(i + 2)])
        return self.out_conv(out)
