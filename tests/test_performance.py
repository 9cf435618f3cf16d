"""Speed options keep the results: shared-memory collate in workers, channels-last U-TAE (issue 13)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from sitskit.data import pad_collate
from sitskit.models import build

torch.set_num_threads(1)


class VariableLengthSeries(Dataset):
    """Sample i: T = 2 + i % 3 dates, image filled with i + 1, label filled with i."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        t = 2 + i % 3
        return {"image": torch.full((t, 2, 3, 3), float(i + 1)), "dates": torch.arange(1, t + 1),
                "semantic": torch.full((3, 3), i), "id": f"p{i}"}


def expected_batch(indices):
    ds = VariableLengthSeries()
    return pad_collate([ds[i] for i in indices])


@pytest.mark.parametrize("workers", [0, 2])
def test_pad_collate_values_with_and_without_workers(workers):
    batches = list(DataLoader(VariableLengthSeries(), batch_size=3, collate_fn=pad_collate, num_workers=workers))
    assert len(batches) == 2
    for batch, indices in zip(batches, ([0, 1, 2], [3, 4, 5])):
        ref = expected_batch(indices)
        assert batch["id"] == [f"p{i}" for i in indices]
        for key in ("image", "dates", "semantic", "pad_mask"):
            assert torch.equal(batch[key], ref[key]), key
        # sample 0 of each batch has 2 dates of 4: the last two steps are zero and flagged
        assert batch["image"][0, 2:].abs().sum() == 0 and batch["pad_mask"][0].tolist() == [False, False, True, True]
        assert batch["image"][0, :2].unique().item() == indices[0] + 1
        # in a worker the tensors arrive in shared memory (no extra copy on the way to the main process)
        assert batch["image"].is_shared() == (workers > 0)
        assert batch["semantic"].is_shared() == (workers > 0)


def test_pad_collate_zeroes_padding_in_reused_shared_memory(monkeypatch):
    """Shared storage is not guaranteed to be zero: the padded tail must be written explicitly."""
    from sitskit.data import collate

    monkeypatch.setattr(collate, "get_worker_info", lambda: object())  # behave as inside a worker
    real_new = collate._empty_like_batch

    def dirty(elem, shape, shared):
        out = real_new(elem, shape, shared)
        assert out.is_shared()
        return out.fill_(7)

    monkeypatch.setattr(collate, "_empty_like_batch", dirty)
    ds = VariableLengthSeries()
    batch = collate.pad_collate([ds[0], ds[2]])
    assert batch["image"][0, 2:].abs().sum() == 0 and batch["dates"][0].tolist() == [1, 2, 0, 0]
    assert batch["image"][1].unique().item() == 3.0


@pytest.mark.parametrize("mode", ["clean", "reference"])
def test_utae_channels_last_same_outputs_and_gradients(mode):
    torch.manual_seed(0)
    plain = build("utae", mode=mode, encoder_widths=(16, 16, 32), decoder_widths=(16, 16, 32), n_head=4,
                  d_model=32, out_conv_width=8, channels_last=False)
    fast = build("utae", mode=mode, encoder_widths=(16, 16, 32), decoder_widths=(16, 16, 32), n_head=4,
                 d_model=32, out_conv_width=8, channels_last=True)
    fast.load_state_dict(plain.state_dict(), strict=True)
    assert fast.in_conv.conv.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.in_conv.conv.conv[0].weight.is_contiguous()
    auto = build("utae", encoder_widths=(16, 16, 32), decoder_widths=(16, 16, 32), n_head=4)
    assert auto.channels_last == torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    x = torch.randn(2, 5, 10, 16, 16)
    dates = torch.sort(torch.randint(0, 365, (2, 5)), dim=1).values
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    x[pad] = 0
    plain.eval(), fast.eval()
    with torch.no_grad():
        a, b = plain(x, dates, pad), fast(x, dates, pad)
    assert b.is_contiguous() and a.shape == b.shape == (2, 20, 16, 16)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    if mode == "reference":  # its N(0, 1) BatchNorm init amplifies summation-order noise in the gradients
        return
    for m in (plain, fast):  # train mode, dropout off: same gradients
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        m(x, dates, pad).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    maps = fast(x, dates, pad, return_maps=True)[1]  # contiguous for a panoptic head's views
    assert all(m.is_contiguous() for m in maps)


@pytest.mark.parametrize("strategy", ["time-space", "time", "space"])
def test_masks_equal_the_double_argsort_ranking(strategy):
    """The one-argsort + scatter ranking draws exactly the masks of the previous rank = argsort(argsort(noise))."""
    from sitskit.pretrain.masking import random_masking, step_generator

    b, t, h, w = 3, 7, 5, 6
    eligible = torch.rand(b, t, generator=torch.Generator().manual_seed(1)) < 0.7
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[2, 5:] = True
    for step in range(4):
        mask = random_masking((b, t, h, w), 0.4, strategy, eligible, pad, step_generator(0, step, 0))
        # the previous code, inline
        date_ok = eligible & ~pad
        unit_ok = {"time": date_ok, "space": date_ok.any(dim=1, keepdim=True).expand(b, h * w),
                   "time-space": date_ok[:, :, None].expand(b, t, h * w).reshape(b, t * h * w)}[strategy]
        noise = torch.rand(unit_ok.shape, generator=step_generator(0, step, 0)).masked_fill(~unit_ok, 2.0)
        rank = noise.argsort(dim=1).argsort(dim=1)
        chosen = (rank < torch.round(unit_ok.sum(dim=1, keepdim=True) * 0.4)) & unit_ok
        if strategy == "time":
            expected = chosen[:, :, None, None].expand(b, t, h, w)
        elif strategy == "space":
            expected = chosen.view(b, 1, h, w) & date_ok[:, :, None, None]
        else:
            expected = chosen.view(b, t, h, w)
        assert torch.equal(mask, expected)
        assert mask.any()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["att_group", "att_mean", "mean"])
def test_skip_aggregation_on_frames_equals_the_einsum_with_gradients(mode, channels_last):
    """U-TAE skips summed frame by frame on the gathered valid frames (NCHW or NHWC) against the einsum
    formula on the zero-filled [B, T, ...] maps: values and gradients, padded dates contributing nothing."""
    from einops import rearrange

    from sitskit.models.layers import gather_frames
    from sitskit.models.utae import aggregate_skip, aggregate_skip_frames
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, 6, 6, generator=g, requires_grad=True)
    attn = torch.rand(4, 2, 5, 3, 4, generator=g).softmax(2).requires_grad_()  # 3 x 4 -> 6 x 6: two ratios
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    frames = gather_frames(x, pad)
    if channels_last:
        frames = frames.contiguous(memory_format=torch.channels_last)
    out = aggregate_skip_frames(frames, attn, pad, (2, 5), mode)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    go = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (x, attn), go, allow_unused=True)

    valid = (~pad).float()
    if mode == "mean":
        ref = torch.einsum("btchw,bt->bchw", x, valid) / valid.sum(1)[:, None, None, None]
    else:
        a = attn.mean(0, keepdim=True) if mode == "att_mean" else attn
        a = torch.nn.functional.interpolate(a.flatten(0, 2)[:, None], size=(6, 6), mode="bilinear",
                                            align_corners=False).view(a.shape[0], 2, 5, 6, 6)
        a = a * valid[None, :, :, None, None]
        groups = rearrange(x, "b t (g c) h w -> g b t c h w", g=a.shape[0])
        ref = rearrange(torch.einsum("gbthw,gbtchw->bgchw", a, groups), "b g c h w -> b (g c) h w")
    ref_grads = torch.autograd.grad(ref, (x, attn), go, allow_unused=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aggregate_skip(x, attn, pad, mode), ref, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert grads[0][1, 3:].abs().max() == 0  # padded dates get no gradient


@pytest.mark.parametrize("src, dst", [((8, 8), (64, 64)), ((8, 8), (16, 16)), ((5, 7), (13, 29)), ((1, 1), (4, 4)),
                                      ((16, 16), (8, 8))])
def test_resize_by_matrix_products_equals_interpolate_with_gradients(src, dst):
    """The U-TAE attention upsampling as A_h @ maps @ A_w^T: F.interpolate's values and gradients (float64,
    odd ratios included); shrinking stays average pooling."""
    import torch.nn.functional as F

    from sitskit.models.utae import resize

    x = torch.rand(6, *src, dtype=torch.float64, requires_grad=True)
    if dst[0] >= src[0]:
        want = F.interpolate(x[:, None], size=dst, mode="bilinear", align_corners=False)[:, 0]
    else:
        want = F.adaptive_avg_pool2d(x[:, None], dst)[:, 0]
    got = resize(x, dst)
    g = torch.randn_like(want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0], rtol=0,
                               atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # attention weights stay in their dtype, as with F.interpolate
        assert resize(x.detach().float(), dst).dtype == torch.float32


def test_scatter_frames_keeps_channels_last_frames_channels_last_with_the_same_values():
    from sitskit.models.layers import scatter_frames

    frames = torch.randn(5, 6, 4, 3)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    plain = scatter_frames(frames, pad, (2, 3))
    fast = scatter_frames(frames.contiguous(memory_format=torch.channels_last), pad, (2, 3))
    assert torch.equal(plain, fast) and plain.is_contiguous()
    assert fast.stride(2) == 1 and fast.stride(4) == 6  # memory [B, T, H, W, C]
    assert fast[pad].abs().sum() == 0


def test_stcln_cnn_runs_channels_last_with_the_same_features_and_gradients():
    from sitskit.models.layers import apply_to_valid_frames

    torch.manual_seed(0)
    enc = build("stcln_encoder", widths=(8, 16), n_head=2, d_ffn=32, n_layers=1, pe_dim=8, norm_groups=4)
    x = torch.randn(2, 4, 10, 8, 8)
    pad = torch.tensor([[False] * 4, [False, False, True, True]])
    x[pad] = 0
    def nchw():
        return apply_to_valid_frames(lambda f: enc.down1(enc.inc(f)), x, pad)

    fast = enc.embed_frames(x, pad)
    assert fast.stride(2) == 1  # D innermost: per-pixel tokens are gathered from contiguous runs
    torch.testing.assert_close(fast, nchw(), atol=1e-5, rtol=0)
    grads = []
    for run in (lambda: enc.embed_frames(x, pad), nchw):
        enc.zero_grad()
        run().square().mean().backward()
        grads.append([p.grad.clone() for p in enc.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
