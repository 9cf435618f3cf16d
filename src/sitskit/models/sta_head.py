"""STA: the spatio-temporal attention classification head of STCLN (Qin et al., 2025).

Pixel-to-pixel attention whose descriptors are whole time series: the query of a pixel concatenates
its T transformer features (after a 1x1 projection), the key concatenates its T pre-transformer CNN
features; softmax(Q K^T / sqrt(D)) over pixels mixes values taken from the temporal max of the
transformer features, gated by a scalar initialised to 0 (DANet position-attention style):

    O = gate * softmax(Q K^T / sqrt(D)) V + V,   logits = Linear(O)   (per pixel)

The N x N attention (N = H*W, 16,384 for a PASTIS patch) is never materialised: queries are processed
in chunks of `chunk_size` rows, and under autograd each chunk is checkpointed so that the backward
pass does not keep every chunk's attention either. Memory is O(chunk_size * N) instead of O(N^2).

Reference names: query/key/value = conv1/conv2/conv3 (1x1 conv, no bias), gate = l, classifier = outlinear.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from sitskit.models.cpu_matmul import linear


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain attention. q: [B, Nq, E], k: [B, N, E], v: [B, N, D] -> [B, Nq, D] (materialises Nq x N).
    Per sample through `cpu_matmul.linear` (q k^T is a linear with k as the weight)."""
    return torch.stack([linear(torch.softmax(linear(qi, ki) * scale, dim=-1), vi.t())
                        for qi, ki, vi in zip(q, k, v)])


def chunked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                              chunk_size: int = 1024) -> torch.Tensor:
    """`softmax_attention` computed `chunk_size` query rows at a time (exact, row-wise softmax).

    q: [B, N, E], k: [B, N, E], v: [B, N, D] -> [B, N, D]. Peak extra memory ~ B * chunk_size * N floats.
    """
    n = q.shape[1]
    if n <= chunk_size:
        return softmax_attention(q, k, v, scale)
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outputs = []
    for start in range(0, n, chunk_size):
        q_chunk = q[:, start:start + chunk_size]
        if recompute:
            outputs.append(checkpoint(softmax_attention, q_chunk, k, v, scale, use_reentrant=False))
        else:
            outputs.append(softmax_attention(q_chunk, k, v, scale))
    return torch.cat(outputs, dim=1)


class STAHead(nn.Module):
    """Spatio-temporal attention head.

    forward(feats [B, T, D, H, W] transformer output, cnn_feats [B, T, D, H, W] pre-transformer CNN
    features, pad_mask [B, T] bool (True = padded) | None) -> logits [B, K, H, W].
    Padded dates contribute nothing: their keys are zeroed (so they add 0 to Q.K) and they are
    excluded from the temporal max.
    """

    def __init__(self, d_model: int = 256, num_classes: int = 20, chunk_size: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.chunk_size = chunk_size
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, feats: torch.Tensor, cnn_feats: torch.Tensor,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = feats.shape[-2]
        feats = rearrange(feats, "b t d h w -> b (h w) t d")
        cnn_feats = rearrange(cnn_feats, "b t d h w -> b (h w) t d")
        return self.forward_tokens(feats, cnn_feats, pad_mask, h)

    def forward_tokens(self, feats: torch.Tensor, cnn_feats: torch.Tensor, pad_mask: torch.Tensor | None,
                       height: int) -> torch.Tensor:
        """`forward` on per-pixel layouts: feats, cnn_feats [B, H*W, T, D] -> logits [B, K, height, W]."""
        h = height
        query = linear(feats, self.query.weight).flatten(2)  # [B, N, T*D], date-major like the reference
        key = linear(cnn_feats, self.key.weight)
        if pad_mask is not None:
            key = key.masked_fill(pad_mask[:, None, :, None], 0.0)
        key = key.flatten(2)
        value = linear(self.temporal_max(feats, pad_mask), self.value.weight)  # [B, N, D]
        # scale 1/sqrt(D), not 1/sqrt(T*D): the reference's choice
        context = chunked_softmax_attention(query, key, value, self.d_model ** -0.5, self.chunk_size)
        logits = linear(self.gate * context + value, self.classifier.weight, self.classifier.bias)  # [B, N, K]
        return rearrange(logits, "b (h w) k -> b k h w", h=h)

    @staticmethod
    def temporal_max(feats: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """feats [B, N, T, D] -> max over valid dates [B, N, D]."""
        if pad_mask is not None:
            feats = feats.masked_fill(pad_mask[:, None, :, None], float("-inf"))
        return feats.amax(dim=2)
