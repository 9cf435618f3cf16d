"""A benchmark-only transcription of the STCLN reference model (authors' `STCLN.py`: encoder, masked
pre-training `UTAEPrediction` and the STA classifier `UTAEClassification`), the baseline that
`bench_vs_reference.py` times sitskit against. Never imported by the package.

Written from the description in docs/models.md ("STCLN"): per-frame DoubleConv CNN on all B*T frames
(padded ones included), tokens [(B H W), T, 256] through GroupNorm on a permuted [N, 256, T] view,
sinusoidal positions of the date index, three post-LN layers built from `nn.MultiheadAttention`
(sequence-first layout, attention weights returned, no mask), F.dropout mask with vegetation gating,
and the STA head with the full N x N attention. State-dict keys follow sitskit's names
(`inc`, `down1`, `temporal_encoder.in_norm`, `temporal_encoder.layer_stack.{i}`), so weights are copied
with `load_state_dict`; the STA head's 1x1 convolutions get sitskit's Linear weights reshaped.
With positions="index" and no padding it equals sitskit's `stcln_pretrain` / `stcln` (checked by the
harness in eval mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class TransformerLayer(nn.Module):
    """Post-LN layer: MHA (weights returned) -> dropout -> +res -> LN; FFN -> dropout -> +res -> LN.
    src: [T, N, D] (sequence first)."""

    def __init__(self, d_model=256, nhead=8, dim_feedforward=1024, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src):
        src2, attn = self.self_attn(src, src, src)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2)), attn


class PositionalEncoder(nn.Module):
    def __init__(self, d=32, T=1000, repeat=8):
        super().__init__()
        self.repeat = repeat
        self.denom = torch.pow(T, 2 * (torch.arange(d).float() // 2) / d)

    def forward(self, batch_positions):
        table = batch_positions[:, :, None].float() / self.denom[None, None, :].to(batch_positions.device)
        table[:, :, 0::2] = torch.sin(table[:, :, 0::2])
        table[:, :, 1::2] = torch.cos(table[:, :, 1::2])
        return torch.cat([table for _ in range(self.repeat)], dim=-1)


class TemporalEncoder(nn.Module):
    def __init__(self, d_model=256, n_layers=3, d_ffn=1024, dropout=0.1):
        super().__init__()
        self.in_norm = nn.GroupNorm(num_groups=8, num_channels=d_model)
        self.positional_encoder = PositionalEncoder(32, 1000, d_model // 32)  # 32 dims tiled 8x at d = 256
        self.layer_stack = nn.ModuleList(TransformerLayer(d_model, 8, d_ffn, dropout) for _ in range(n_layers))

    def forward(self, x):
        """x: [B, T, D, H, W] -> F [B, H, W, T, D]"""
        b, t, d, h, w = x.shape
        out = x.permute(0, 3, 4, 1, 2).contiguous().view(b * h * w, t, d)
        out = self.in_norm(out.permute(0, 2, 1)).permute(0, 2, 1)
        positions = torch.tensor(range(t), device=x.device)[None].repeat(b * h * w, 1)
        out = out + self.positional_encoder(positions)
        out = out.permute(1, 0, 2)
        for layer in self.layer_stack:
            out, _ = layer(out)
        return out.permute(1, 0, 2).reshape(b, h, w, t, d)


class ReferenceSTCLNEncoder(nn.Module):
    def __init__(self, in_channels=10, widths=(32, 256), n_layers=3, d_ffn=1024, dropout=0.1):
        super().__init__()
        self.inc = DoubleConv(in_channels, widths[0])
        self.down1 = DoubleConv(widths[0], widths[1])
        self.temporal_encoder = TemporalEncoder(widths[1], n_layers, d_ffn, dropout)

    def forward(self, x):
        """x [B,T,C,H,W] -> (F [B,H,W,T,D], x2 [B*T,D,H,W])"""
        b, t, c, h, w = x.shape
        x2 = self.down1(self.inc(x.view(b * t, c, h, w)))
        return self.temporal_encoder(x2.view(b, t, -1, h, w)), x2


class ReferenceSTCLNPretrain(nn.Module):
    def __init__(self, in_channels=10, **encoder_kwargs):
        super().__init__()
        self.encoder = ReferenceSTCLNEncoder(in_channels, **encoder_kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1))
        self.decoder = nn.Linear(self.encoder.down1.double_conv[0].out_channels, in_channels)

    @staticmethod
    def draw_mask(x, ratio=0.4, red=2, nir=6):
        """m [B,T,H,W] float, 0 = masked: F.dropout of ones, then vegetation gating on the input."""
        m = F.dropout(torch.ones(x.shape[0], x.shape[1], x.shape[3], x.shape[4], device=x.device), ratio) * (1 - ratio)
        v = (x[:, :, nir] - x[:, :, red]) / (x[:, :, red] + x[:, :, nir] + 1e-20)
        cluster = (v > 0.2).float().mean(dim=(-2, -1))  # [B, T]
        m[cluster <= 0.9] = 1.0
        return m

    def forward(self, x, m):
        """x [B,T,C,H,W], m [B,T,H,W] float (0 = masked) -> pred [B,T,C,H,W]"""
        mm = m[:, :, None]
        x = x * mm + self.mask_token * (1 - mm)
        feats, _ = self.encoder(x)  # [B, H, W, T, D]
        return self.decoder(feats).permute(0, 3, 4, 1, 2)

    @staticmethod
    def loss(pred, target, m):
        w = (1 - m)[:, :, None].expand_as(pred)
        return ((pred - target) ** 2 * w).sum() / (w.sum() + 1e-20)


class ReferenceSTCLNClassifier(nn.Module):
    def __init__(self, in_channels=10, num_classes=20, **encoder_kwargs):
        super().__init__()
        self.encoder = ReferenceSTCLNEncoder(in_channels, **encoder_kwargs)
        d = self.encoder.down1.double_conv[0].out_channels
        self.conv1 = nn.Conv2d(d, d, 1, bias=False)
        self.conv2 = nn.Conv2d(d, d, 1, bias=False)
        self.conv3 = nn.Conv2d(d, d, 1, bias=False)
        self.l = nn.Parameter(torch.zeros(1))
        self.outlinear = nn.Linear(d, num_classes)
        self.d = d

    def forward(self, x):
        b, t, _, h, w = x.shape
        feats, x2 = self.encoder(x)  # [B,H,W,T,D], [B*T,D,H,W]
        n, d = h * w, self.d
        f = feats.permute(0, 3, 4, 1, 2).reshape(b * t, d, h, w)
        q = self.conv1(f).view(b, t, d, n).permute(0, 3, 1, 2).reshape(b, n, t * d)
        k = self.conv2(x2).view(b, t, d, n).permute(0, 1, 2, 3).reshape(b, t * d, n)
        attn = torch.softmax(torch.bmm(q, k) / d ** 0.5, dim=-1)  # [B, N, N]
        m = feats.max(dim=3)[0].permute(0, 3, 1, 2)  # [B, D, H, W]
        v = self.conv3(m).view(b, d, n).permute(0, 2, 1)  # [B, N, D]
        o = self.l * torch.bmm(attn, v) + v
        return self.outlinear(o).permute(0, 2, 1).reshape(b, -1, h, w)


def copy_weights(ours: nn.Module, ref: nn.Module) -> None:
    """sitskit `stcln_pretrain` / `stcln` weights -> the reference module (strict)."""
    state = dict(ours.state_dict())
    if "head.query.weight" in state:
        for src, dst in (("query", "conv1"), ("key", "conv2"), ("value", "conv3")):
            state[dst + ".weight"] = state.pop(f"head.{src}.weight")[:, :, None, None]
        state["l"] = state.pop("head.gate")
        state["outlinear.weight"] = state.pop("head.classifier.weight")
        state["outlinear.bias"] = state.pop("head.classifier.bias")
    ref.load_state_dict(state, strict=True)
