"""PaPs on U-TAE / STCLN: reference layout and parameter counts, centres, masks, pseudo-NMS, loss, targets."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sitskit.errors import UserFacingError
from sitskit.models import build, load_state_dict_checked, save_pretrained
from sitskit.models.checkpoints import load_pretrained_encoder
from sitskit.models.paps import zone_centres
from sitskit.models.paps_loss import PaPsLoss, check_panoptic_targets

REFERENCE = Path("/work/shared/reference/utae_state_dicts.json")
TINY = {"encoder_widths": (16, 16, 16, 32), "decoder_widths": (16, 16, 16, 32), "d_model": 64}
TINY_STCLN = {"encoder_kwargs": {"widths": (8, 32), "n_head": 2, "d_ffn": 32, "n_layers": 1, "norm_groups": 4},
              "pyramid_widths": (8, 8, 16, 32)}


def n_trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def inputs(b=2, t=4, h=32, w=32, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, c, h, w, generator=g), (torch.arange(t) * 15 + 3)[None].repeat(b, 1)


def reference_layout():
    if REFERENCE.is_file():
        return json.loads(REFERENCE.read_text())["utae_paps"]["state_dict"]
    pytest.skip("reference key layout not available on this machine")


def test_parameter_counts_and_variants():
    model = build("utae_paps")
    assert n_trainable(model) == 1_259_673
    assert n_trainable(model) - n_trainable(model.encoder.out_conv) == 1_244_541
    assert n_trainable(model.heatmap_conv) == 9_603 and n_trainable(model.shape_mlp) == 66_176
    assert n_trainable(model.size_mlp) == 41_666 and n_trainable(model.class_mlp) == 42_708
    assert n_trainable(model.mask_cnn) == 2_657
    assert n_trainable(build("utae_paps", shape_size=24)) == 1_300_953
    assert n_trainable(build("utae_paps", mask_conv=False)) == 1_257_016


def test_reference_state_dict_loads_strictly():
    layout = reference_layout()
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state = {k: torch.full(shape, 0.5, dtype=dtypes[dt]) if dt == "float32" else torch.zeros(shape, dtype=torch.int64)
             for k, shape, dt in layout}
    state["min_confidence"] = torch.tensor([0.37])
    for numerics in (False, True):
        model = build("utae_paps", reference_numerics=numerics)
        assert sorted(model.state_dict()) == sorted(state)
        load_state_dict_checked(model, state, source="reference")
        assert float(model.min_confidence) == pytest.approx(0.37)
        assert float(model.mask_cnn[5].bias.detach()) == 0.5
    state.pop("mask_cnn.0.weight")
    with pytest.raises(UserFacingError, match="missing keys"):
        load_state_dict_checked(build("utae_paps"), state, source="reference")


def test_batch_size_one_inference():
    model = build("utae_paps", **TINY).eval()
    x, dates = inputs(b=1)
    with torch.no_grad():
        out = model(x, dates)
    assert out["heatmap"].shape == (1, 1, 32, 32) and out["saliency"].shape == (1, 1, 32, 32)
    assert out["pano_instance"].shape == (1, 32, 32) and out["pano_semantic"].shape == (1, 20, 32, 32)
    assert out["pano_class"].shape == (1, 32, 32) and len(out["instance_class"]) == 1
    n = out["centres"].shape[0]
    assert n > 0 and out["size"].shape == (n, 2) and out["class_logits"].shape == (n, 20)
    assert out["shape_logits"].shape == (n, 16, 16) and out["confidence"].shape == (n,)
    ids = out["pano_instance"].unique()
    assert ids.tolist() == list(range(int(ids.max()) + 1))  # contiguous ids from 0 (none)


def test_padded_dates_change_nothing():
    model = build("utae_paps", **TINY).eval()
    x, dates = inputs(b=1, t=4)
    xp = torch.cat([x, torch.zeros(1, 2, *x.shape[2:])], dim=1)
    dp = torch.cat([dates, torch.zeros(1, 2, dtype=dates.dtype)], dim=1)
    pad = torch.tensor([[False] * 4 + [True] * 2])
    with torch.no_grad():
        a, b = model(x, dates), model(xp, dp, pad)
    torch.testing.assert_close(a["heatmap"], b["heatmap"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["saliency"], b["saliency"], atol=1e-5, rtol=1e-5)
    assert torch.equal(a["centres"], b["centres"])
    assert torch.equal(a["pano_instance"], b["pano_instance"])


def test_max_centres_caps_an_untrained_model_on_128px():
    model = build("utae_paps", **TINY, max_centres=64).eval()
    x, dates = inputs(b=2, t=2, h=128, w=128)
    with torch.no_grad():
        out_maps = model.features(x, dates, None)
        heat = model.heatmap_conv(out_maps[0])[:, 0]
    model.max_centres = None
    uncapped = model.detect_centres(heat)
    assert uncapped.shape[0] > 1000  # thousands of candidate centres before the cap
    model.max_centres = 64
    capped = model.detect_centres(heat)
    assert torch.bincount(capped[:, 0]).tolist() == [64, 64]
    # the cap keeps each image's highest local maxima
    for img in range(2):
        kept = heat[img][capped[capped[:, 0] == img, 1], capped[capped[:, 0] == img, 2]]
        rest = uncapped[uncapped[:, 0] == img]
        assert float(kept.min()) >= float(heat[img][rest[:, 1], rest[:, 2]].sort(descending=True).values[63])
    with torch.no_grad():
        out = model(x, dates)
    assert out["centres"].shape[0] == 128 and out["pano_instance"].shape == (2, 128, 128)


def test_detect_centres_local_maxima_and_threshold():
    model = build("utae_paps", **TINY).eval()
    heat = torch.full((2, 8, 8), 0.1)
    heat[0, 2, 2], heat[0, 5, 6], heat[0, 5, 5] = 0.9, 0.8, 0.7  # (5,5) is not a 3x3 maximum
    heat[1, 1, 1] = 0.3
    centres = model.detect_centres(heat)
    assert centres.tolist() == [[0, 2, 2], [0, 5, 6], [1, 1, 1]]
    # reference numerics: one threshold for the batch (its mean), which here drops image 1's maximum
    heat[1] = 0.11
    heat[1, 1, 1] = 0.12
    model.reference_numerics = True
    assert model.detect_centres(heat).tolist() == [[0, 2, 2], [0, 5, 6]]
    model.reference_numerics = False
    assert model.detect_centres(heat).tolist() == [[0, 2, 2], [0, 5, 6], [1, 1, 1]]


def test_zone_centres_one_per_zone_at_the_maximum():
    heat = torch.rand(2, 6, 6)
    zones = torch.zeros(2, 6, 6, dtype=torch.int64)
    zones[0, :3], zones[0, 3:] = 1, 2
    zones[1, :, :2] = 3  # image 1: zone 0 (no parcel) elsewhere, never a centre
    centres, zone = zone_centres(heat, zones)
    assert zone.tolist() == [1, 2, 3] and centres[:, 0].tolist() == [0, 0, 1]
    for (b, i, j), z in zip(centres.tolist(), zone.tolist()):
        assert heat[b, i, j] == heat[b][zones[b] == z].max()
    assert zone_centres(heat, torch.zeros_like(zones))[0].shape == (0, 3)


def reference_masks(model, shape_logits, saliency, centres, size):
    """Per-centre loop as utae-paps does it: resize to the box, crop to the image, add saliency, mask_cnn."""
    h, w = saliency.shape[-2:]
    masks = []
    for k in range(centres.shape[0]):
        b, ci, cj = centres[k].tolist()
        sh, sw = size[k].round().clamp(min=1).long().tolist()
        r0, c0 = ci - sh // 2, cj - sw // 2
        full = F.interpolate(shape_logits[k][None, None], size=(sh, sw), mode="bilinear", align_corners=False)[0, 0]
        rs, re_, cs, ce = max(r0, 0), min(r0 + sh, h), max(c0, 0), min(c0 + sw, w)
        crop = full[rs - r0:re_ - r0, cs - c0:ce - c0]
        m = crop + saliency[b, 0, rs:re_, cs:ce]
        masks.append(torch.sigmoid(m) * torch.sigmoid(model.mask_cnn(m[None, None])[0, 0]))
    return masks


@pytest.mark.parametrize("h,w", [(16, 16), (16, 24)])
def test_batched_masks_equal_the_per_centre_loop(h, w):
    torch.manual_seed(0)
    model = build("utae_paps", **TINY).eval()
    for p in model.mask_cnn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    saliency = torch.randn(2, 1, h, w)
    centres = torch.tensor([[0, 0, 0], [0, 8, 8], [1, 15, w - 1], [1, 3, 12], [0, 10, 2]])
    size = torch.tensor([[5.0, 3.2], [20.0, 30.0], [7.6, 4.0], [1.0, 1.0], [4.0, 9.0]])  # clipped, huge, tiny
    shape = torch.randn(5, 16, 16)
    with torch.no_grad():
        got = model.instance_masks(shape, saliency, centres, size)
        want = reference_masks(model, shape, saliency, centres, size)
    for k, m in enumerate(want):
        r0 = int(got["box_start"][k, 0])
        assert got["box_extent"][k].tolist() == list(m.shape)
        assert r0 == max(0, centres[k, 1].item() - int(size[k, 0].round()) // 2)
        torch.testing.assert_close(got["mask_prob"][k, :m.shape[0], :m.shape[1]], m, atol=1e-5, rtol=1e-4)
        assert float(got["mask_prob"][k][~got["box_valid"][k]].abs().sum()) == 0.0


def test_reference_numerics_clamp_both_axes_to_h():
    model = build("utae_paps", **TINY)
    centres, size = torch.tensor([[0, 4, 20]]), torch.tensor([[3.0, 9.0]])
    start, extent, _, _ = model.boxes(centres, size, 8, 24)
    assert start.tolist() == [[3, 16]] and extent.tolist() == [[3, 8]]  # stop 25 clamped to W = 24
    model.reference_numerics = True
    start, extent, _, _ = model.boxes(centres, size, 8, 24)
    assert start.tolist() == [[3, 8]] and extent.tolist() == [[3, 0]]  # columns clamped to H = 8


def detections(masks, confidence, classes):
    """A detections dict for `combine` with full-image boxes."""
    n, h, w = masks.shape
    logits = torch.full((n, 20), -5.0)
    logits[torch.arange(n), torch.tensor(classes, dtype=torch.int64)] = 5.0
    return {"centres": torch.zeros(n, 3, dtype=torch.int64), "confidence": torch.tensor(confidence, dtype=torch.float32),
            "class_logits": logits, "mask_prob": masks.float(), "box_valid": torch.ones(n, h, w, dtype=torch.bool),
            "box_start": torch.zeros(n, 2, dtype=torch.int64)}


def test_pseudo_nms_overlap_rule():
    model = build("utae_paps", **TINY).eval()
    m = torch.zeros(5, 4, 10)
    m[0, :, 0:4] = 1  # A, conf 0.9: 16 px
    m[1, :, 2:7] = 1  # B, conf 0.8: 20 px, 8 over A -> 12/20 = 0.6 free > 0.5: kept, its free pixels only
    m[2, :, 4:8] = 1  # C, conf 0.7: 16 px, 12 over A|B -> 4/16 free: dropped
    m[3, :, 7:10] = 1  # D, conf 0.6: 12 px; over B? no; over C (dropped) -> 4 of C's pixels do not count: kept
    m[4, :, 8:10] = 1  # E, conf 0.1 < min_confidence 0.2: dropped
    out = model.combine(detections(m, [0.9, 0.8, 0.7, 0.6, 0.1], [1, 2, 3, 4, 5]), 1, 4, 10)
    inst = out["pano_instance"][0]
    assert (inst == inst[:1]).all() and inst[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert out["instance_class"][0].tolist() == [1, 2, 4]
    assert out["instance_score"][0].tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert out["pano_class"][0, 0].tolist() == [1, 1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert out["pano_semantic"][0, 4, 0, 9] == 5.0 and out["pano_semantic"][0, :, 0, 0].sum() == 5.0 - 19 * 5.0
    # the same masks given in another order give the same map (the order is the confidence's)
    perm = torch.tensor([3, 1, 4, 0, 2])
    det = detections(m[perm], [[0.9, 0.8, 0.7, 0.6, 0.1][i] for i in perm], [[1, 2, 3, 4, 5][i] for i in perm])
    assert torch.equal(model.combine(det, 1, 4, 10)["pano_instance"], out["pano_instance"])
    empty = model.combine(detections(m[:0], [], []), 2, 4, 10)
    assert int(empty["pano_instance"].abs().sum()) == 0 and empty["instance_class"][1].numel() == 0


def test_pseudo_nms_chain_needs_sequential_decisions():
    # X1 > X2 > X3 by confidence; X2 is dropped by X1, so X3 (which only overlaps X2) keeps all its pixels
    model = build("utae_paps", **TINY).eval()
    m = torch.zeros(3, 1, 10)
    m[0, 0, 0:4] = 1
    m[1, 0, 1:6] = 1  # 5 px, 3 over X1 -> 2/5 free: dropped
    m[2, 0, 4:7] = 1  # 3 px, 2 over X2 only: were X2 kept, X3 would be dropped (1/3 free)
    out = model.combine(detections(m, [0.9, 0.8, 0.7], [1, 1, 1]), 1, 1, 10)
    assert out["pano_instance"][0, 0].tolist() == [1, 1, 1, 1, 2, 2, 2, 0, 0, 0]


def panoptic_batch(b=2, h=32, w=32, parcels=True):
    instances = torch.zeros(b, h, w, dtype=torch.int64)
    semantic = torch.zeros(b, h, w, dtype=torch.int64)
    heatmap = torch.zeros(b, h, w)
    zones = torch.zeros(b, h, w, dtype=torch.int64)
    size = torch.zeros(b, 2, h, w)
    obj = torch.zeros(b, h, w, dtype=torch.int64)
    if parcels:
        for img in range(b):
            zones[img, :, : w // 2], zones[img, :, w // 2:] = 1, 2
            instances[img, 2:12, 2:10], semantic[img, 2:12, 2:10] = 1, 3
            instances[img, 16:30, 20:30], semantic[img, 16:30, 20:30] = 2, 19  # a void parcel
            heatmap[img, 7, 6] = heatmap[img, 23, 25] = 1.0
            heatmap[img, 6:9, 5:8] = torch.maximum(heatmap[img, 6:9, 5:8], torch.tensor(0.5))
            size[img, :, :, : w // 2] = torch.tensor([10.0, 8.0])[:, None, None]
            size[img, :, :, w // 2:] = torch.tensor([14.0, 10.0])[:, None, None]
            obj[img, :, : w // 2], obj[img, :, w // 2:] = 3, 19
    return {"semantic": semantic, "heatmap": heatmap, "instances": instances, "zones": zones, "size": size,
            "object_class": obj, "id": [f"p{i}" for i in range(b)]}


@pytest.mark.parametrize("reference_numerics", [False, True])
def test_loss_trains_every_head(reference_numerics):
    model = build("utae_paps", **TINY, reference_numerics=reference_numerics).train()
    batch = panoptic_batch()
    x, dates = inputs()
    out = model(x, dates, zones=batch["zones"])
    assert out["centre_zone"].tolist() == [1, 2, 1, 2] and "pano_instance" not in out
    losses = PaPsLoss(reference_numerics=reference_numerics)(out, batch)
    assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in ("loss", "centre", "size", "class", "shape"))
    assert torch.isclose(losses["loss"], losses["centre"] + losses["size"] + losses["class"] + losses["shape"])
    assert losses["mask_iou"].shape == losses["mask_confidence"].shape == (4,)
    losses["loss"].backward()
    for name in ("heatmap_conv", "saliency_conv", "shape_mlp", "size_mlp", "class_mlp", "mask_cnn", "encoder"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), name
    # the void zone (class 19) is left out of the class term: only the class-3 centres count
    cls_only = F.cross_entropy(out["class_logits"][out["centre_zone"] == 1], torch.tensor([3, 3]))
    assert torch.isclose(losses["class"], cls_only)


def test_loss_finite_without_parcels_and_with_one_centre():
    model = build("utae_paps", **TINY).train()
    x, dates = inputs(b=1)
    batch = panoptic_batch(b=1, parcels=False)
    out = model(x, dates, zones=batch["zones"])
    losses = PaPsLoss()(out, batch)
    assert out["centres"].shape[0] == 0
    assert torch.isfinite(losses["loss"]) and float(losses["size"].detach()) == float(losses["shape"].detach()) == 0.0
    losses["loss"].backward()
    one = panoptic_batch(b=1)
    one["zones"][one["zones"] == 2] = 1  # a single zone: one centre, BatchNorm1d in training mode still works
    out = model(x, dates, zones=one["zones"])
    assert out["centres"].shape[0] == 1 and torch.isfinite(PaPsLoss()(out, one)["loss"])


def test_shape_loss_true_bce_and_reference_quirk():
    a, b = torch.randn(50) * 3, torch.randn(50) * 3
    target = torch.rand(50) > 0.5
    p = torch.sigmoid(a) * torch.sigmoid(b)
    out = {"centres": torch.zeros(1, 3, dtype=torch.int64), "centre_zone": torch.tensor([1]),
           "box_valid": torch.ones(1, 5, 10, dtype=torch.bool), "box_start": torch.zeros(1, 2, dtype=torch.int64),
           "mask_prob": p.view(1, 5, 10), "mask_logits": torch.stack([a, b]).view(1, 2, 5, 10)}
    instances = target.long().view(1, 5, 10)
    clean, iou = PaPsLoss().shape_loss(out, instances)
    torch.testing.assert_close(clean, F.binary_cross_entropy(p, target.float()), atol=1e-5, rtol=1e-5)
    binary = p > 0.4
    assert float(iou) == pytest.approx(float((binary & target).sum() / (binary | target).sum()))
    ref, _ = PaPsLoss(reference_numerics=True).shape_loss(out, instances)
    quirk = torch.where(target, F.softplus(1 - 2 * p), F.softplus(2 * p - 1)).mean()
    torch.testing.assert_close(ref, quirk)
    assert 0.313 < float(ref) < 1.314  # log(1 + e^(1-2p)) / log(1 + e^(2p-1)) lie in [0.313, 1.313]


def test_centre_loss_value():
    heat = torch.tensor([[[0.5, 0.2], [0.1, 0.9]]])
    out = {"heatmap": heat[:, None], "heatmap_logits": torch.logit(heat)[:, None]}
    target = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    want = -(math.log(0.5) + 0.5 ** 4 * math.log(0.8) + math.log(0.9) + math.log(0.1)) / 1
    assert float(PaPsLoss().centre_loss(out, target)) == pytest.approx(want, rel=1e-5)
    assert float(PaPsLoss(reference_numerics=True).centre_loss(out, target)) == pytest.approx(want, rel=1e-4)


def test_targets_without_instances_refused():
    sample = {"image": torch.zeros(3, 10, 8, 8), "semantic": torch.zeros(8, 8, dtype=torch.int64), "id": "10000"}
    with pytest.raises(UserFacingError, match=r"patch\(es\) 10000: no instance targets.*instances"):
        check_panoptic_targets(sample)
    check_panoptic_targets(panoptic_batch(b=1))
    model = build("utae_paps", **TINY).train()
    x, dates = inputs(b=1)
    out = model(x, dates, zones=torch.zeros(1, 32, 32, dtype=torch.int64))
    with pytest.raises(UserFacingError, match="no instance targets"):
        PaPsLoss()(out, {"semantic": sample["semantic"], "id": ["10000"]})


def test_zones_and_panoptic_in_one_pass():
    model = build("utae_paps", **TINY).eval()
    batch = panoptic_batch()
    x, dates = inputs()
    with torch.no_grad():
        out = model(x, dates, zones=batch["zones"], panoptic=True)
    assert out["centre_zone"].numel() == 4 and out["detections"]["centres"].shape[0] > 4
    assert out["pano_instance"].shape == (2, 32, 32)


def test_stcln_paps_forward_and_pretrained_encoder(tmp_path):
    model = build("stcln_paps", **TINY_STCLN).eval()
    x, dates = inputs(b=1, t=3)
    with torch.no_grad():
        out = model(x, dates)
        padded = model(torch.cat([x, torch.zeros_like(x[:, :1])], 1), torch.cat([dates, dates[:, :1] * 0], 1),
                       torch.tensor([[False, False, False, True]]))
    assert out["heatmap"].shape == (1, 1, 32, 32) and out["pano_instance"].shape == (1, 32, 32)
    torch.testing.assert_close(out["heatmap"], padded["heatmap"], atol=1e-5, rtol=1e-5)
    assert out["shape_logits"].shape[1:] == (16, 16)
    encoder = build("stcln_encoder", widths=(8, 32), n_head=2, d_ffn=32, n_layers=1, norm_groups=4)
    for p in encoder.parameters():
        torch.nn.init.constant_(p, 0.25)
    save_pretrained(encoder, tmp_path / "enc")
    load_pretrained_encoder(model, tmp_path / "enc")
    assert all(torch.equal(p.detach(), torch.full_like(p, 0.25)) for p in model.encoder.parameters())
    model.train()
    batch = panoptic_batch(b=1)
    out = model(x, dates, zones=batch["zones"])
    PaPsLoss()(out, batch)["loss"].backward()
    assert model.pyramid.downs[-1].conv[0].weight.grad is not None


def sequential_pseudo_nms(masks, confidence, min_confidence, min_remain):
    """The reference's loop: by decreasing confidence, paste free pixels if > min_remain of the mask is free."""
    h, w = masks.shape[1:]
    inst = torch.zeros(h, w, dtype=torch.int64)
    next_id = 1
    for k in torch.argsort(confidence, descending=True, stable=True).tolist():
        if confidence[k] < min_confidence:
            break
        m = masks[k] > 0.4
        total = int(m.sum())
        if total == 0:
            continue
        free = m & (inst == 0)
        if int(free.sum()) == total or int(free.sum()) / total > min_remain:
            inst[free] = next_id
            next_id += 1
    return inst


@pytest.mark.parametrize("seed", range(5))
def test_pseudo_nms_matches_the_sequential_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n, h, w = 40, 16, 16
    masks = torch.zeros(n, h, w)
    for k in range(n):  # random rectangles
        r, c = torch.randint(0, h, (2,), generator=g).tolist(), torch.randint(0, w, (2,), generator=g).tolist()
        masks[k, min(r):max(r) + 1, min(c):max(c) + 1] = 1.0
    confidence = torch.rand(n, generator=g).tolist()
    model = build("utae_paps", **TINY).eval()
    out = model.combine(detections(masks, confidence, [1] * n), 1, h, w)
    want = sequential_pseudo_nms(masks, torch.tensor(confidence), 0.2, 0.5)
    assert torch.equal(out["pano_instance"][0], want)


def test_save_and_reload_keeps_the_tuned_threshold(tmp_path):
    from sitskit.models import from_pretrained

    model = build("utae_paps", **TINY, max_centres=100)
    model.min_confidence.fill_(0.42)
    save_pretrained(model, tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    assert float(again.min_confidence) == pytest.approx(0.42) and again.max_centres == 100
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.slow
def test_short_training_on_simulated_pastis_raises_pq():
    """Fit 2 simulated 32x32 PASTIS patches: PQ goes from 0 (untrained) to well above (about 1 min on 1 core)."""
    import numpy as np

    from sitskit.data.datasets import paps_object_targets
    from sitskit.finetune.panoptic import PanopticMeter
    from sitskit.simulate.pastis import season_day, simulate_pastis_patch

    torch.manual_seed(0)
    images, days, maps = [], [], {k: [] for k in ("semantic", "heatmap", "instances", "zones", "size", "object_class")}
    for pid in (10000, 10002):
        p = simulate_pastis_patch(pid, size=32, seed=0)
        idx = np.linspace(0, len(p.dates) - 1, 8).astype(int)
        images.append(p.s2[idx].astype(np.float32))
        days.append([season_day(p.dates[i], 2019) for i in idx])
        semantic = p.target[0].astype(np.int64)
        size, obj = paps_object_targets(p.instances, p.zones, semantic)
        for k, v in zip(maps, (semantic, p.heatmap, p.instances, p.zones, size, obj)):
            maps[k].append(torch.from_numpy(np.asarray(v)))
    x = torch.from_numpy(np.stack(images))
    x = (x - x.mean((0, 1, 3, 4), keepdim=True)) / x.std((0, 1, 3, 4), keepdim=True)
    dates = torch.tensor(days)
    batch = {k: torch.stack(v) for k, v in maps.items()}
    model = build("utae_paps", **TINY)

    def pq():
        model.eval()
        with torch.no_grad():
            out = model(x, dates)
        meter = PanopticMeter()
        meter.update(out["pano_instance"], out["pano_class"], batch["instances"], batch["semantic"])
        model.train()
        return meter.compute()["PQ"] or 0.0

    before = pq()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        loss = PaPsLoss(heatmap_only=step < 20)(model(x, dates, zones=batch["zones"]), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert pq() > before + 0.3
