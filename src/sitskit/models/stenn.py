"""STENN: dilated-convolution spatial encoder + per-pixel Transformer (docs/models.md, "Model zoo").

Per date (valid dates only), at full resolution: 4 densely connected blocks, each three 3x3 convolutions
(dilations [1,2,3], [2,4,6], [4,8,12], [8,16,24]; widths 16, 32, 32, 64; GroupNorm 4, ReLU, reflect
padding); block i sees the input and all previous blocks' outputs, and the encoder output concatenates
the 4 blocks (144 channels). Per pixel: + sinusoidal encoding of the calendar day of year -> Transformer
encoder (1 post-LN layer, 8 heads, FFN 256, padded dates masked) -> mean over the valid dates. Head:
Conv(144 -> 64)+BN+ReLU, Conv(64 -> K)+BN (plain logits, no ReLU). 446,908 parameters (10 ch / 20 cl).

The pixels go through the Transformer in chunks of `pixel_chunk` sequences, so a 128x128 patch needs a
few GB in inference. `grad_checkpointing=True` recomputes, in backward, the spatial encoder (in groups of
FRAME_CHUNK frames) and each Transformer chunk: the training memory of the full-resolution activations
is then a few GB too, at the cost of a second forward.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from sitskit.models.layers import SinusoidalPositionalEncoding, apply_to_valid_frames, check_inputs
from sitskit.models.registry import register_model
from sitskit.models.utae import ConvLayer

PASTIS_REFERENCE_DOY = 244  # 2018-09-01, the PASTIS reference date (docs/datasets.md)
FRAME_CHUNK = 4  # frames per checkpointed spatial-encoder call
DILATIONS = ((1, 2, 3), (2, 4, 6), (4, 8, 12), (8, 16, 24))


def calendar_doy(dates: torch.Tensor, reference_doy: int) -> torch.Tensor:
    """Day of year (1..365) of day offsets `dates` counted from a reference date with day of year
    `reference_doy` (PASTIS: 244 = 1 September; MTLCC: 1 = 1 January). Leap days are ignored."""
    return torch.remainder(dates.long() + (reference_doy - 1), 365) + 1


class DilatedBlock(nn.Module):
    """Three 3x3 convs with the given dilations (Conv -> GroupNorm(4) -> ReLU each). [N,C,H,W] -> [N,w,H,W]"""

    def __init__(self, c_in: int, width: int, dilations: tuple[int, ...], padding_mode: str = "reflect"):
        super().__init__()
        self.convs = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(c_in if i == 0 else width, width, 3, padding=d, dilation=d,
                                    padding_mode=padding_mode), nn.GroupNorm(4, width), nn.ReLU())
            for i, d in enumerate(dilations)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class DenseDilatedEncoder(nn.Module):
    """Densely connected dilated blocks. x: [N, C, H, W] -> [N, sum(widths), H, W]"""

    def __init__(self, in_channels: int, widths: tuple[int, ...], dilations: tuple[tuple[int, ...], ...],
                 padding_mode: str = "reflect"):
        super().__init__()
        if len(widths) != len(dilations):
            raise ValueError(f"widths {widths} and dilations {dilations} must have the same length")
        c_in = [in_channels + sum(widths[:i]) for i in range(len(widths))]
        self.blocks = nn.ModuleList(DilatedBlock(c, w, d, padding_mode) for c, w, d in zip(c_in, widths, dilations))
        self.out_channels = sum(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [x]
        for block in self.blocks:
            maps.append(block(torch.cat(maps, dim=1)))
        return torch.cat(maps[1:], dim=1)


@register_model("stenn")
class STENN(nn.Module):
    """forward(x [B,T,C,H,W], dates [B,T] day offsets, pad_mask [B,T] | None, doy [B,T] | None) -> [B,K,H,W]

    Positions are the calendar day of year: `doy` if given, else `calendar_doy(dates, reference_doy)`.
    """

    def __init__(self, in_channels: int = 10, num_classes: int = 20, widths: tuple[int, ...] = (16, 32, 32, 64),
                 dilations: tuple[tuple[int, ...], ...] = DILATIONS, n_head: int = 8, dim_feedforward: int = 256,
                 n_layers: int = 1, dropout: float = 0.1, head_width: int = 64, pe_period: float = 10000.0,
                 reference_doy: int = PASTIS_REFERENCE_DOY, pixel_chunk: int = 4096,
                 grad_checkpointing: bool = False, padding_mode: str = "reflect"):
        super().__init__()
        if pixel_chunk < 1:
            raise ValueError(f"pixel_chunk must be >= 1, got {pixel_chunk}")
        self.in_channels, self.reference_doy = in_channels, reference_doy
        self.pixel_chunk, self.grad_checkpointing = pixel_chunk, grad_checkpointing
        self.spatial_encoder = DenseDilatedEncoder(in_channels, tuple(widths), tuple(map(tuple, dilations)),
                                                   padding_mode)
        d_model = self.spatial_encoder.out_channels
        self.position_encoding = SinusoidalPositionalEncoding(d_model, pe_period)
        self.pe_dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, n_head, dim_feedforward, dropout, batch_first=True)
        self.temporal_encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out_conv = ConvLayer([d_model, head_width, num_classes], norm="batch", last_relu=False,
                                  padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None,
                doy: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(x, dates, pad_mask, self.in_channels, "stenn")
        b, _, _, h, w = x.shape
        feats = apply_to_valid_frames(self._encode_frames, x, pad_mask)  # [B, T, D, H, W], pads 0
        positions = calendar_doy(dates, self.reference_doy) if doy is None else doy
        feats = feats + self.position_encoding(positions)[:, :, :, None, None]
        tokens = self.pe_dropout(rearrange(feats, "b t d h w -> (b h w) t d"))
        seq_pad = None if pad_mask is None else pad_mask.repeat_interleave(h * w, dim=0)
        pooled = torch.cat([self._encode_chunk(tokens[i:i + self.pixel_chunk],
                                               None if seq_pad is None else seq_pad[i:i + self.pixel_chunk])
                            for i in range(0, tokens.shape[0], self.pixel_chunk)])
        return self.out_conv(rearrange(pooled, "(b h w) d -> b d h w", b=b, h=h, w=w))

    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N, C, H, W] -> [N, D, H, W]; with grad_checkpointing in groups of FRAME_CHUNK frames, each
        recomputed in backward (the full-resolution dense blocks dominate training memory otherwise)."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.spatial_encoder(frames)
        return torch.cat([checkpoint(self.spatial_encoder, group, use_reentrant=False)
                          for group in frames.split(FRAME_CHUNK)])

    def _encode_chunk(self, tokens: torch.Tensor, seq_pad: torch.Tensor | None) -> torch.Tensor:
        """tokens [n, T, D], seq_pad [n, T] | None -> mean over valid dates of the Transformer output [n, D]"""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._mean_encoding, tokens, seq_pad, use_reentrant=False)
        return self._mean_encoding(tokens, seq_pad)

    def _mean_encoding(self, tokens: torch.Tensor, seq_pad: torch.Tensor | None) -> torch.Tensor:
        out = self.temporal_encoder(tokens, src_key_padding_mask=seq_pad)
        if seq_pad is None:
            return out.mean(dim=1)
        valid = (~seq_pad).to(out.dtype)
        return torch.einsum("ntd,nt->nd", out, valid) / valid.sum(dim=1, keepdim=True)
