"""Convolutional recurrent cells and the U-TAE paper's recurrent baselines (docs/models.md, "Model zoo").

Cells: `ConvLSTMCell`, `ConvGRUCell`; `run_recurrent` runs one over a padded series and **skips padded
dates** (the state is carried over unchanged), so padding a series changes nothing.

Registered models (parameter counts for 10 channels / 20 classes, equal to the reference's):

| name | model | parameters |
|---|---|---|
| `convlstm` | ConvLSTM (hidden 160) on the raw images, 3x3 classifier on the last cell state | 1,008,660 |
| `convgru` | ConvGRU (hidden 180) on the raw images, 3x3 classifier on the last state | 956,360 |
| `uconvlstm` | U-TAE's U-Net with a ConvLSTM (hidden 64) instead of the L-TAE, mean skips | 1,520,540 |
| `ubiconvlstm` | same with a bidirectional ConvLSTM (hidden 30 per direction) | 1,414,828 |

`ubiconvlstm(bidirectional=False)` has the reference's 1,209,508 parameters: the reference's
"buconvlstm" configuration builds a forward-only ConvLSTM of hidden size 30 (docs/models.md).
"""
from __future__ import annotations

import torch
from torch import nn

from sitskit.models.layers import check_inputs, gather_frames, scatter_frames
from sitskit.models.registry import register_model
from sitskit.models.utae import ConvBlock, aggregate_skip, unet_blocks

READOUTS = ("cell", "hidden")


class ConvLSTMCell(nn.Module):
    """ConvLSTM cell: one conv on [x, h] gives the gates i, f, o and the candidate g (in that order).

    x: [N, C, H, W], state (h, c) each [N, hidden, H, W] -> (h', c')
    """

    def __init__(self, in_channels: int, hidden_dim: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.conv = nn.Conv2d(in_channels + hidden_dim, 4 * hidden_dim, kernel_size, padding=kernel_size // 2)

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = x.new_zeros(x.shape[0], self.hidden_dim, *x.shape[-2:])
        return zeros, zeros.clone()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        h, c = state
        i, f, o, g = self.conv(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class ConvGRUCell(nn.Module):
    """ConvGRU cell: update/reset gates from [x, h], candidate from [x, r*h]; h' = (1-z) h + z cand.

    x: [N, C, H, W], state (h,) with h [N, hidden, H, W] -> (h',)
    """

    def __init__(self, in_channels: int, hidden_dim: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gates = nn.Conv2d(in_channels + hidden_dim, 2 * hidden_dim, kernel_size, padding=kernel_size // 2)
        self.candidate = nn.Conv2d(in_channels + hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2)

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x.new_zeros(x.shape[0], self.hidden_dim, *x.shape[-2:]),)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor]):
        (h,) = state
        z, r = torch.sigmoid(self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        cand = torch.tanh(self.candidate(torch.cat([x, r * h], dim=1)))
        return ((1 - z) * h + z * cand,)


def run_recurrent(cell: nn.Module, x: torch.Tensor, pad_mask: torch.Tensor | None, reverse: bool = False,
                  return_steps: bool = False):
    """Run `cell` over the dates of x; padded dates keep the previous state (they change nothing).

    x: [B, T, C, H, W], pad_mask: [B, T] bool (True = padded) | None -> final state (tuple of
    [B, hidden, H, W]); with return_steps also the first state tensor after every date [B, T, hidden, H, W]
    (in date order, also when reverse=True).
    """
    state = cell.init_state(x[:, 0])
    order = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    steps = [None] * x.shape[1]
    for t in order:
        new = cell(x[:, t], state)
        if pad_mask is not None:
            keep = pad_mask[:, t, None, None, None]
            new = tuple(torch.where(keep, s_old, s_new) for s_old, s_new in zip(state, new))
        state = new
        steps[t] = state[0]
    if return_steps:
        return state, torch.stack(steps, dim=1)
    return state


class RecurrentSegmenter(nn.Module):
    """A recurrent cell on the raw pixels of every date, then a 3x3 conv classifier on the final state.

    forward(x [B,T,C,H,W], dates [B,T], pad_mask [B,T] | None) -> logits [B,K,H,W]. `readout="cell"`
    classifies the last LSTM cell state (as the reference), "hidden" the last hidden state.
    """

    def __init__(self, cell: nn.Module, in_channels: int, num_classes: int, readout: str, name: str):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.in_channels, self.readout, self.name = in_channels, readout, name
        self.cell = cell
        self.classifier = nn.Conv2d(cell.hidden_dim, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(x, dates, pad_mask, self.in_channels, self.name)
        state = run_recurrent(self.cell, x, pad_mask)
        return self.classifier(state[-1] if self.readout == "cell" else state[0])


@register_model("convlstm")
def convlstm(in_channels: int = 10, num_classes: int = 20, hidden_dim: int = 160, kernel_size: int = 3,
             readout: str = "cell") -> RecurrentSegmenter:
    """ConvLSTM baseline (1,008,660 parameters for 10 channels / 20 classes)."""
    return RecurrentSegmenter(ConvLSTMCell(in_channels, hidden_dim, kernel_size), in_channels, num_classes,
                              readout, "convlstm")


@register_model("convgru")
def convgru(in_channels: int = 10, num_classes: int = 20, hidden_dim: int = 180,
            kernel_size: int = 3) -> RecurrentSegmenter:
    """ConvGRU baseline (956,360 parameters for 10 channels / 20 classes)."""
    return RecurrentSegmenter(ConvGRUCell(in_channels, hidden_dim, kernel_size), in_channels, num_classes,
                              "hidden", "convgru")


class RecurrentUNet(nn.Module):
    """U-TAE's U-Net with a ConvLSTM at the lowest level instead of the L-TAE; skips = mean over valid dates.

    Encoder (in_conv, down_blocks), decoder (up_blocks) and out_conv are U-TAE's layers (utae.py); the
    ConvLSTM's last cell state (both directions concatenated when bidirectional) goes through a 3x3
    conv `out_convlstm` back to encoder_widths[-1] channels. Logits are Conv -> BN without ReLU.

    forward(x [B,T,C,H,W], dates [B,T], pad_mask [B,T] | None) -> logits [B,K,H,W]; H, W divisible by 8.
    """

    def __init__(self, in_channels: int = 10, num_classes: int = 20, hidden_dim: int = 64,
                 bidirectional: bool = False, encoder_widths: tuple[int, ...] = (64, 64, 64, 128),
                 decoder_widths: tuple[int, ...] = (32, 32, 64, 128), out_conv_width: int = 32,
                 encoder_norm: str = "group", padding_mode: str = "reflect", name: str = "uconvlstm"):
        super().__init__()
        self.in_channels, self.bidirectional, self.name = in_channels, bidirectional, name
        ew, dw = list(encoder_widths), list(decoder_widths)
        self.n_stages = len(ew)
        self.in_conv, self.down_blocks, self.up_blocks = unet_blocks(in_channels, ew, dw, encoder_norm, padding_mode)
        self.forward_lstm = ConvLSTMCell(ew[-1], hidden_dim)
        self.backward_lstm = ConvLSTMCell(ew[-1], hidden_dim) if bidirectional else None
        self.out_convlstm = nn.Conv2d(hidden_dim * (2 if bidirectional else 1), ew[-1], 3, padding=1)
        self.out_conv = ConvBlock([dw[0], out_conv_width, num_classes], norm="batch", last_relu=False,
                                  padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(x, dates, pad_mask, self.in_channels, self.name)
        factor = 2 ** (self.n_stages - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"{self.name}: H and W must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        frames = self.in_conv(gather_frames(x, pad_mask))
        levels = [frames]
        for down in self.down_blocks:
            frames = down(frames)
            levels.append(frames)
        feature_maps = [scatter_frames(level, pad_mask, x.shape[:2]) for level in levels]
        memory = [run_recurrent(self.forward_lstm, feature_maps[-1], pad_mask)[1]]
        if self.backward_lstm is not None:
            memory.append(run_recurrent(self.backward_lstm, feature_maps[-1], pad_mask, reverse=True)[1])
        out = self.out_convlstm(torch.cat(memory, dim=1))
        for i, up in enumerate(self.up_blocks):
            out = up(out, aggregate_skip(feature_maps[-(i + 2)], None, pad_mask, "mean"))
        return self.out_conv(out)


@register_model("uconvlstm")
def uconvlstm(in_channels: int = 10, num_classes: int = 20, hidden_dim: int = 64, encoder_norm: str = "group",
              padding_mode: str = "reflect") -> RecurrentUNet:
    """U-ConvLSTM baseline (1,520,540 parameters for 10 channels / 20 classes)."""
    return RecurrentUNet(in_channels, num_classes, hidden_dim, bidirectional=False, encoder_norm=encoder_norm,
                         padding_mode=padding_mode, name="uconvlstm")


@register_model("ubiconvlstm")
def ubiconvlstm(in_channels: int = 10, num_classes: int = 20, hidden_dim: int = 30, bidirectional: bool = True,
                encoder_norm: str = "group", padding_mode: str = "reflect") -> RecurrentUNet:
    """U-BiConvLSTM baseline: 1,414,828 parameters (bidirectional), 1,209,508 with bidirectional=False."""
    return RecurrentUNet(in_channels, num_classes, hidden_dim, bidirectional=bidirectional,
                         encoder_norm=encoder_norm, padding_mode=padding_mode, name="ubiconvlstm")
