"""FCN + LSTM (the land-cover seed; docs/models.md, "Model zoo").

Per date (valid dates only): a 2-D U-Net (first level 32 filters, doubling per level; Conv -> BatchNorm
-> ReLU pairs, 2x2 max-pooling, 2x2 transposed-conv upsampling, skip concatenation) gives class logits
whose softmax is that date's probability map. Over time: a ConvLSTM cell takes each date's probability
map and its state and updates the map: map_t = `map_head`(h_t) (1x1 conv, logits). Padded dates skip the
update, so their map is the previous one and the final map is the map at the last valid date.
"""
from __future__ import annotations

import torch
from torch import nn

from sitskit.models.layers import apply_to_valid_frames, check_inputs
from sitskit.models.recurrent import ConvLSTMCell, run_recurrent
from sitskit.models.registry import register_model
from sitskit.models.utae import ConvLayer


class UNet2D(nn.Module):
    """Plain U-Net. x: [N, C, H, W] -> logits [N, K, H, W]; H, W divisible by 2**(len(widths)-1)."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        self.down = nn.ModuleList(
            ConvLayer([c_in, c, c], norm="batch", padding_mode="zeros")
            for c_in, c in zip((in_channels, *widths[:-1]), widths)
        )
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(c, s, 2, stride=2)
                                      for c, s in zip(widths[:0:-1], widths[-2::-1]))
        self.up = nn.ModuleList(ConvLayer([2 * s, s, s], norm="batch", padding_mode="zeros") for s in widths[-2::-1])
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for upsample, block, skip in zip(self.upsample, self.up, skips[-2::-1]):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.classifier(x)


@register_model("fcn_lstm")
class FCNLSTM(nn.Module):
    """forward(x [B,T,C,H,W], dates [B,T], pad_mask [B,T] | None, return_per_date=False)
      -> final logits [B,K,H,W]; with return_per_date also the map after every date [B,T,K,H,W].
    """

    def __init__(self, in_channels: int = 10, num_classes: int = 20, widths: tuple[int, ...] = (32, 64, 128, 256),
                 hidden_dim: int = 64, kernel_size: int = 3):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.n_levels = len(widths)
        self.fcn = UNet2D(in_channels, num_classes, tuple(widths))
        self.lstm = ConvLSTMCell(num_classes, hidden_dim, kernel_size)
        self.map_head = nn.Conv2d(hidden_dim, num_classes, 1)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None,
                return_per_date: bool = False):
        check_inputs(x, dates, pad_mask, self.in_channels, "fcn_lstm")
        factor = 2 ** (self.n_levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"fcn_lstm: H and W must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        probs = apply_to_valid_frames(lambda f: self.fcn(f).softmax(dim=1), x, pad_mask)  # [B, T, K, H, W]
        (h_last, _), hidden = run_recurrent(self.lstm, probs, pad_mask, return_steps=True)
        final = self.map_head(h_last)
        if not return_per_date:
            return final
        return final, self.map_head(hidden.flatten(0, 1)).unflatten(0, hidden.shape[:2])
