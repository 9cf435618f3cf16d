"""L-TAE: Lightweight Temporal Attention Encoder (Garnot & Landrieu, 2020), 2-D version used by U-TAE.

Per pixel: GroupNorm -> Conv1d(C -> d_model) -> + sinusoidal day positions -> one learned master
query per head attends over the dates (keys = Linear(d_model -> heads*d_k), values = the d_model input
split into heads) -> concat heads -> MLP (Linear+BN+ReLU) -> dropout -> GroupNorm.

Parameter names match utae-paps (`in_norm`, `inconv`, `attention_heads.Q`, `attention_heads.fc1_k`,
`mlp`, `out_norm`), so official weights load strictly.

mode="reference" keeps the utae-paps numerics: in_norm statistics include the padded steps, padded
scores are filled with -1e3, and the attention returned for the skip connections is the one after
dropout. mode="clean" (default) normalises over valid steps only, masks with -inf and returns the
attention before dropout (dropout still regularises the L-TAE output itself).
"""
from __future__ import annotations

import math
from itertools import pairwise

import torch
from einops import rearrange
from torch import nn

from sitskit.models.layers import SequenceGroupNorm, SinusoidalPositionalEncoding, check_inputs
from sitskit.models.registry import register_model

MODES = ("clean", "reference")


class MasterQueryAttention(nn.Module):
    """Multi-head attention with one learned query per head and no value projection.

    x: [N, T, D], pad_mask: [N, T] | None -> (out [N, D] heads concatenated head-major,
    attn [N, heads, T] before dropout, attn_dropped [N, heads, T] as used for `out`)
    """

    def __init__(self, n_head: int, d_k: int, d_in: int, attn_dropout: float = 0.1):
        super().__init__()
        if d_in % n_head:
            raise ValueError(f"d_model={d_in} must be divisible by n_head={n_head}")
        self.n_head, self.d_k = n_head, d_k
        self.Q = nn.Parameter(torch.zeros(n_head, d_k))
        self.fc1_k = nn.Linear(d_in, n_head * d_k)
        self.dropout = nn.Dropout(attn_dropout)
        # the L-TAE's own initialisation (kept in both modes)
        nn.init.normal_(self.Q, mean=0.0, std=math.sqrt(2.0 / d_k))
        nn.init.normal_(self.fc1_k.weight, mean=0.0, std=math.sqrt(2.0 / d_k))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None,
                mask_value: float = float("-inf")) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = rearrange(self.fc1_k(x), "n t (g k) -> n g t k", g=self.n_head)
        scores = torch.einsum("ngtk,gk->ngt", keys, self.Q) / math.sqrt(self.d_k)
        if pad_mask is not None:
            scores = scores.masked_fill(pad_mask[:, None, :], mask_value)
        attn = torch.softmax(scores, dim=-1)
        attn_dropped = self.dropout(attn)
        values = rearrange(x, "n t (g v) -> n g t v", g=self.n_head)
        out = torch.einsum("ngt,ngtv->ngv", attn_dropped, values).flatten(1)
        return out, attn, attn_dropped


@register_model("ltae")
class LTAE(nn.Module):
    """L-TAE over image time series.

    forward(x [B,T,C,H,W], dates [B,T] day offsets, pad_mask [B,T] bool | None, return_attention=False)
      -> out [B, mlp[-1], H, W]  (and attention [n_head, B, T, H, W] if return_attention)
    """

    def __init__(self, in_channels: int = 128, n_head: int = 16, d_k: int = 4, d_model: int = 256,
                 mlp: tuple[int, ...] = (256, 128), dropout: float = 0.2, attn_dropout: float = 0.1,
                 pe_period: float = 1000.0, mode: str = "clean"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mlp[0] != d_model:
            raise ValueError(f"mlp[0]={mlp[0]} must equal d_model={d_model}")
        self.in_channels, self.mode, self.n_head = in_channels, mode, n_head
        self.in_norm = SequenceGroupNorm(n_head, in_channels)
        self.inconv = nn.Conv1d(in_channels, d_model, 1)
        self.position_encoding = SinusoidalPositionalEncoding(d_model // n_head, pe_period, repeat=n_head)
        self.attention_heads = MasterQueryAttention(n_head, d_k, d_model, attn_dropout)
        layers: list[nn.Module] = []
        for d_in, d_out in pairwise(mlp):
            layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.GroupNorm(n_head, mlp[-1])

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None,
                return_attention: bool = False):
        check_inputs(x, dates, pad_mask, self.in_channels, "ltae")
        b, _, _, h, w = x.shape
        tokens = rearrange(x, "b t c h w -> (b h w) t c")
        seq_pad = None if pad_mask is None else pad_mask.repeat_interleave(h * w, dim=0)  # [(b h w), T]
        reference = self.mode == "reference"

        tokens = self.in_norm(tokens, None if reference else seq_pad)
        tokens = self.inconv(tokens.transpose(1, 2)).transpose(1, 2)
        tokens = (tokens.unflatten(0, (b, h * w)) + self.position_encoding(dates)[:, None]).flatten(0, 1)
        out, attn, attn_dropped = self.attention_heads(tokens, seq_pad, -1e3 if reference else float("-inf"))
        out = self.out_norm(self.dropout(self.mlp(out)))
        out = rearrange(out, "(b h w) c -> b c h w", b=b, h=h, w=w)
        if not return_attention:
            return out
        attn = attn_dropped if reference else attn
        return out, rearrange(attn, "(b h w) g t -> g b t h w", b=b, h=h, w=w)
