"""Which pixel-dates to hide from the encoder during masked pre-training (STCLN, docs/pretraining.md).

Strategies (all share the mask across the channels of a pixel-date):
- "time-space": each (date, pixel) independently; STCLN's default ("batchtimespace").
- "time":       whole dates (every pixel of the crop at that date); STCLN's "batchtime".
- "space":      whole pixel series (a pixel at every eligible date).

Vegetation gating (STCLN): a date is *eligible* for masking only when more than `min_fraction` (0.9) of
the crop's pixels have NDVI > `ndvi_threshold` (0.2); other dates are never masked. Padded dates are never
eligible, so they are neither masked nor counted.

Sampling "exact" masks round(ratio × eligible) entries per sample (MAE-style ranking of uniform noise),
so the share is exact and the loss is never empty by chance; "bernoulli" draws each entry independently
with probability `ratio`, as the reference's `F.dropout` does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

STRATEGIES = ("time-space", "time", "space")
SAMPLINGS = ("exact", "bernoulli")


def random_masking(
    shape: Sequence[int],
    ratio: float,
    strategy: str = "time-space",
    eligible: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sampling: str = "exact",
) -> torch.Tensor:
    """Draw a mask. `shape` = (B, T, H, W); `eligible`, `pad_mask`: bool [B, T] (True = may be masked,
    True = padded). Returns bool [B, T, H, W], True = masked. Drawn on the generator's device (CPU by
    default) so the same seed gives the same mask on any accelerator."""
    if strategy not in STRATEGIES:
        raise ValueError(f"mask strategy must be one of {STRATEGIES}, got {strategy!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"mask sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    B, T, H, W = shape
    device = generator.device if generator is not None else torch.device("cpu")
    date_ok = torch.ones(B, T, dtype=torch.bool, device=device)
    if eligible is not None:
        date_ok &= eligible.to(device=device, dtype=torch.bool)
    if pad_mask is not None:
        date_ok &= ~pad_mask.to(device=device, dtype=torch.bool)

    if strategy == "time":  # units: dates
        unit_ok = date_ok  # [B, T]
    elif strategy == "space":  # units: pixels that have at least one eligible date
        unit_ok = date_ok.any(dim=1, keepdim=True).expand(B, H * W)  # [B, HW]
    else:  # units: (date, pixel) pairs
        unit_ok = date_ok[:, :, None].expand(B, T, H * W).reshape(B, T * H * W)
    chosen = _choose(unit_ok, ratio, generator, sampling)

    if strategy == "time":
        mask = chosen[:, :, None, None].expand(B, T, H, W)
    elif strategy == "space":
        mask = chosen.view(B, 1, H, W) & date_ok[:, :, None, None]
    else:
        mask = chosen.view(B, T, H, W)
    return mask.contiguous()


def _choose(unit_ok: torch.Tensor, ratio: float, generator: torch.Generator | None, sampling: str) -> torch.Tensor:
    """unit_ok: bool [B, N]. Pick a `ratio` share of the True units in each row."""
    noise = torch.rand(unit_ok.shape, generator=generator, device=unit_ok.device)
    if sampling == "bernoulli":
        return (noise < ratio) & unit_ok
    noise = noise.masked_fill(~unit_ok, 2.0)  # ineligible units sort last
    order = noise.argsort(dim=1)
    k = torch.round(unit_ok.sum(dim=1, keepdim=True) * ratio)
    # unit order[:, j] has rank j: scatter "rank < k" back instead of a second argsort (same mask)
    in_first_k = torch.arange(unit_ok.shape[1], device=unit_ok.device)[None, :] < k
    return torch.zeros_like(unit_ok).scatter_(1, order, in_first_k) & unit_ok


def ndvi(red: torch.Tensor, nir: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """(NIR − Red) / (NIR + Red + eps), elementwise; eps as in the reference."""
    return (nir - red) / (nir + red + eps)


def vegetation_eligibility(
    image: torch.Tensor,
    red_index: int,
    nir_index: int,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    ndvi_threshold: float = 0.2,
    min_fraction: float = 0.9,
    pad_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """STCLN's date gating. image: [B, T, C, H, W] network input; mean/std: [C] to undo the
    standardisation first (raw = image·std + mean) — pass None to compute on the input as the reference
    does. Returns bool [B, T]: True where more than `min_fraction` of the pixels have NDVI > threshold
    (and the date is not padded)."""
    red = image[:, :, red_index].float()
    nir = image[:, :, nir_index].float()
    if mean is not None and std is not None:
        mean = torch.as_tensor(mean, dtype=torch.float32, device=image.device)
        std = torch.as_tensor(std, dtype=torch.float32, device=image.device)
        red = red * std[red_index] + mean[red_index]
        nir = nir * std[nir_index] + mean[nir_index]
    vegetated = (ndvi(red, nir) > ndvi_threshold).float().mean(dim=(-2, -1))  # [B, T]
    ok = vegetated > min_fraction
    if pad_mask is not None:
        ok &= ~pad_mask.to(ok.device)
    return ok


def step_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """A CPU generator whose stream is a pure function of (seed, global step, rank, micro-step), so a
    resumed run draws exactly the masks an uninterrupted one would."""
    g = torch.Generator()
    g.manual_seed(step_seed(seed, step, rank, micro))
    return g


def step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    # Mix with large odd constants (splitmix-style) so neighbouring (step, rank) pairs get unrelated streams.
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB
         + micro * 0xD6E8FEB86659FD93) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class MaskGenerator:
    """Builds the mask of one micro-batch from the pre-training config and the dataset's band layout.

    band_names: the dataset's bands (B4 and B8 are looked up by name); norm_mean/norm_std: [C] such that
    image = (raw − mean) / std. ndvi_on = "reflectance" un-normalises first (true NDVI), "input" computes
    on the network input as STCLN's PASTIS script does.
    """

    def __init__(self, ratio: float, strategy: str = "time-space", sampling: str = "exact", gating: bool = True,
                 ndvi_threshold: float = 0.2, min_fraction: float = 0.9, ndvi_on: str = "reflectance",
                 band_names: Sequence[str] | None = None, norm_mean=None, norm_std=None,
                 red_band: str = "B4", nir_band: str = "B8"):
        if strategy not in STRATEGIES:
            raise ValueError(f"mask.strategy must be one of {STRATEGIES}, got {strategy!r}")
        if ndvi_on not in ("reflectance", "input"):
            raise ValueError(f"mask.ndvi_on must be 'reflectance' or 'input', got {ndvi_on!r}")
        self.ratio, self.strategy, self.sampling = ratio, strategy, sampling
        self.gating, self.ndvi_threshold, self.min_fraction = gating, ndvi_threshold, min_fraction
        self.mean = self.std = None
        if gating:
            bands = list(band_names or [])
            missing = [b for b in (red_band, nir_band) if b not in bands]
            if missing:
                raise ValueError(f"vegetation gating needs bands {missing} but the dataset has {bands}; "
                                 f"set mask.gating false or mask.red_band/mask.nir_band")
            self.red, self.nir = bands.index(red_band), bands.index(nir_band)
            if ndvi_on == "reflectance":
                if norm_mean is None or norm_std is None:
                    raise ValueError("mask.ndvi_on=reflectance needs the dataset's norm_mean/norm_std")
                self.mean = torch.as_tensor(norm_mean, dtype=torch.float32)
                self.std = torch.as_tensor(norm_std, dtype=torch.float32)

    def eligible(self, image: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """bool [B, T]: dates that may be masked."""
        B, T = image.shape[:2]
        if not self.gating:
            ok = torch.ones(B, T, dtype=torch.bool, device=image.device)
            return ok if pad_mask is None else ok & ~pad_mask.to(image.device)
        return vegetation_eligibility(image, self.red, self.nir, self.mean, self.std, self.ndvi_threshold,
                                      self.min_fraction, pad_mask)

    def __call__(self, image: torch.Tensor, pad_mask: torch.Tensor | None, generator: torch.Generator):
        """image: [B, T, C, H, W]. Returns (mask bool [B, T, H, W] on image.device, eligible bool [B, T])."""
        B, T, _, H, W = image.shape
        eligible = self.eligible(image, pad_mask).cpu()
        pad = None if pad_mask is None else pad_mask.cpu()
        mask = random_masking((B, T, H, W), self.ratio, self.strategy, eligible, pad, generator, self.sampling)
        return mask.to(image.device, non_blocking=True), eligible
