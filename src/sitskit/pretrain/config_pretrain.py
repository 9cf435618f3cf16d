"""The pre-training stage's config sections (shared ones in sitskit.stage.sections)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sitskit.stage.config import check, finite
from sitskit.stage.sections import OptimSection, OutputSection, RunSection, TrainSection


@dataclass
class PretrainDataSection:
    """data: which patches, how they are read and batched (docs/datasets.md)."""
    path: str | None = None
    """HDF5 file written by `python data_prep.py pastis|mtlcc|geotiff` (required)"""
    folds: list[int] = field(default_factory=list)
    """PASTIS folds ([] = all); STCLN pre-trains on fold 5"""
    split: str | None = None
    """MTLCC split (train | test | eval) or geotiff split (train | val | test)"""
    years: list[int] = field(default_factory=list)
    """MTLCC years ([] = all)"""
    norm: Literal["source", "train", "none"] = "source"
    """standardisation: the source's statistics, pooled over the selected patches, or none"""
    crop: int | None = None
    """crop size in px; null = full patches"""
    crop_mode: Literal["random", "grid"] = "random"
    """one random crop per patch and epoch, or every cell of a grid"""
    num_dates: int | None = None
    """draw this many dates per access (MTLCC: 30); null = all"""
    max_doy: int | None = None
    """keep only dates up to this day of year (early season)"""
    sat: str = "S2"
    """which series (S2, or S1A/S1D in PASTIS-R)"""
    batch_size: int = 4
    """samples per batch and process"""
    num_workers: int = 0
    """DataLoader worker processes"""
    step_per_crop: bool = False
    """the paper's PASTIS loop: split each batch into a grid of step_crop crops, one optimiser step per crop"""
    step_crop: int = 32
    """crop size of step_per_crop"""
    holdout_patches: int = 2
    """patches held out of training for the held-out masked loss (0 disables it)"""

    def __post_init__(self):
        check(self.path is not None, "data.path is required: pass --data.path FILE.h5 "
              "(made by `python data_prep.py pastis|mtlcc`)")
        check(self.crop is None or self.crop >= 1, f"data.crop must be >= 1; got {self.crop}")
        check(self.num_dates is None or self.num_dates >= 1, f"data.num_dates must be >= 1; got {self.num_dates}")
        check(self.max_doy is None or 1 <= self.max_doy <= 366, f"data.max_doy must be in 1..366; got {self.max_doy}")
        check(self.batch_size >= 1, f"data.batch_size must be >= 1; got {self.batch_size}")
        check(self.num_workers >= 0, f"data.num_workers must be >= 0; got {self.num_workers}")
        check(self.step_crop >= 1, f"data.step_crop must be >= 1; got {self.step_crop}")
        check(self.holdout_patches >= 0, f"data.holdout_patches must be >= 0; got {self.holdout_patches}")


@dataclass
class PretrainModelSection:
    """model: any registered model (sitskit.models.list_models())."""
    name: str = "stcln_pretrain"
    """registered model name"""
    kwargs: dict = field(default_factory=dict)
    """keyword arguments of sitskit.models.build (per key: --model.kwargs.d_model 64)"""
    masked_only: bool = True
    """compute the last Transformer layer and the decoder on the masked pixel-dates only (the loss needs
    nothing else: the same loss and gradients, less work; docs/pretraining.md); false = every output"""


@dataclass
class MaskSection:
    """mask: which pixel-dates are hidden and reconstructed (docs/pretraining.md)."""
    strategy: Literal["time-space", "time", "space"] = "time-space"
    """time-space = random pixel-dates (STCLN); time = whole dates; space = whole pixels"""
    ratio: float = 0.4
    """share of eligible entries masked"""
    sampling: Literal["exact", "bernoulli"] = "exact"
    """exact share per sample, or independent draws (the reference's F.dropout)"""
    gating: bool = True
    """STCLN vegetation gating: only vegetated dates are eligible"""
    ndvi_threshold: float = 0.2
    """NDVI above which a pixel counts as vegetated"""
    min_fraction: float = 0.9
    """a date is eligible when more than this share of the crop is vegetated"""
    ndvi_on: Literal["reflectance", "input"] = "reflectance"
    """true NDVI of reflectances, or the reference's NDVI of standardised bands"""
    red_band: str = "B4"
    """band used as red in NDVI"""
    nir_band: str = "B8"
    """band used as near infrared in NDVI"""

    def __post_init__(self):
        check(finite(self.ratio) and 0 < self.ratio <= 1, f"mask.ratio must be in (0, 1]; got {self.ratio}")
        check(finite(self.ndvi_threshold) and -1 <= self.ndvi_threshold <= 1,
              f"mask.ndvi_threshold must be in [-1, 1]; got {self.ndvi_threshold}")
        check(finite(self.min_fraction) and 0 <= self.min_fraction < 1,
              f"mask.min_fraction must be in [0, 1) (1 or more leaves no date eligible); got {self.min_fraction}")


SECTIONS = {"run": RunSection, "output": OutputSection, "data": PretrainDataSection, "model": PretrainModelSection,
            "mask": MaskSection, "optim": OptimSection, "train": TrainSection}
