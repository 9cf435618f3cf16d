"""sitskit.finetune.inference: sliding-window prediction equals the native forward for a per-pixel model,
covers every pixel, clamps oversized windows and batches windows."""
from __future__ import annotations

import pytest
import torch

from sitskit.finetune.inference import blend_weight, predict_patch, window_starts

T, C, K = 3, 4, 5


def per_pixel_model():
    """Translation-equivariant per pixel: masked mean over valid dates, then a 1x1 conv."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, K, 1)

    def fn(x, dates, pad_mask):
        valid = (~pad_mask).float() if pad_mask is not None else torch.ones(x.shape[:2])
        mean = (x * valid[:, :, None, None, None]).sum(1) / valid.sum(1)[:, None, None, None]
        return conv(mean)
    return fn


def inputs(h, w, t=T):
    torch.manual_seed(1)
    image = torch.randn(1, t, C, h, w)
    dates = torch.arange(t)[None] * 10
    pad_mask = torch.zeros(1, t, dtype=torch.bool)
    pad_mask[0, -1] = True
    return image, dates, pad_mask


@pytest.mark.parametrize("probs", [True, False])
def test_sliding_equals_native_for_a_per_pixel_model(probs):
    fn = per_pixel_model()
    image, dates, pad_mask = inputs(40, 36)
    native = predict_patch(fn, image, dates, pad_mask, probs=probs)
    sliding = predict_patch(fn, image, dates, pad_mask, window=16, overlap=0.5, num_classes=K, probs=probs)
    assert native.shape == sliding.shape == (1, K, 40, 36)
    torch.testing.assert_close(sliding, native, atol=1e-5, rtol=1e-5)


def test_128_patch_window_32_batched():
    fn = per_pixel_model()
    calls = []

    def counting(x, d, m):
        calls.append(x.shape[0])
        assert x.shape[-2:] == (32, 32)
        return fn(x, d, m)
    image, dates, pad_mask = inputs(128, 128, t=2)
    out = predict_patch(counting, image, dates, pad_mask, window=32, overlap=0.5, batch_windows=16)
    assert len(window_starts(128, 32, 0.5)) == 7 and sum(calls) == 49
    assert calls == [16, 16, 16, 1]  # batched, not one forward per window
    torch.testing.assert_close(out, predict_patch(fn, image, dates, pad_mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 128, 128))


@pytest.mark.parametrize("size,window,overlap", [(128, 32, 0.5), (37, 16, 0.25), (50, 7, 0.9), (20, 20, 0.5)])
def test_every_pixel_is_covered(size, window, overlap):
    starts = window_starts(size, window, overlap)
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        assert 0 <= s and s + window <= size
        covered[s:s + window] = True
    assert covered.all() and starts[-1] == size - window


def test_position_dependent_model_is_blended_without_gaps():
    """A model whose output depends on the window (not equivariant): every pixel gets a finite blend of the
    windows that cover it, and a constant model stays constant."""
    image, dates, pad_mask = inputs(24, 24)
    out = predict_patch(lambda x, d, m: torch.full((x.shape[0], 2, *x.shape[-2:]), 3.0), image, dates,
                        pad_mask, window=10, overlap=0.3, probs=False)
    torch.testing.assert_close(out, torch.full((1, 2, 24, 24), 3.0))
    calls = iter(range(1000))  # window i (row-major) predicts the constant i
    out = predict_patch(lambda x, d, m: torch.stack([torch.full((2, *x.shape[-2:]), float(next(calls)))
                                                     for _ in range(x.shape[0])]),
                        image, dates, pad_mask, window=10, overlap=0.3, probs=False, batch_windows=4)
    assert window_starts(24, 10, 0.3) == [0, 7, 14]
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 23, 23] == 8  # corners: one window each
    assert 0 < out[0, 0, 8, 0] < 3  # rows 7-9 of column 0: a blend of windows 0 and 3

def test_window_larger_than_the_patch_is_clamped():
    fn = per_pixel_model()
    image, dates, pad_mask = inputs(12, 20)
    seen = []

    def spy(x, d, m):
        seen.append(tuple(x.shape[-2:]))
        return fn(x, d, m)
    out = predict_patch(spy, image, dates, pad_mask, window=(32, 8))
    assert set(seen) == {(12, 8)}
    torch.testing.assert_close(out, predict_patch(fn, image, dates, pad_mask), atol=1e-5, rtol=1e-5)


def test_blend_weight_is_positive_and_peaks_in_the_centre():
    w = blend_weight(32, 32)
    assert w.min() > 0 and w[0, 0] < 0.01 and w[15, 15] > 0.99


def test_bad_arguments():
    fn = per_pixel_model()
    image, dates, pad_mask = inputs(8, 8)
    with pytest.raises(ValueError, match="overlap"):
        predict_patch(fn, image, dates, pad_mask, window=4, overlap=1.0)
    with pytest.raises(ValueError, match="classes"):
        predict_patch(fn, image, dates, pad_mask, num_classes=K + 1)
    with pytest.raises(ValueError, match=r"\[1, T, C, H, W\]"):
        predict_patch(fn, image[0], dates, pad_mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sliding_on_cuda_with_bf16_model():
    conv = torch.nn.Conv2d(C, K, 1).cuda()

    def fn(x, d, m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return conv(x.mean(1))
    image, dates, pad_mask = (t.cuda() for t in inputs(64, 64))
    out = predict_patch(fn, image, dates, pad_mask, window=32, overlap=0.5)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out, predict_patch(fn, image, dates, pad_mask), atol=2e-2, rtol=0)
