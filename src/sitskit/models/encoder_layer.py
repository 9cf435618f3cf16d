"""Post-LN Transformer encoder layer for many short sequences (STCLN's per-pixel temporal Transformer).

`EncoderLayer` subclasses `nn.TransformerEncoderLayer` (batch_first, ReLU, post-norm) and keeps its
submodules, initialisation and state-dict keys (`self_attn.in_proj_weight`, `self_attn.in_proj_bias`,
`self_attn.out_proj.*`, `linear1`, `linear2`, `norm1`, `norm2`), so weights move freely between the two and
the released STCLN checkpoints load. Only `forward` is rewritten, with the same maths:

    x = norm1(x + dropout1(out_proj(MHA(x))))      MHA: 8 heads, key-padding mask, attention dropout
    x = norm2(x + dropout2(linear2(dropout(relu(linear1(x))))))

What is different is what runs and what autograd keeps (sizes per token and layer for d = 256, 8 heads,
FFN 1024, T dates):
- attention through `F.scaled_dot_product_attention` with a boolean key mask broadcast over heads and
  queries ([N, 1, 1, T], no float mask materialised, no batch-first transposes), except in CPU training
  with dropout, where every SDPA backend falls back to its math path (which keeps the scaled q and k, the
  softmax, a float dropout noise and the dropped probabilities): there `_AttentionFunction` keeps one
  contiguous head-major copy of q, k, v (made from the projection output in one pass), the softmax and a
  boolean dropout mask, and recomputes the rest; under bf16 autocast that copy is fp32, as the math path
  upcasts too;
- the FFN is one autograd function that keeps only its input and the dropped ReLU output `d`:
  relu and dropout backward are `grad * (d > 0) / (1 - p)`, exact because d > 0 exactly where the unit
  was active and kept (instead of the ReLU output, a float dropout noise and `d`: 3 x 1024 floats);
- residual dropouts keep a boolean mask, where `F.dropout` on CPU saves a float noise tensor;
- on CPU every dropout mask comes from `drop_mask`: 16 random bits per unit compared with a threshold,
  2.5-3x faster than `bernoulli_` (the masks were a fifth of a bf16 pre-training step), with the drop
  probability rounded to a multiple of 1/65536 (0.1 -> 0.1000061) and the matching 1/(1-p) scale.
Dropout masks are not drawn from the same random stream as torch's layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sitskit.models.cpu_matmul import linear, matmul_nt


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def drop_mask(like: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A dropout draw for `like`: (dropped bool [like.shape], True with probability p'; scale 1 / (1 - p')).

    On CPU each unit gets 16 bits of one 64-bit draw of the default generator, dropped where they fall
    below a threshold: p' = round(p * 2^16) / 2^16, within 7.7e-6 of p, and the scale matches p', so the
    dropout stays unbiased. torch's `bernoulli_` makes ~200 M draws/s on one core whatever the dtype, this
    500-660 M/s (benchmarks/RESULTS.md, "Ninth session"). Other devices: `bernoulli_`, p' = p.
    """
    if p >= 1.0:
        return torch.ones_like(like, dtype=torch.bool), 0.0
    if like.device.type != "cpu":
        return torch.empty_like(like, dtype=torch.bool).bernoulli_(p), 1.0 / (1.0 - p)
    k, n = round(p * 65536), like.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # full range: 64 random bits
    dropped = bits.view(torch.int16)[:n] < k - 32768
    return dropped.view(like.shape), 65536.0 / (65536 - k)


def dropout_bool_mask(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout whose autograd state is a boolean mask (`F.dropout` on CPU keeps a float noise tensor)."""
    if not training or p == 0.0:
        return x
    dropped, scale = drop_mask(x, p)
    return (x * scale).masked_fill_(dropped, 0.0)


class _FeedForwardFunction(torch.autograd.Function):
    """y = linear2(dropout(relu(linear1(x)))), keeping only x and the dropped hidden activation.

    The dropout zeroes units in place with a boolean draw and its 1/(1-p) scale is folded into the
    256 x 1024 weight of linear2 instead of the [tokens, 1024] activation: the same result to rounding.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, p: float, training: bool):
        hidden = matmul_nt(x.reshape(-1, x.shape[-1]), w1, b1).relu_()
        ctx.scale = 1.0
        if training and p > 0.0:
            dropped, ctx.scale = drop_mask(hidden, p)
            hidden.masked_fill_(dropped, 0.0)
        w2_scaled = w2 * ctx.scale  # 256 x 1024: cheaper to scale than the activation
        y = matmul_nt(hidden, w2_scaled, b2)
        ctx.save_for_backward(x, w1, w2_scaled, hidden)
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, w2_scaled, hidden = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        # weight gradients reduce over the tokens: torch's mm (oneDNN's inner product would first copy
        # the transposed [features, tokens] operand)
        grad_w2 = gy.t().mm(hidden).mul_(ctx.scale) if need_w2 else None
        grad_b2 = gy.sum(0) if need_b2 else None
        grad_x = grad_w1 = grad_b1 = None
        if need_x or need_w1 or need_b1:
            gh = matmul_nt(gy, w2_scaled.t())
            # relu + dropout backward, in place: hidden > 0 exactly where the unit was active and kept
            torch.ops.aten.threshold_backward.grad_input(gh, hidden, 0.0, grad_input=gh)
            if need_w1:
                grad_w1 = gh.t().mm(x2)
            if need_b1:
                grad_b1 = gh.sum(0)
            if need_x:
                grad_x = matmul_nt(gh, w1.t()).view(x.shape)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


class _AttentionFunction(torch.autograd.Function):
    """Multi-head softmax(q kᵀ · scale + bias) with dropout, times v, from the packed projection output.

    qkv: [N, T, 3 * D] (q | k | v, heads inside each, as `in_proj` makes it); bias: [N, 1, 1, T] float
    (0 or -inf) or None -> [N, T, D] (heads concatenated, ready for `out_proj`). Keeps one contiguous
    [3, N, h, T, dh] copy of q, k, v, the softmax and a bool dropout mask. bf16/fp16 inputs are computed in
    fp32 (the conversion rides on the packing copy) and the output and gradient are cast back.

    Why packed: batched products need each (sequence, head) block contiguous. From views of `qkv`, torch
    copies q, k and v inside every product, forward and backward, and autograd then stacks and re-lays
    the three gradients; here one copy each way does it (1.17x on the attention block at 4096 x 30
    tokens, docs/models.md "Performance").
    """

    @staticmethod
    def forward(ctx, qkv, heads: int, bias, p: float):
        n, t, d3 = qkv.shape
        dh = d3 // (3 * heads)
        work = torch.float32 if qkv.dtype in (torch.bfloat16, torch.float16) else qkv.dtype
        packed = torch.empty((3, n, heads, t, dh), dtype=work, device=qkv.device)
        packed.copy_(qkv.reshape(n, t, 3, heads, dh).permute(2, 0, 3, 1, 4))
        q, k, v = packed.unbind(0)  # [N, h, T, dh], contiguous
        scale = 1.0 / math.sqrt(dh)
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        if bias is not None:
            scores.add_(bias)
        attn = torch.softmax(scores, dim=-1)
        del scores
        dropped, ctx.keep_scale = None, 1.0
        if p > 0.0:
            dropped, ctx.keep_scale = drop_mask(attn, p)
            out = torch.matmul((attn * ctx.keep_scale).masked_fill_(dropped, 0.0), v)
        else:
            out = torch.matmul(attn, v)
        ctx.scale, ctx.in_dtype = scale, qkv.dtype
        ctx.save_for_backward(packed, attn, dropped)
        merged = torch.empty((n, t, heads, dh), dtype=qkv.dtype, device=qkv.device)
        merged.copy_(out.transpose(1, 2))
        return merged.view(n, t, heads * dh)

    @staticmethod
    def backward(ctx, grad_merged):
        packed, attn, dropped = ctx.saved_tensors
        _, n, h, t, dh = packed.shape
        grad_out = torch.empty((n, h, t, dh), dtype=packed.dtype, device=packed.device)
        grad_out.copy_(grad_merged.reshape(n, t, h, dh).transpose(1, 2))
        q, k, v = packed.unbind(0)
        grad_packed = torch.empty_like(packed)
        kept = attn if dropped is None else (attn * ctx.keep_scale).masked_fill_(dropped, 0.0)
        torch.matmul(kept.transpose(-2, -1), grad_out, out=grad_packed[2])
        del kept
        grad_attn = torch.matmul(grad_out, v.transpose(-2, -1))
        if dropped is not None:
            grad_attn.mul_(ctx.keep_scale).masked_fill_(dropped, 0.0)
        grad_scores = torch._softmax_backward_data(grad_attn, attn, -1, attn.dtype)
        del grad_attn
        grad_scores.mul_(ctx.scale)
        torch.matmul(grad_scores, k, out=grad_packed[0])
        torch.matmul(grad_scores.transpose(-2, -1), q, out=grad_packed[1])
        grad_qkv = torch.empty((n, t, 3, h, dh), dtype=ctx.in_dtype, device=packed.device)
        grad_qkv.copy_(grad_packed.permute(1, 3, 0, 2, 4))
        return grad_qkv.view(n, t, 3 * h * dh), None, None, None


class EncoderLayer(nn.TransformerEncoderLayer):
    """`nn.TransformerEncoderLayer(d_model, n_head, d_ffn, dropout, "relu", batch_first=True)` with a
    leaner forward (see the module docstring). forward(x [N, T, D], key_padding_mask [N, T] bool
    (True = padded) | None) -> [N, T, D]."""

    def __init__(self, d_model: int, n_head: int, d_ffn: int, dropout: float):
        super().__init__(d_model, n_head, d_ffn, dropout, activation="relu", batch_first=True)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,  # type: ignore[override]
                query_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query_mask [N, T] bool | None: compute the outputs of these tokens only -> [M, D] (M = its count,
        row-major order). Every token is still a key and value; what follows the attention (out_proj,
        residual, norms, FFN) runs on the M rows only: the same values as the full output's rows."""
        attended = self._attention(x, key_padding_mask, query_mask)
        if query_mask is not None:
            x = x[query_mask]
        x = self.norm1(x + dropout_bool_mask(attended, self.dropout1.p, self.training))
        return self.norm2(x + dropout_bool_mask(self._feed_forward(x), self.dropout2.p, self.training))

    def _attention(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                   query_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.self_attn
        n, t, d = x.shape
        h = attn.num_heads
        qkv = linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [N, T, 3D]
        p = attn.dropout if self.training else 0.0
        if p > 0.0 and x.device.type == "cpu" and torch.is_grad_enabled():
            out = self._cpu_training_attention(qkv, h, key_padding_mask, p)  # [N, T, D]
        else:
            q, k, v = qkv.view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)  # [N, h, T, dh] views
            mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            out = out.transpose(1, 2).reshape(n, t, d)
        if query_mask is not None:
            return linear(out[query_mask], attn.out_proj.weight, attn.out_proj.bias)  # [M, D]
        return linear(out, attn.out_proj.weight, attn.out_proj.bias)

    @staticmethod
    def _cpu_training_attention(qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor | None,
                                p: float) -> torch.Tensor:
        """`_AttentionFunction` (fp32 inside, also under bf16 autocast, as SDPA's math path upcasts too, the
        only CPU backend with dropout; but without its float dropout noise and `bernoulli_` draws)."""
        with torch.autocast("cpu", enabled=False):
            bias = None
            if key_padding_mask is not None:
                bias = torch.zeros(key_padding_mask.shape, dtype=torch.promote_types(qkv.dtype, torch.float32),
                                   device=qkv.device)
                bias = bias.masked_fill_(key_padding_mask, float("-inf"))[:, None, None, :]
            return _AttentionFunction.apply(qkv, heads, bias, p)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias
        dtype = _autocast_dtype(x.device.type)
        if dtype is not None:  # what autocast does for linear, done outside the function (grads flow back)
            x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
            with torch.autocast(x.device.type, enabled=False):
                return _FeedForwardFunction.apply(x, w1, b1, w2, b2, self.dropout.p, self.training)
        return _FeedForwardFunction.apply(x, w1, b1, w2, b2, self.dropout.p, self.training)
