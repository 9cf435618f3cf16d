"""Masking strategies, vegetation gating and padding (sitskit.pretrain.masking)."""
import numpy as np
import pytest
import torch

from sitskit.constants import PASTIS_BANDS
from sitskit.pretrain.engine_pretrain import grid_crops, masked_mse
from sitskit.pretrain.masking import (
    MaskGenerator,
    random_masking,
    step_generator,
    step_seed,
    vegetation_eligibility,
)

B, T, H, W = 3, 12, 8, 8


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.15, 0.4, 0.8])
def test_time_space_masks_the_exact_share_of_each_sample(ratio):
    mask = random_masking((B, T, H, W), ratio, "time-space", generator=gen())
    assert mask.dtype == torch.bool and mask.shape == (B, T, H, W)
    per_sample = mask.flatten(1).sum(1)
    assert (per_sample == round(ratio * T * H * W)).all()
    # independent per pixel-date: masked dates do not all share the same pixels
    assert not (mask[:, :1] == mask).all()


def test_time_masks_whole_dates_and_space_whole_pixel_series():
    m = random_masking((B, T, H, W), 0.5, "time", generator=gen())
    per_date = m.flatten(2)
    assert ((per_date.all(-1)) | (~per_date.any(-1))).all()  # a date is fully masked or not at all
    assert (per_date.all(-1).sum(1) == T // 2).all()
    m = random_masking((B, T, H, W), 0.25, "space", generator=gen())
    assert (m == m[:, :1]).all()  # same pixels at every date
    assert (m[:, 0].flatten(1).sum(1) == round(0.25 * H * W)).all()


@pytest.mark.parametrize("strategy", ["time-space", "time", "space"])
def test_padding_and_ineligible_dates_are_never_masked_nor_counted(strategy):
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 8:] = True  # sample 0 has 8 dates, sample 1 has 5
    pad[1, 5:] = True
    eligible = torch.ones(B, T, dtype=torch.bool)
    eligible[:, 1] = False  # a cloudy date in every sample
    eligible[2, 6:] = False
    mask = random_masking((B, T, H, W), 0.5, strategy, eligible=eligible, pad_mask=pad, generator=gen(1))
    assert not mask[pad].any() and not mask[:, 1].any() and not mask[2, 6:].any()
    allowed = eligible & ~pad  # [B, T]
    n_dates = allowed.sum(1)
    if strategy == "time-space":
        assert (mask.flatten(1).sum(1) == torch.round(n_dates * H * W * 0.5)).all()
    elif strategy == "time":
        assert (mask.flatten(2).any(-1).sum(1) == torch.round(n_dates * 0.5)).all()
    else:  # space: half the pixels, at every allowed date
        pixels = mask.any(1)
        assert (pixels.flatten(1).sum(1) == round(H * W * 0.5)).all()
        assert (mask == (pixels[:, None] & allowed[:, :, None, None])).all()


def test_bernoulli_sampling_matches_the_ratio_on_average():
    mask = random_masking((8, 20, 16, 16), 0.4, "time-space", generator=gen(), sampling="bernoulli")
    assert abs(mask.float().mean().item() - 0.4) < 0.01
    assert mask.flatten(1).sum(1).unique().numel() > 1  # not an exact count


def test_mask_is_a_function_of_seed_step_and_rank():
    draw = lambda *k: random_masking((B, T, H, W), 0.4, generator=step_generator(*k))
    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(1, 5, 0))
    assert len({step_seed(0, s, r) for s in range(100) for r in range(4)}) == 400


def _standardised_scene(ndvi_per_date, veg_share=1.0, seed=0):
    """image [1, T, 10, H, W] with reflectance whose NDVI is ndvi_per_date[t] on `veg_share` of the
    pixels (bare soil, NDVI ~0.05, elsewhere) and its mean/std."""
    rng = np.random.default_rng(seed)
    t = len(ndvi_per_date)
    raw = rng.uniform(500, 1500, (1, t, 10, H, W)).astype(np.float32)
    red = rng.uniform(550, 650, (t, H, W)).astype(np.float32)
    v = np.array(ndvi_per_date, np.float32)[:, None, None] * np.ones((t, H, W), np.float32)
    n_veg = round(veg_share * H * W)
    v.reshape(t, -1)[:, n_veg:] = 0.05
    raw[0, :, 2] = red
    raw[0, :, 6] = red * (1 + v) / (1 - v)  # NDVI(red, nir) == v
    mean = raw.mean(axis=(0, 1, 3, 4))
    std = raw.std(axis=(0, 1, 3, 4))
    image = (raw - mean[None, None, :, None, None]) / std[None, None, :, None, None]
    return torch.from_numpy(image), mean, std


def _gating_args(scene, red, nir):
    image, mean, std = scene
    return image, red, nir, mean, std


def test_vegetation_gating_on_reflectance_follows_the_thresholds():
    red, nir = PASTIS_BANDS.index("B4"), PASTIS_BANDS.index("B8")
    image, mean, std = _standardised_scene([0.1, 0.3, 0.6, 0.19, 0.8])
    ok = vegetation_eligibility(image, red, nir, mean, std)
    assert ok.tolist() == [[False, True, True, False, True]]
    # 88 % vegetated pixels is not "more than 90 %"; 95 % is
    assert not vegetation_eligibility(*_gating_args(_standardised_scene([0.6], 0.88), red, nir)).any()
    img95, m95, s95 = _standardised_scene([0.6], 0.95)
    assert vegetation_eligibility(img95, red, nir, m95, s95).all()
    assert not vegetation_eligibility(img95, red, nir, m95, s95, min_fraction=0.96).any()
    assert not vegetation_eligibility(image, red, nir, mean, std, ndvi_threshold=0.9).any()
    pad = torch.tensor([[False, False, True, False, True]])
    assert vegetation_eligibility(image, red, nir, mean, std, pad_mask=pad).tolist() == [
        [False, True, False, False, False]]


def test_reference_mode_computes_ndvi_on_the_standardised_input():
    red, nir = PASTIS_BANDS.index("B4"), PASTIS_BANDS.index("B8")
    image = torch.zeros(1, 2, 10, H, W)
    image[0, 0, nir], image[0, 0, red] = 1.0, 0.2  # "NDVI" 0.67 on z-scores
    image[0, 1, nir], image[0, 1, red] = -1.0, -0.2  # negative z-scores: "NDVI" 0.67 too
    assert vegetation_eligibility(image, red, nir).tolist() == [[True, True]]
    mean = np.full(10, 500.0, np.float32)
    std = np.full(10, 500.0, np.float32)  # un-normalised: red 600/400, nir 1000/0 -> NDVI 0.25 / -1
    assert vegetation_eligibility(image, red, nir, mean, std).tolist() == [[True, False]]


def test_mask_generator_finds_bands_by_name_and_gates_dates():
    bands = ["B8", "B3", "B4", "B2"]  # an unusual order: looked up by name
    image, mean, std = _standardised_scene([0.6, 0.05, 0.6, 0.6])
    image, mean, std = image[:, :, [6, 1, 2, 0]], mean[[6, 1, 2, 0]], std[[6, 1, 2, 0]]
    masker = MaskGenerator(0.5, "time-space", band_names=bands, norm_mean=mean, norm_std=std)
    mask, eligible = masker(image, None, gen())
    assert eligible.tolist() == [[True, False, True, True]]
    assert not mask[0, 1].any() and mask.sum() == round(0.5 * 3 * H * W)
    with pytest.raises(ValueError, match="B8"):
        MaskGenerator(0.4, band_names=["B2", "B3", "B4"], norm_mean=mean[:3], norm_std=std[:3])
    ungated = MaskGenerator(0.5, gating=False)
    assert ungated(image, None, gen())[1].all()


def test_masked_mse_ignores_unmasked_entries_and_reports_per_band():
    target = torch.zeros(2, 3, 4, 5, 5)
    pred = torch.randn(2, 3, 4, 5, 5)
    mask = torch.zeros(2, 3, 5, 5, dtype=torch.bool)
    mask[0, 1, 2, 3] = True
    mask[1, 2, 0, 0] = True
    loss, per_band = masked_mse(pred, target, mask)
    picked = torch.stack([pred[0, 1, :, 2, 3], pred[1, 2, :, 0, 0]])  # [2 pixel-dates, C]
    assert torch.allclose(loss, picked.square().mean())
    assert torch.allclose(per_band, picked.square().mean(0))
    pred2 = pred.clone()
    pred2[~mask[:, :, None].expand_as(pred)] = 1e6  # unmasked entries do not matter
    assert torch.allclose(masked_mse(pred2, target, mask)[0], loss)
    empty = masked_mse(pred, target, torch.zeros_like(mask))[0]
    assert empty.item() == 0.0


def test_grid_crops_cover_the_patch_once():
    cells = grid_crops((128, 128), 32)
    assert len(cells) == 16
    cover = torch.zeros(128, 128, dtype=torch.int64)
    for rows, cols in cells:
        cover[rows, cols] += 1
    assert (cover == 1).all()
    with pytest.raises(ValueError, match="step_crop"):
        grid_crops((48, 48), 32)
