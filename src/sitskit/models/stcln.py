"""STCLN (Qin et al., JAG 2025): per-date CNN + per-pixel Transformer, masked pre-training, STA head.

Three registered models share one encoder:
- "stcln_encoder" -> STCLNEncoder: x [B,T,C,H,W] -> (feats [B,T,D,H,W], cnn_feats [B,T,D,H,W]), D = 256
- "stcln_pretrain" -> STCLNPretrain: masked reconstruction, pred [B,T,C,H,W]
- "stcln"          -> STCLNClassifier: encoder + STA head, logits [B,K,H,W]

Module names follow the released checkpoints (`inc`, `down1`, `temporal_encoder.in_norm`,
`temporal_encoder.layer_stack.{i}`), see `sitskit.models.checkpoints`. Deliberate differences from
the reference code are listed in docs/models.md (day-offset positions by default, any H x W,
padding-aware normalisation/attention, no dead modules, device-agnostic buffers).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from sitskit.models.cpu_matmul import linear
from sitskit.models.encoder_layer import EncoderLayer
from sitskit.models.layers import (
    SequenceGroupNorm,
    SinusoidalPositionalEncoding,
    apply_to_valid_frames,
    check_inputs,
)
from sitskit.models.registry import build, register_model
from sitskit.models.sta_head import STAHead

POSITION_MODES = ("dates", "index")


class DoubleConv(nn.Module):
    """(Conv3x3 zero-pad, no bias -> BatchNorm -> ReLU) x 2, no downsampling. [N,C,H,W] -> [N,C_out,H,W].

    State-dict keys `double_conv.{0,1,3,4}.*` as in the reference (a UNet-style DoubleConv).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class PixelTransformer(nn.Module):
    """Per-pixel temporal Transformer: GroupNorm `in_norm` -> + sinusoidal positions -> post-LN layers.

    Layers are `EncoderLayer`s, i.e. `nn.TransformerEncoderLayer` (ReLU, post-norm) with a leaner forward:
    the reference's custom layer has the same computation and the same parameter names. Padded dates are
    excluded from the normalisation statistics and never enter the layers: the samples of a batch are
    grouped by number of valid dates and each group runs on its valid dates only, without a mask (same
    result as masking the padded keys; no work on padding). Padded outputs are 0.

    tokens: [B, N, T, D] (N pixels), positions: [B, T], pad_mask: [B, T] | None -> [B, N, T, D]
    keep: [B, N, T] bool | None -> only the kept tokens' outputs, [M, D] in row-major order of `keep`: the
    last layer then runs its queries, FFN and norms on those rows only (pre-training needs the masked
    pixel-dates only). Kept tokens on padded dates are 0, as in the full output.
    """

    def __init__(self, d_model: int = 256, n_head: int = 8, d_ffn: int = 1024, n_layers: int = 3,
                 dropout: float = 0.1, norm_groups: int = 8, pe_dim: int = 32, pe_period: float = 1000.0,
                 grad_checkpointing: bool = False, inference_chunk_tokens: int = 4096):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.inference_chunk_tokens = inference_chunk_tokens
        if d_model % pe_dim:
            raise ValueError(f"d_model={d_model} must be a multiple of pe_dim={pe_dim}")
        self.in_norm = SequenceGroupNorm(norm_groups, d_model)
        self.position_encoding = SinusoidalPositionalEncoding(pe_dim, pe_period, repeat=d_model // pe_dim)
        self.layer_stack = nn.ModuleList(
            EncoderLayer(d_model, n_head, d_ffn, dropout) for _ in range(n_layers)
        )

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, pad_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, t, d = tokens.shape
        if pad_mask is not None and not bool(pad_mask.any()):
            pad_mask = None
        seq_pad = None if pad_mask is None else pad_mask[:, None, :].expand(b, n, t).reshape(b * n, t)
        x = self.in_norm(tokens.reshape(b * n, t, d), seq_pad)
        x = x.view(b, n, t, d) + self.position_encoding(positions)[:, None]
        if pad_mask is None:
            if keep is not None:
                return self.run_layers(x.view(b * n, t, d), keep.reshape(b * n, t))
            return self.run_layers(x.view(b * n, t, d)).view(b, n, t, d)
        # Valid dates only: the samples with the same number of valid dates go through the layers together,
        # without a mask (a masked key has zero weight, so the valid outputs are the same); padded dates = 0.
        valid = ~pad_mask
        lengths = valid.sum(dim=1)
        if keep is None:
            out = x.new_zeros(b, t, n, d)
        else:  # row of each kept token in the [M, D] output, by its flat [B, N, T] index
            out = x.new_zeros(int(keep.sum()), d)
            rank = keep.flatten().cumsum(0) - 1
        for length in torch.unique(lengths).tolist():
            rows = torch.nonzero(lengths == length).squeeze(1)  # samples with `length` valid dates
            cols = torch.nonzero(valid[rows])[:, 1].view(-1, length)  # their valid date indices, ascending
            ii = rows[:, None]
            group = x[ii, :, cols].transpose(1, 2).reshape(-1, length, d)  # [c*N, length, D]
            if keep is None:
                y = self.run_layers(group)  # [c*N, length, D]
                out.index_put_((ii, cols), y.view(-1, n, length, d).transpose(1, 2))
                continue
            flat = (rows[:, None, None] * n + torch.arange(n, device=x.device)[:, None]) * t + cols[:, None, :]
            group_keep = keep.flatten()[flat].view(-1, length)  # [c*N, length]
            out[rank[flat.view(-1, length)[group_keep]]] = self.run_layers(group, group_keep)
        return out if keep is not None else out.transpose(1, 2)

    def run_layers(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The Transformer layers on unpadded sequences [S, T, D] -> [S, T, D]; with keep [S, T] bool, the
        last layer computes the kept tokens only -> [M, D].

        Without autograd, the sequences go through all layers `inference_chunk_tokens` tokens at a time
        (exact: each pixel's sequence is independent). The intermediates are then a few MiB that the
        allocator reuses, instead of [S*T, 1024] buffers that each cost fresh, page-faulted memory
        (docs/models.md, "Performance")."""
        s, t, _ = x.shape
        rows = max(1, self.inference_chunk_tokens // t)
        if keep is None and not torch.is_grad_enabled() and self.inference_chunk_tokens > 0 and s > rows:
            out = torch.empty_like(x)
            for start in range(0, s, rows):
                out[start:start + rows] = self._run_layers(x[start:start + rows])
            return out
        return self._run_layers(x, keep)

    def _run_layers(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        last = len(self.layer_stack) - 1
        for i, layer in enumerate(self.layer_stack):
            query_mask = keep if i == last else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                # recompute the layer in backward (same dropout masks: the RNG state is replayed)
                x = checkpoint(layer, x, None, query_mask, use_reentrant=False)
            else:
                x = layer(x, None, query_mask)
        return x


@register_model("stcln_encoder")
class STCLNEncoder(nn.Module):
    """STCLN encoder: shared per-date CNN (C->32->32, 32->256->256) then a per-pixel Transformer.

    forward(x [B,T,C,H,W], dates [B,T] int64 day offsets, pad_mask [B,T] bool (True = padded) | None)
      -> (feats [B,T,D,H,W] Transformer output, cnn_feats [B,T,D,H,W] CNN features); padded dates are 0.
    positions="dates" encodes the day offsets (default); "index" encodes 0..T-1 like the paper's code.
    grad_checkpointing=True recomputes each Transformer layer in backward: same results, far less
    activation memory (the FFN activations of every pixel-date dominate training memory).
    """

    def __init__(self, in_channels: int = 10, positions: str = "dates", widths: tuple[int, int] = (32, 256),
                 n_head: int = 8, d_ffn: int = 1024, n_layers: int = 3, dropout: float = 0.1,
                 norm_groups: int = 8, pe_dim: int = 32, pe_period: float = 1000.0, grad_checkpointing: bool = False,
                 inference_chunk_tokens: int = 4096):
        super().__init__()
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        self.in_channels, self.positions = in_channels, positions
        self.d_model = widths[1]
        self.inc = DoubleConv(in_channels, widths[0])
        self.down1 = DoubleConv(widths[0], widths[1])
        self.temporal_encoder = PixelTransformer(widths[1], n_head, d_ffn, n_layers, dropout, norm_groups,
                                                 pe_dim, pe_period, grad_checkpointing, inference_chunk_tokens)

    def forward(self, x: torch.Tensor, dates: torch.Tensor,
                pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.shape[-2]
        tokens, cnn_feats = self.forward_tokens(x, dates, pad_mask)
        feats = rearrange(tokens, "b (h w) t d -> b t d h w", h=h)
        return feats, cnn_feats

    def forward_tokens(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None,
                       keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` in the per-pixel layout, without the transposes back to images:
        -> (tokens [B, H*W, T, D] Transformer output, cnn_feats [B,T,D,H,W]); padded dates are 0.
        keep [B, H*W, T] bool: only those tokens, [M, D] (see PixelTransformer)."""
        check_inputs(x, dates, pad_mask, self.in_channels, "stcln_encoder")
        cnn_feats = self.embed_frames(x, pad_mask)
        tokens = rearrange(cnn_feats, "b t d h w -> b (h w) t d")
        # PixelTransformer returns exact zeros at padded dates (they never enter the layers)
        return self.temporal_encoder(tokens, self.encode_positions(dates), pad_mask, keep), cnn_feats

    def embed_frames(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """Per-date CNN on the valid frames only. [B,T,C,H,W] -> [B,T,D,H,W] (memory [B,T,H,W,D]).

        The CNN runs channels-last: oneDNN's convolutions are faster so (fp32 and bf16), and the per-pixel
        tokens [B, H*W, T, D] are then gathered from D-contiguous runs instead of a full transpose
        (docs/models.md, "Performance")."""
        def cnn(frames: torch.Tensor) -> torch.Tensor:
            return self.down1(self.inc(frames.contiguous(memory_format=torch.channels_last)))
        return apply_to_valid_frames(cnn, x, pad_mask)

    def encode_positions(self, dates: torch.Tensor) -> torch.Tensor:
        """[B,T] day offsets -> [B,T] positions fed to the sinusoidal encoding."""
        if self.positions == "index":
            return torch.arange(dates.shape[1], device=dates.device).expand_as(dates)
        return dates


def _build_encoder(in_channels: int, positions: str, dropout: float, encoder_kwargs: dict | None) -> nn.Module:
    return build("stcln_encoder", in_channels=in_channels, positions=positions, dropout=dropout,
                 **(encoder_kwargs or {}))


@register_model("stcln_pretrain")
class STCLNPretrain(nn.Module):
    """Masked spatio-temporal reconstruction: masked pixel-dates -> mask token -> encoder -> Linear(D->C).

    forward(x [B,T,C,H,W], dates [B,T], pad_mask [B,T] | None, mask [B,T,H,W] bool (True = masked) | None)
      -> pred [B,T,C,H,W]. The loss (on masked entries) lives in the pre-training stage.
    The reference's `midlinear` (a second head on the CNN features whose loss is commented out) is
    left out: it never receives a gradient.
    """

    def __init__(self, in_channels: int = 10, positions: str = "dates", dropout: float = 0.1,
                 encoder_kwargs: dict | None = None):
        super().__init__()
        self.encoder = _build_encoder(in_channels, positions, dropout, encoder_kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1))
        self.decoder = nn.Linear(self.encoder.d_model, in_channels)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, masked_only: bool = False) -> torch.Tensor:
        """masked_only=True -> pred [M, C] of the masked pixel-dates only, in the order of
        `masked_entries` (the loss needs nothing else: the last Transformer layer and the decoder then
        run on those M tokens, the same values as the full output's)."""
        if mask is not None:
            x = self.apply_mask(x, mask)
        keep = None
        if masked_only:
            if mask is None:
                raise ValueError("stcln_pretrain: masked_only=True needs a mask")
            keep = rearrange(mask, "b t h w -> b (h w) t")
        tokens, _ = self.encoder.forward_tokens(x, dates, pad_mask, keep)
        pred = linear(tokens, self.decoder.weight, self.decoder.bias)  # [B, H*W, T, C] (or [M, C]): the D-wide features are never transposed
        return pred if masked_only else rearrange(pred, "b (h w) t c -> b t c h w", h=x.shape[-2])

    @staticmethod
    def masked_entries(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B,T,C,H,W], mask [B,T,H,W] -> x at the masked pixel-dates [M, C], in masked_only's order."""
        return rearrange(x, "b t c h w -> b (h w) t c")[rearrange(mask, "b t h w -> b (h w) t")]

    def apply_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace every channel of the masked pixel-dates by the learnable scalar token."""
        if mask.shape != (x.shape[0], x.shape[1], *x.shape[3:]) or mask.dtype != torch.bool:
            raise ValueError(f"stcln_pretrain: mask must be bool [B,T,H,W], got {mask.dtype} {tuple(mask.shape)} "
                             f"for x {tuple(x.shape)}")
        return torch.where(mask[:, :, None], self.mask_token.to(x.dtype), x)


@register_model("stcln")
class STCLNClassifier(nn.Module):
    """STCLN semantic segmentation: encoder + STA head. forward(x, dates, pad_mask) -> logits [B,K,H,W]."""

    def __init__(self, in_channels: int = 10, num_classes: int = 20, positions: str = "dates",
                 dropout: float = 0.1, attn_chunk_size: int = 1024, encoder_kwargs: dict | None = None):
        super().__init__()
        self.encoder = _build_encoder(in_channels, positions, dropout, encoder_kwargs)
        self.head = STAHead(self.encoder.d_model, num_classes, attn_chunk_size)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, cnn_feats = self.encoder.forward_tokens(x, dates, pad_mask)
        return self.head.forward_tokens(tokens, rearrange(cnn_feats, "b t d h w -> b (h w) t d"), pad_mask,
                                        x.shape[-2])
