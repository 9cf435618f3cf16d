"""U-TAE (Garnot & Landrieu, ICCV 2021): shared 2-D U-Net encoder per date, L-TAE at the lowest level,
attention-weighted temporal aggregation of the skip connections, 2-D decoder.

Default = the paper configuration (1,087,260 trainable parameters for 10 channels / 20 classes) with
the exact state-dict keys and shapes of utae-paps, so official weights load with strict=True.

mode="reference" reproduces the utae-paps numerics: BatchNorm+ReLU on the logits, L-TAE in_norm
statistics over padded steps, skip aggregation with the post-dropout attention, and the
`weight_init` of train_semantic.py. mode="clean" (default) fixes them: the logits are Conv -> BN
without the final ReLU (the BN(20) layer is kept so parameter count and keys stay identical), padded
steps are excluded from every statistic and the skips use the attention before dropout. In both
modes padded dates come from the explicit `pad_mask` and are never run through the encoder (no dummy
forward pass).
"""
from __future__ import annotations

import contextlib
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from sitskit.models.layers import check_inputs, gather_frames, is_channels_last, scatter_frames
from sitskit.models.ltae import LTAE, MODES
from sitskit.models.registry import register_model

AGG_MODES = ("att_group", "att_mean", "mean")


def make_norm(kind: str, channels: int, n_groups: int = 4) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(n_groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


class ConvLayer(nn.Module):
    """Stack of Conv -> Norm -> ReLU for consecutive `widths`; keys `conv.{0,1,3,4,…}` like utae-paps.

    last_relu=False drops the ReLU after the last convolution's norm. [N,C,H,W] -> [N,widths[-1],H',W']
    """

    def __init__(self, widths: list[int], norm: str = "batch", k: int = 3, s: int = 1, p: int = 1,
                 last_relu: bool = True, padding_mode: str = "reflect"):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(pairwise(widths)):
            layers += [nn.Conv2d(c_in, c_out, k, s, p, padding_mode=padding_mode), make_norm(norm, c_out)]
            if last_relu or i < len(widths) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvBlock(nn.Module):
    """A ConvLayer wrapped once more (keys `conv.conv.*`, as utae-paps' ConvBlock)."""

    def __init__(self, widths: list[int], norm: str = "batch", last_relu: bool = True,
                 padding_mode: str = "reflect"):
        super().__init__()
        self.conv = ConvLayer(widths, norm=norm, last_relu=last_relu, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DownConvBlock(nn.Module):
    """Strided conv (÷2) -> conv1 -> residual conv2. [N,d_in,H,W] -> [N,d_out,H/2,W/2]"""

    def __init__(self, d_in: int, d_out: int, k: int, s: int, p: int, norm: str, padding_mode: str):
        super().__init__()
        self.down = ConvLayer([d_in, d_in], norm=norm, k=k, s=s, p=p, padding_mode=padding_mode)
        self.conv1 = ConvLayer([d_in, d_out], norm=norm, padding_mode=padding_mode)
        self.conv2 = ConvLayer([d_out, d_out], norm=norm, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.down(x))
        return out + self.conv2(out)


class UpConvBlock(nn.Module):
    """Transposed conv (×2) of the coarse map, concat with the 1x1-conv'd skip, conv1, residual conv2.

    x: [B,d_in,h,w], skip: [B,d_skip,2h,2w] -> [B,d_out,2h,2w]
    """

    def __init__(self, d_in: int, d_out: int, d_skip: int, k: int, s: int, p: int, padding_mode: str):
        super().__init__()
        self.skip_conv = nn.Sequential(nn.Conv2d(d_skip, d_skip, 1), nn.BatchNorm2d(d_skip), nn.ReLU(inplace=True))
        self.up = nn.Sequential(nn.ConvTranspose2d(d_in, d_out, k, s, p), nn.BatchNorm2d(d_out), nn.ReLU(inplace=True))
        self.conv1 = ConvLayer([d_out + d_skip, d_out], norm="batch", padding_mode=padding_mode)
        self.conv2 = ConvLayer([d_out, d_out], norm="batch", padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.cat([self.up(x), self.skip_conv(skip)], dim=1))
        return out + self.conv2(out)


def unet_blocks(in_channels: int, encoder_widths, decoder_widths, encoder_norm: str = "group",
                padding_mode: str = "reflect", k: int = 4, s: int = 2, p: int = 1):
    """The U-Net of U-TAE and its ablations: (in_conv, down_blocks, up_blocks), each model assigning them to
    attributes of those names (the state-dict keys of utae-paps). Checks that the widths pair up."""
    ew, dw = list(encoder_widths), list(decoder_widths)
    if len(ew) != len(dw) or ew[-1] != dw[-1]:
        raise ValueError("encoder_widths and decoder_widths must have the same length and last width")
    n = len(ew)
    in_conv = ConvBlock([in_channels, ew[0], ew[0]], norm=encoder_norm, padding_mode=padding_mode)
    down = nn.ModuleList(DownConvBlock(ew[i], ew[i + 1], k, s, p, encoder_norm, padding_mode) for i in range(n - 1))
    up = nn.ModuleList(UpConvBlock(dw[i], dw[i - 1], ew[i - 1], k, s, p, padding_mode) for i in range(n - 1, 0, -1))
    return in_conv, down, up


def aggregate_skip(x: torch.Tensor, attn: torch.Tensor | None, pad_mask: torch.Tensor | None,
                   mode: str) -> torch.Tensor:
    """Collapse the time axis of a skip feature map with the L-TAE attention.

    x: [B,T,C,H,W], attn: [G,B,T,h,w] (resized bilinearly to H x W), pad_mask: [B,T] | None -> [B,C,H,W]
    att_group: channel group g (C/G channels) is summed over time with head g's attention;
    att_mean: head-averaged attention; mean: plain mean over the valid dates. Padded dates count zero.
    """
    return aggregate_skip_frames(gather_frames(x, pad_mask), attn, pad_mask, tuple(x.shape[:2]), mode)


def aggregate_skip_frames(frames: torch.Tensor, attn: torch.Tensor | None, pad_mask: torch.Tensor | None,
                          batch_shape: tuple[int, int], mode: str) -> torch.Tensor:
    """`aggregate_skip` on the valid frames as the encoder produced them (`gather_frames` order).

    frames: [N_valid,C,H,W] (NCHW or channels_last), attn: [G,B,T,h,w] | None (mode="mean"),
    pad_mask: [B,T] | None -> [B,C,H,W] in the layout of `frames`. Never scatters the frames back into a
    zero-filled [B,T,C,H,W] map: that copy, and the einsum's transposed copy of it, cost more than the sum.
    """
    b, t = batch_shape
    counts = [t] * b if pad_mask is None else (~pad_mask).sum(dim=1).tolist()
    n, c, h, w = frames.shape
    if mode == "mean":
        weights = torch.cat([frames.new_full((k,), 1.0 / k) for k in counts])[:, None, None, None]
        return _SegmentWeightedSum.apply(frames, weights.expand(n, 1, h, w), counts)
    if mode == "att_mean":
        attn = attn.mean(dim=0, keepdim=True)
    n_head = attn.shape[0]
    if c % n_head:
        raise ValueError(f"aggregate_skip: {c} channels do not split into {n_head} attention groups")
    valid = attn.flatten(1, 2) if pad_mask is None else attn[:, ~pad_mask]  # [G, N_valid, h, w]
    valid = resize(valid.flatten(0, 1), (h, w)).view(n_head, n, h, w)
    return _SegmentWeightedSum.apply(frames, valid.transpose(0, 1), counts)


def _frame_rows(t: torch.Tensor, nhwc: bool, groups: int) -> torch.Tensor:
    """[N, C, H, W] -> per frame, the layout `_SegmentWeightedSum` works in (views for dense inputs):
    NHWC [N, H*W, C]; NCHW [N, groups, C/groups, H*W]."""
    n, c, h, w = t.shape
    if nhwc:
        return t.permute(0, 2, 3, 1).reshape(n, h * w, c)
    return t.reshape(n, groups, c // groups, h * w)


class _SegmentWeightedSum(torch.autograd.Function):
    """out[b][g-th channel group] = sum over the frames f of sample b of x[f][group g] * w[f, g].

    x: [N, C, H, W] (NCHW or channels_last), w: [N, G, H, W] with G | C, counts: frames per sample
    (consecutive) -> [B, C, H, W] in the layout of x. Frame by frame: no [N, C, H, W] weight or product is
    materialised; in NHWC a frame's per-channel weights are the small product w[f] [HW, G] @ E [G, C]
    (E: 0/1 group membership, exact) into a buffer that stays in cache.
    """

    @staticmethod
    def _setup(x, w):
        """-> (x's row views, layout, scratch buffer [one frame], frame_weights(f): x[f]'s weights in a
        broadcastable shape, group_sum(t, out): a frame's [.., C] product summed within channel groups)."""
        _, c, h, wd = x.shape
        g = w.shape[1]
        nhwc = is_channels_last(x)
        ws = _frame_rows(w, nhwc, g)
        if nhwc:
            expand = torch.repeat_interleave(torch.eye(g, dtype=x.dtype, device=x.device), c // g, dim=1)
            buf = x.new_empty(h * wd, c)
            return (_frame_rows(x, True, g), torch.channels_last, buf, lambda f: torch.mm(ws[f], expand, out=buf),
                    lambda t, out: torch.mm(t, expand.T, out=out))
        return (_frame_rows(x, False, g), torch.contiguous_format, x.new_empty(g, c // g, h * wd), lambda f: ws[f],
                lambda t, out: torch.sum(t, dim=1, keepdim=True, out=out))

    @staticmethod
    def forward(ctx, x, w, counts):
        xs, fmt, _, frame_weights, _ = _SegmentWeightedSum._setup(x, w)
        out = torch.empty((len(counts), *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
        outs = _frame_rows(out, fmt is torch.channels_last, w.shape[1])
        start = 0
        for i, k in enumerate(counts):
            torch.mul(xs[start], frame_weights(start), out=outs[i])
            for f in range(start + 1, start + k):
                outs[i].addcmul_(xs[f], frame_weights(f))
            start += k
        ctx.counts = counts
        ctx.save_for_backward(x, w)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        xs, fmt, buf, frame_weights, group_sum = _SegmentWeightedSum._setup(x, w)
        nhwc, g = fmt is torch.channels_last, w.shape[1]
        go = _frame_rows(grad_out.contiguous(memory_format=fmt), nhwc, g)
        grad_x = torch.empty_like(x, memory_format=fmt) if need_x else None
        grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device, memory_format=fmt) if need_w else None
        gxs = _frame_rows(grad_x, nhwc, g) if need_x else None
        gws = _frame_rows(grad_w, nhwc, g) if need_w else None
        start = 0
        for i, k in enumerate(ctx.counts):
            for f in range(start, start + k):
                if need_x:
                    torch.mul(go[i], frame_weights(f), out=gxs[f])
                if need_w:
                    group_sum(torch.mul(go[i], xs[f], out=buf), gws[f])
            start += k
        return grad_x, grad_w, None


def bilinear_matrix(n_out: int, n_in: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D linear interpolation with align_corners=False, as F.interpolate computes
    them for an output size: source coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at 0."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    frac = src - lo
    rows = torch.arange(n_out)
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a.index_put_((rows, lo), 1 - frac, accumulate=True)
    a.index_put_((rows, (lo + 1).clamp(max=n_in - 1)), frac, accumulate=True)
    return a.to(dtype=dtype, device=device)


def _without_autocast(device_type: str):
    """autocast off (a no-op context on devices without autocast, e.g. "meta" for shape inference)."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda", "xpu", "mps"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N,h,w] -> [N,*size]: bilinear (align_corners=False) upsampling, average pooling when shrinking.

    Bilinear upsampling is separable, so it is computed as A_h @ maps @ A_w^T: the same weights as
    F.interpolate (values equal to rounding), but its backward is two small matrix products instead of
    upsample_bilinear2d_backward's scatter, 10x faster on CPU (docs/models.md, "Performance"). In the
    maps' dtype, also under autocast (attention weights, as with F.interpolate)."""
    (h, w), size = maps.shape[-2:], tuple(size)
    if (h, w) == size:
        return maps
    if size[0] >= h and size[1] >= w:
        a_h = bilinear_matrix(size[0], h, maps.dtype, maps.device)
        a_w = bilinear_matrix(size[1], w, maps.dtype, maps.device)
        with _without_autocast(maps.device.type):
            return torch.matmul(a_h, torch.matmul(maps, a_w.t()))
    return F.adaptive_avg_pool2d(maps[:, None], size)[:, 0]


@register_model("utae")
class UTAE(nn.Module):
    """U-TAE semantic segmentation.

    forward(x [B,T,C,H,W], dates [B,T] day offsets, pad_mask [B,T] bool (True = padded) | None)
      -> logits [B,K,H,W]; with return_maps: (out [B,32,H,W], [ltae_out 128@H/8, up0 64@H/4,
      up1 32@H/2, up2 32@H]) — the decoder maps for a panoptic head (utae-paps' `encoder=True`).
    H and W must be divisible by 2**(len(encoder_widths)-1) (8 by default).
    channels_last=True stores the 2-D convolution weights and runs the frames in NHWC, oneDNN's preferred
    layout: on CPU it skips a transposed copy per strided convolution (docs/models.md, "Performance").
    Same state-dict keys and values; outputs come with standard strides. False keeps NCHW. None (default)
    = True where torch's CPU capability is AVX-512 (measured faster there), False on AVX2-only CPUs
    (NHWC weight gradients measured 2-4x slower).
    """

    def __init__(self, in_channels: int = 10, num_classes: int = 20,
                 encoder_widths: tuple[int, ...] = (64, 64, 64, 128),
                 decoder_widths: tuple[int, ...] = (32, 32, 64, 128), out_conv_width: int = 32,
                 str_conv_k: int = 4, str_conv_s: int = 2, str_conv_p: int = 1, agg_mode: str = "att_group",
                 encoder_norm: str = "group", n_head: int = 16, d_model: int = 256, d_k: int = 4,
                 ltae_dropout: float = 0.2, padding_mode: str = "reflect", mode: str = "clean",
                 return_maps: bool = False, channels_last: bool | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if agg_mode not in AGG_MODES:
            raise ValueError(f"agg_mode must be one of {AGG_MODES}, got {agg_mode!r}")
        self.in_channels, self.mode, self.agg_mode, self.return_maps = in_channels, mode, agg_mode, return_maps
        self.n_stages = len(encoder_widths)
        ew, dw = list(encoder_widths), list(decoder_widths)
        self.in_conv, self.down_blocks, self.up_blocks = unet_blocks(
            in_channels, ew, dw, encoder_norm, padding_mode, str_conv_k, str_conv_s, str_conv_p)
        self.temporal_encoder = LTAE(ew[-1], n_head=n_head, d_k=d_k, d_model=d_model, mlp=(d_model, ew[-1]),
                                     dropout=ltae_dropout, mode=mode)
        self.out_conv = ConvBlock([dw[0], out_conv_width, num_classes], norm="batch",
                                  last_relu=(mode == "reference"), padding_mode=padding_mode)
        if agg_mode == "att_group" and any(c % n_head for c in ew[:-1]):
            raise ValueError(f"att_group needs encoder widths divisible by n_head={n_head}")
        if mode == "reference":
            self.apply(reference_weight_init)
        if channels_last is None:
            channels_last = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        self.channels_last = channels_last
        if channels_last:  # NHWC weights and frames: oneDNN's preferred layout (docs/models.md, "Performance")
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None,
                return_maps: bool | None = None):
        check_inputs(x, dates, pad_mask, self.in_channels, "utae")
        factor = 2 ** (self.n_stages - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"utae: H and W must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        levels = self.encode_frames(x, pad_mask)
        lowest = scatter_frames(levels[-1], pad_mask, x.shape[:2])
        out, attn = self.temporal_encoder(lowest, dates, pad_mask, return_attention=True)
        maps = [out]
        for i, up in enumerate(self.up_blocks):
            skip = aggregate_skip_frames(levels[-(i + 2)], attn, pad_mask, x.shape[:2], self.agg_mode)
            out = up(out, skip)
            maps.append(out)
        if self.return_maps if return_maps is None else return_maps:
            if self.channels_last:  # standard strides for the caller (views, a panoptic head)
                maps = [m.contiguous() for m in maps]
                out = maps[-1]
            return out, maps
        logits = self.out_conv(out)
        return logits.contiguous() if self.channels_last else logits

    def encode_frames(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Shared spatial encoder on the valid frames -> per level [N_valid,C_l,H/2^l,W/2^l] (`gather_frames`
        order)."""
        frames = gather_frames(x, pad_mask)
        if self.channels_last:
            frames = frames.contiguous(memory_format=torch.channels_last)
        frames = self.in_conv(frames)
        levels = [frames]
        for down in self.down_blocks:
            frames = down(frames)
            levels.append(frames)
        return levels


def reference_weight_init(m: nn.Module) -> None:
    """utae-paps train_semantic.py `weight_init` (docs/models.md, "U-TAE / L-TAE").

    Conv2d/ConvTranspose2d/Linear: xavier_normal weights, N(0,1) biases; Conv1d: N(0,1) weights and
    biases; BatchNorm: weight N(0,1), bias 0. GroupNorm and the L-TAE master queries are untouched.
    """
    if isinstance(m, nn.Conv1d):
        nn.init.normal_(m.weight)
        if m.bias is not None:
            nn.init.normal_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.xavier_normal_(m.weight)
        if m.bias is not None:
            nn.init.normal_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight)
        nn.init.zeros_(m.bias)
