"""FPN-ConvLSTM baseline of the U-TAE paper (docs/models.md, "Model zoo"): 1,151,028 parameters (10 ch / 20 cl).

Per date (valid dates only): ConvLayer(C -> 32 -> 64, GroupNorm 4) -> feature pyramid (a 3x3 conv to 64
channels, three 3x3 convs with dilation 1, 2, 4 and the per-channel global max broadcast over the image,
concatenated: 256 channels) -> ConvLayer(256 -> 128, GroupNorm 4). Over time: ConvLSTM (hidden 88) that
skips padded dates; a 1x1 conv on the last cell state gives the logits.
"""
from __future__ import annotations

import torch
from torch import nn

from sitskit.models.layers import apply_to_valid_frames, check_inputs
from sitskit.models.recurrent import ConvLSTMCell, run_recurrent
from sitskit.models.registry import register_model
from sitskit.models.utae import ConvLayer


class PyramidBlock(nn.Module):
    """Atrous pyramid: conv -> [dilated convs (dilation 2**i, i < n_levels-1), global max] concatenated.

    (The reference names its global pooling "avg" but takes the max; the max is kept.)
    x: [N, C, H, W] -> [N, n_levels * n_channels, H, W]
    """

    def __init__(self, in_channels: int, n_levels: int = 4, n_channels: int = 64):
        super().__init__()
        self.inconv = nn.Conv2d(in_channels, n_channels, 3, padding=1)
        self.convs = nn.ModuleList(
            nn.Conv2d(n_channels, n_channels, 3, dilation=2**i, padding=2**i, padding_mode="reflect")
            for i in range(n_levels - 1)
        )
        self.out_channels = n_levels * n_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inconv(x)
        global_max = x.amax(dim=(-2, -1), keepdim=True).expand_as(x)
        return torch.cat([conv(x) for conv in self.convs] + [global_max], dim=1)


@register_model("fpn_convlstm")
class FPNConvLSTM(nn.Module):
    """forward(x [B,T,C,H,W], dates [B,T], pad_mask [B,T] | None) -> logits [B,K,H,W]"""

    def __init__(self, in_channels: int = 10, num_classes: int = 20, inconv_widths: tuple[int, ...] = (32, 64),
                 n_levels: int = 4, n_channels: int = 64, hidden_dim: int = 88):
        super().__init__()
        self.in_channels = in_channels
        self.inconv = ConvLayer([in_channels, *inconv_widths], norm="group")
        self.pyramid = PyramidBlock(inconv_widths[-1], n_levels, n_channels)
        mid = n_channels * n_levels // 2
        self.mid_conv = ConvLayer([self.pyramid.out_channels, mid], norm="group")
        self.convlstm = ConvLSTMCell(mid, hidden_dim)
        self.outconv = nn.Conv2d(hidden_dim, num_classes, 1)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(x, dates, pad_mask, self.in_channels, "fpn_convlstm")
        feats = apply_to_valid_frames(lambda f: self.mid_conv(self.pyramid(self.inconv(f))), x, pad_mask)
        _, cell = run_recurrent(self.convlstm, feats, pad_mask)
        return self.outconv(cell)
