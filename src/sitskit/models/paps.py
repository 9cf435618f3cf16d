"""PaPs (Parcels-as-Points, Garnot & Landrieu ICCV 2021) panoptic head on U-TAE or on the STCLN encoder.

Two registered models (docs/panoptic.md):
- "utae_paps"  -> UTAEPaPs: U-TAE decoder maps + PaPs heads, the state-dict keys of utae-paps
  (`encoder.*`, `heatmap_conv.*`, …, buffer `min_confidence`), 1,259,673 trainable parameters by default.
- "stcln_paps" -> STCLNPaPs: STCLN encoder (`encoder`, loads pre-trained weights) + `STCLNPyramid` adapter.

forward(x [B,T,C,H,W], dates [B,T], pad_mask [B,T] | None, zones [B,H,W] | None, panoptic None|bool) -> dict:
  heatmap [B,1,H,W] (centerness, sigmoid), heatmap_logits [B,1,H,W], saliency [B,1,H,W] (logits),
  the per-centre outputs of `predict_centres` (one centre per zone when `zones` is given, the training
  matching; local maxima of the heatmap otherwise), and with panoptic=True (default: eval mode without
  zones) the panoptic map: pano_instance [B,H,W] int64 (0 = none, ids 1..n per image by decreasing
  confidence), pano_class [B,H,W] int64, pano_semantic [B,K,H,W] (class logits on covered pixels, else 0),
  instance_class / instance_score: lists of [n_b] tensors. When zones and panoptic=True are both given, the
  panoptic map comes from detected centres (never from the zones) and its centre outputs are under
  "detections".

Default = the clean numerics (per-image centre threshold, per-axis box clamping, any batch size, no
in-place mutation); reference_numerics=True = utae-paps' batch-mean threshold, H for both box axes and
U-TAE mode="reference", for imported weights. All per-centre work is batched.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from sitskit.models.layers import check_inputs
from sitskit.models.registry import build, register_model
from sitskit.models.utae import ConvLayer

SHAPE_PIXEL_BUDGET = 1 << 20  # canvas pixels per chunk of centres when building instance masks


def mlp(widths: list[int], last_bn_relu: tuple[bool, ...]) -> nn.Sequential:
    """Linear layers; after layer i a BatchNorm1d + ReLU when last_bn_relu[i] (utae-paps key layout)."""
    layers: list[nn.Module] = []
    for (d_in, d_out), norm in zip(pairwise(widths), last_bn_relu):
        layers.append(nn.Linear(d_in, d_out))
        if norm:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU()]
    return nn.Sequential(*layers)


class PaPs(nn.Module):
    """PaPs heads on a backbone giving `features(x, dates, pad_mask) -> (out [B,enc_dim,H,W], maps)`.

    maps: [m_0 @H/8, m_1 @H/4, m_2 @H/2, m_3 @H], channels summing to stack_dim (128+64+32+32 = 256).
    Subclasses build `self.encoder` before calling `build_heads`.
    """

    def build_heads(self, enc_dim: int, stack_dim: int, num_classes: int, shape_size: int, mask_conv: bool,
                    min_confidence: float, min_remain: float, mask_threshold: float, max_centres: int | None,
                    reference_numerics: bool, padding_mode: str) -> None:
        self.num_classes, self.shape_size, self.mask_conv = num_classes, shape_size, mask_conv
        self.min_remain, self.mask_threshold = min_remain, mask_threshold
        self.max_centres, self.reference_numerics = max_centres, reference_numerics
        # The reference's ConvLayer ends with Conv -> BN(1); the Sigmoid is module 1 of the Sequential.
        self.heatmap_conv = nn.Sequential(
            ConvLayer([enc_dim, 32, 1], norm="batch", last_relu=False, padding_mode=padding_mode), nn.Sigmoid())
        self.saliency_conv = ConvLayer([enc_dim, 32, 1], norm="batch", last_relu=False, padding_mode=padding_mode)
        self.shape_mlp = mlp([stack_dim, stack_dim // 2, shape_size ** 2], (True, False))
        self.size_mlp = nn.Sequential(*mlp([stack_dim, stack_dim // 2, stack_dim // 4, 2], (True, True, False)),
                                      nn.Softplus())
        self.class_mlp = mlp([stack_dim, stack_dim // 2, stack_dim // 4, num_classes], (True, False, False))
        if mask_conv:
            self.mask_cnn = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(1, 16), nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None = None,
                zones: torch.Tensor | None = None, panoptic: bool | None = None) -> dict:
        out, maps = self.features(x, dates, pad_mask)
        heat_logits = self.heatmap_conv[0](out)
        result = {"heatmap": self.heatmap_conv[1](heat_logits), "heatmap_logits": heat_logits,
                  "saliency": self.saliency_conv(out)}
        if zones is not None:
            if tuple(zones.shape) != (x.shape[0], *x.shape[-2:]):
                raise ValueError(f"zones must be [B,H,W] = {(x.shape[0], *x.shape[-2:])}, got {tuple(zones.shape)}")
            centres, centre_zone = zone_centres(result["heatmap"][:, 0].detach(), zones)
            result.update(self.predict_centres(maps, result, centres))
            result["centre_zone"] = centre_zone
        if panoptic is None:
            panoptic = zones is None and not self.training
        if zones is None or panoptic:
            detections = self.predict_centres(maps, result, self.detect_centres(result["heatmap"][:, 0].detach()))
            if zones is None:
                result.update(detections)
            else:
                result["detections"] = detections
            if panoptic:
                result.update(self.combine(detections, result["heatmap"].shape[0], *x.shape[-2:]))
        return result

    def features(self, x, dates, pad_mask):  # pragma: no cover - implemented by the subclasses
        raise NotImplementedError

    # ------------------------------------------------------------------ centres
    def detect_centres(self, heatmap: torch.Tensor) -> torch.Tensor:
        """Local maxima (3x3) above the mean heatmap, at most `max_centres` per image (highest first).

        heatmap: [B,H,W] -> centres [N,3] int64 (b, row, col), grouped by image, by decreasing heatmap.
        The threshold is the per-image mean (reference_numerics: the mean over the whole batch).
        """
        b, h, w = heatmap.shape
        local_max = heatmap == F.max_pool2d(heatmap[:, None], 3, stride=1, padding=1)[:, 0]
        mean = heatmap.mean() if self.reference_numerics else heatmap.mean(dim=(1, 2), keepdim=True)
        score = torch.where(local_max & (heatmap > mean), heatmap, torch.full_like(heatmap, -float("inf")))
        k = h * w if self.max_centres is None else min(int(self.max_centres), h * w)
        values, flat = score.flatten(1).topk(k, dim=1)  # [B,k], sorted by decreasing value
        keep = torch.isfinite(values)
        batch = torch.arange(b, device=heatmap.device)[:, None].expand_as(flat)[keep]
        flat = flat[keep]
        return torch.stack([batch, flat // w, flat % w], dim=1)

    def predict_centres(self, maps: list[torch.Tensor], result: dict, centres: torch.Tensor) -> dict:
        """Per-centre size, class, shape, confidence and instance mask, batched over all centres.

        centres [N,3] -> size [N,2] (rows, cols), class_logits [N,K], shape_logits [N,S,S], confidence [N]
        (heatmap at the centre), and the masks on a per-centre canvas (see `instance_masks`).
        """
        b_idx, rows, cols = centres.unbind(1)
        h = result["heatmap"].shape[-2]
        levels = []
        for m in maps:  # the maps at (row // 2^l, col // 2^l) for their downsampling factor 2^l
            f = h // m.shape[-2]
            levels.append(m[b_idx, :, rows // f, cols // f])
        feats = torch.cat(levels, dim=1)  # [N, stack_dim]
        n = feats.shape[0]
        if n == 0:
            size = feats.new_zeros(0, 2)
            class_logits = feats.new_zeros(0, self.num_classes)
            shape_logits = feats.new_zeros(0, self.shape_size, self.shape_size)
        else:
            # BatchNorm1d needs two rows in training: a lone centre is duplicated (identical statistics).
            inp = feats.repeat(2, 1) if n == 1 and self.training else feats
            size = self.size_mlp(inp)[:n]
            class_logits = self.class_mlp(inp)[:n]
            shape_logits = self.shape_mlp(inp)[:n].view(n, self.shape_size, self.shape_size)
        out = {"centres": centres, "size": size, "class_logits": class_logits, "shape_logits": shape_logits,
               "confidence": result["heatmap"][b_idx, 0, rows, cols]}
        out.update(self.instance_masks(shape_logits, result["saliency"], centres, size))
        return out

    # ------------------------------------------------------------------ masks
    def boxes(self, centres: torch.Tensor, size: torch.Tensor, h: int, w: int):
        """Boxes of `round(size)` (>= 1) centred on the centres, clamped to the image.

        -> start [N,2] (clamped top-left), extent [N,2] (clamped rows/cols), offset [N,2] (clamped - unclamped
        start), full [N,2] (unclamped size). reference_numerics clamps both axes to H, as utae-paps does.
        """
        full = size.detach().round().clamp(min=1).long()
        centre = centres[:, 1:]
        start = centre - full // 2
        stop = centre + full // 2 + full % 2
        limit = torch.tensor([h, h] if self.reference_numerics else [h, w], device=centres.device)
        start_c = torch.minimum(start.clamp(min=0), limit)
        stop_c = torch.minimum(stop.clamp(min=0), limit)
        return start_c, stop_c - start_c, start_c - start, full

    def instance_masks(self, shape_logits: torch.Tensor, saliency: torch.Tensor, centres: torch.Tensor,
                       size: torch.Tensor) -> dict:
        """Instance masks on a canvas [N, Hc, Wc] anchored at each box's clamped top-left corner.

        The S x S shape is resized bilinearly (align_corners=False, as F.interpolate) to the full box, cropped
        to the image, plus the saliency of the covered pixels = m; mask = sigmoid(m) * sigmoid(mask_cnn(m))
        (without mask_cnn: sigmoid(shape) * sigmoid(saliency)). mask_cnn runs on the canvas with its zero
        padding and GroupNorm statistics restricted to each box, i.e. exactly as on the cropped box alone.

        -> mask_prob [N,Hc,Wc] (0 outside the box), mask_logits [N,2,Hc,Wc] (the two sigmoid factors' logits),
        box_valid [N,Hc,Wc] bool, box_start [N,2], box_extent [N,2].
        """
        _, _, h, w = saliency.shape
        n = centres.shape[0]
        start, extent, offset, full = self.boxes(centres, size, h, w)
        hc = int(extent[:, 0].max()) if n else 0
        wc = int(extent[:, 1].max()) if n else 0
        probs, logits, valids = [], [], []
        chunk = max(1, SHAPE_PIXEL_BUDGET // max(1, hc * wc))
        for i in range(0, n, chunk):  # chunks of centres bound the memory; each chunk is one batched pass
            sl = slice(i, i + chunk)
            p, lg, v = self._canvas_masks(shape_logits[sl], saliency, centres[sl, 0], start[sl], extent[sl],
                                          offset[sl], full[sl], hc, wc)
            probs.append(p)
            logits.append(lg)
            valids.append(v)
        if n == 0:
            empty = shape_logits.new_zeros(0, 0, 0)
            return {"mask_prob": empty, "mask_logits": shape_logits.new_zeros(0, 2, 0, 0),
                    "box_valid": empty.bool(), "box_start": start, "box_extent": extent}
        return {"mask_prob": torch.cat(probs), "mask_logits": torch.cat(logits), "box_valid": torch.cat(valids),
                "box_start": start, "box_extent": extent}

    def _canvas_masks(self, shape_logits, saliency, b_idx, start, extent, offset, full, hc, wc):
        device = shape_logits.device
        ii = torch.arange(hc, device=device)
        jj = torch.arange(wc, device=device)
        # normalised grid_sample coordinates of the canvas pixels inside the full (unclamped) box
        y = ((ii[None] + offset[:, :1] + 0.5) / full[:, :1]) * 2 - 1  # [n, Hc]
        x = ((jj[None] + offset[:, 1:] + 0.5) / full[:, 1:]) * 2 - 1  # [n, Wc]
        n = shape_logits.shape[0]
        grid = torch.stack([x[:, None, :].expand(n, hc, wc), y[:, :, None].expand(n, hc, wc)], dim=-1)
        shape = F.grid_sample(shape_logits[:, None], grid.to(shape_logits.dtype), mode="bilinear",
                              padding_mode="border", align_corners=False)[:, 0]
        valid = (ii[None] < extent[:, :1])[:, :, None] & (jj[None] < extent[:, 1:])[:, None, :]
        r = (start[:, :1] + ii[None]).clamp(max=saliency.shape[-2] - 1)
        c = (start[:, 1:] + jj[None]).clamp(max=saliency.shape[-1] - 1)
        sal = saliency[b_idx[:, None, None], 0, r[:, :, None], c[:, None, :]]
        vf = valid.to(shape.dtype)
        if self.mask_conv:
            m = (shape + sal) * vf
            a, b = m, self._masked_mask_cnn(m, vf)
        else:
            a, b = shape, sal
        prob = torch.sigmoid(a) * torch.sigmoid(b) * vf
        return prob, torch.stack([a, b], dim=1), valid

    def _masked_mask_cnn(self, m: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """mask_cnn on [n,Hc,Wc] canvases, zero outside each box, GroupNorm(1) statistics over the box only."""
        conv0, gn, _, conv3, _, conv5 = self.mask_cnn
        v = valid[:, None]
        z = conv0(m[:, None])
        count = v.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1) * z.shape[1]
        mean = (z * v).sum(dim=(1, 2, 3), keepdim=True) / count
        var = (((z - mean) * v) ** 2).sum(dim=(1, 2, 3), keepdim=True) / count
        z = (z - mean) * torch.rsqrt(var + gn.eps) * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]
        z = F.relu(z) * v
        z = F.relu(conv3(z)) * v
        return conv5(z)[:, 0]

    # ------------------------------------------------------------------ panoptic map
    @torch.no_grad()
    def combine(self, det: dict, b: int, h: int, w: int) -> dict:
        """Pseudo-NMS: paste `mask_prob > mask_threshold` by decreasing confidence (centres with confidence <
        min_confidence dropped); an instance overlapping earlier ones keeps its free pixels only if they are
        more than `min_remain` of its mask, else it is dropped.

        The sequential rule is solved exactly without a loop over centres, on the list of pasted pixels
        (instance k, pixel p) sorted by pixel then instance: the accepted instances < k covering p are an
        exclusive prefix count within p's run, and the accept decisions are iterated to their fixed point
        (decision k depends on decisions < k only, so every pass fixes at least one more; a few in practice).
        """
        dev = det["confidence"].device
        pano_instance = torch.zeros(b, h * w, dtype=torch.int64, device=dev)
        pano_semantic = torch.zeros(b, self.num_classes, h, w, dtype=det["class_logits"].dtype, device=dev)
        classes, scores = [], []
        threshold = float(self.min_confidence)
        for img in range(b):
            sel = torch.nonzero((det["centres"][:, 0] == img) & (det["confidence"] >= threshold)).squeeze(1)
            sel = sel[det["confidence"][sel].argsort(descending=True, stable=True)]
            k, pix = self._pasted_pixels(det, sel, w)
            accepted, owner = self._accept(k, pix, sel.numel())
            ids = torch.cumsum(accepted.long(), 0)  # id of accepted instance k = its rank among the accepted
            pano_instance[img, pix[owner]] = ids[k[owner]]
            logits = det["class_logits"][sel][accepted]  # [n_kept, K]
            inst = pano_instance[img].view(h, w)
            covered = inst > 0
            pano_semantic[img][:, covered] = logits[inst[covered] - 1].T
            classes.append(logits.argmax(1) if logits.numel() else logits.new_zeros(0, dtype=torch.int64))
            scores.append(det["confidence"][sel][accepted])
        pano_instance = pano_instance.view(b, h, w)
        pano_class = pano_semantic.argmax(1) * (pano_instance > 0)
        return {"pano_instance": pano_instance, "pano_semantic": pano_semantic, "pano_class": pano_class,
                "instance_class": classes, "instance_score": scores}

    def _pasted_pixels(self, det: dict, sel: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(instance rank k, flat image pixel) of every pixel of `mask_prob > mask_threshold` of the selected
        centres, sorted by pixel, then by k."""
        on = (det["mask_prob"][sel] > self.mask_threshold) & det["box_valid"][sel]
        k, i, j = torch.nonzero(on, as_tuple=True)
        start = det["box_start"][sel]
        pix = (start[k, 0] + i) * w + start[k, 1] + j
        order = torch.argsort(pix * max(sel.numel(), 1) + k)
        return k[order], pix[order]

    def _accept(self, k: torch.Tensor, pix: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> accepted [n] bool, owner [P] bool (the entry is its pixel's first accepted instance)."""
        total = torch.bincount(k, minlength=n)
        run_start = torch.ones_like(pix, dtype=torch.bool)
        run_start[1:] = pix[1:] != pix[:-1]
        first_index = torch.cummax(torch.where(run_start, torch.arange(pix.numel(), device=pix.device), 0), 0)[0] \
            if pix.numel() else pix
        accepted = total > 0
        free = torch.ones_like(pix, dtype=torch.bool)
        for _ in range(n + 1):
            a = accepted[k].long()
            inclusive = torch.cumsum(a, 0)
            before = inclusive - a - (inclusive[first_index] - a[first_index])  # accepted < k on this pixel
            free = before == 0
            new = torch.bincount(k[free], minlength=n)
            ok = (total > 0) & ((new == total) | (new.float() / total.clamp(min=1).float() > self.min_remain))
            if torch.equal(ok, accepted):
                break
            accepted = ok
        return accepted, free & accepted[k]


def zone_centres(heatmap: torch.Tensor, zones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training matching: one centre per zone (zone 0 = no parcel excluded), at its highest heatmap pixel.

    heatmap: [B,H,W], zones: [B,H,W] int -> centres [N,3] (b, row, col), zone ids [N]. Ties -> first pixel.
    """
    b, h, w = heatmap.shape
    z = zones.long().flatten(1)
    n_z = int(z.max()) + 1 if z.numel() else 1
    key = (z + n_z * torch.arange(b, device=z.device)[:, None]).flatten()
    heat = heatmap.flatten()
    best = heat.new_full((b * n_z,), -float("inf")).scatter_reduce(0, key, heat, "amax")
    pixel = torch.arange(h * w, device=z.device).repeat(b)
    candidate = torch.where(heat == best[key], pixel, torch.full_like(pixel, h * w))
    first = torch.full((b * n_z,), h * w, device=z.device).scatter_reduce(0, key, candidate, "amin")
    keys = torch.nonzero((first < h * w) & (torch.arange(b * n_z, device=z.device) % n_z > 0)).squeeze(1)
    flat = first[keys]
    return torch.stack([keys // n_z, flat // w, flat % w], dim=1), keys % n_z


# ---------------------------------------------------------------------- U-TAE + PaPs
@register_model("utae_paps")
class UTAEPaPs(PaPs):
    """U-TAE + PaPs (paper configuration by default). The U-TAE `out_conv` exists (state-dict layout of
    utae-paps) but is unused: 1,259,673 trainable parameters, 1,244,541 without it. See module docstring."""

    def __init__(self, in_channels: int = 10, num_classes: int = 20, shape_size: int = 16, mask_conv: bool = True,
                 min_confidence: float = 0.2, min_remain: float = 0.5, mask_threshold: float = 0.4,
                 max_centres: int | None = 512, reference_numerics: bool = False,
                 encoder_widths: tuple[int, ...] = (64, 64, 64, 128),
                 decoder_widths: tuple[int, ...] = (32, 32, 64, 128), agg_mode: str = "att_group",
                 encoder_norm: str = "group", n_head: int = 16, d_model: int = 256, d_k: int = 4,
                 ltae_dropout: float = 0.2, padding_mode: str = "reflect"):
        super().__init__()
        self.register_buffer("min_confidence", torch.tensor([float(min_confidence)]))
        self.in_channels = in_channels
        self.encoder = build("utae", in_channels=in_channels, num_classes=num_classes,
                             encoder_widths=tuple(encoder_widths), decoder_widths=tuple(decoder_widths),
                             agg_mode=agg_mode, encoder_norm=encoder_norm, n_head=n_head, d_model=d_model, d_k=d_k,
                             ltae_dropout=ltae_dropout, padding_mode=padding_mode,
                             mode="reference" if reference_numerics else "clean", return_maps=True)
        self.build_heads(decoder_widths[0], sum(decoder_widths), num_classes, shape_size, mask_conv,
                         min_confidence, min_remain, mask_threshold, max_centres, reference_numerics, padding_mode)

    def features(self, x, dates, pad_mask):
        return self.encoder(x, dates, pad_mask, return_maps=True)


# ---------------------------------------------------------------------- STCLN + PaPs
class STCLNPyramid(nn.Module):
    """Feature pyramid for PaPs from STCLN features: masked mean over the valid dates, a 1x1 reduction at
    full resolution, then strided 3x3 convs (÷2 each).

    feats: [B,T,D,H,W], pad_mask: [B,T] | None -> (out [B,w0,H,W], maps [m@H/8, m@H/4, m@H/2, out]),
    widths = (w0, w1, w2, w3) channels at H, H/2, H/4, H/8.
    """

    def __init__(self, d_in: int = 256, widths: tuple[int, ...] = (32, 32, 64, 128)):
        super().__init__()
        self.reduce = ConvLayer([d_in, widths[0]], norm="group", k=1, p=0)
        self.downs = nn.ModuleList(ConvLayer([a, b], norm="group", k=3, s=2, p=1)
                                   for a, b in pairwise(widths))

    def forward(self, feats: torch.Tensor, pad_mask: torch.Tensor | None):
        if pad_mask is None:
            pooled = feats.mean(dim=1)
        else:
            valid = (~pad_mask).to(feats.dtype)
            pooled = torch.einsum("btdhw,bt->bdhw", feats, valid) / valid.sum(1)[:, None, None, None]
        out = self.reduce(pooled)
        maps = [out]
        for down in self.downs:
            maps.append(down(maps[-1]))
        return out, maps[::-1]


@register_model("stcln_paps")
class STCLNPaPs(PaPs):
    """STCLN encoder + `STCLNPyramid` + PaPs heads. `encoder` is an `stcln_encoder`, so
    `sitskit.models.checkpoints.load_pretrained_encoder(model, source)` loads a pre-trained one.
    H and W must be divisible by 8."""

    def __init__(self, in_channels: int = 10, num_classes: int = 20, positions: str = "dates", dropout: float = 0.1,
                 encoder_kwargs: dict | None = None, pyramid_widths: tuple[int, ...] = (32, 32, 64, 128),
                 shape_size: int = 16, mask_conv: bool = True, min_confidence: float = 0.2, min_remain: float = 0.5,
                 mask_threshold: float = 0.4, max_centres: int | None = 512, reference_numerics: bool = False):
        super().__init__()
        self.register_buffer("min_confidence", torch.tensor([float(min_confidence)]))
        self.in_channels = in_channels
        self.encoder = build("stcln_encoder", in_channels=in_channels, positions=positions, dropout=dropout,
                             **(encoder_kwargs or {}))
        self.pyramid = STCLNPyramid(self.encoder.d_model, tuple(pyramid_widths))
        self.build_heads(pyramid_widths[0], sum(pyramid_widths), num_classes, shape_size, mask_conv,
                         min_confidence, min_remain, mask_threshold, max_centres, reference_numerics, "reflect")

    def features(self, x, dates, pad_mask):
        check_inputs(x, dates, pad_mask, self.in_channels, "stcln_paps")
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"stcln_paps: H and W must be divisible by 8, got {tuple(x.shape[-2:])}")
        feats, _ = self.encoder(x, dates, pad_mask)
        return self.pyramid(feats, pad_mask)
