"""The fine-tuning stage's config sections (shared ones in sitskit.stage.sections; docs/finetuning.md)."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Literal

from sitskit.stage.config import check, finite
from sitskit.stage.sections import OptimSection, OutputSection, RunSection, TrainSection

LabelSubset = int | float | str | list[int] | None


@dataclass
class FinetuneRunSection(RunSection):
    experiment: str = "sitskit-finetune"
    """MLflow experiment name"""


@dataclass
class FinetuneDataSection:
    """data: training / validation / test selections and how samples are read (docs/datasets.md)."""
    path: str | None = None
    """HDF5 file written by `python data_prep.py pastis|mtlcc|geotiff` (required)"""
    folds: list[int] = field(default_factory=list)
    """PASTIS training folds ([] with a label_subset list: the list decides)"""
    val_folds: list[int] = field(default_factory=list)
    """PASTIS validation folds ([] = no validation unless val_label_subset is set)"""
    test_folds: list[int] = field(default_factory=list)
    """PASTIS test folds, scored after training with the best model ([] = none)"""
    split: str | None = None
    """MTLCC / geotiff training split (train)"""
    val_split: str | None = None
    """MTLCC / geotiff validation split"""
    test_split: str | None = None
    """MTLCC / geotiff test split (MTLCC: eval)"""
    years: list[int] = field(default_factory=list)
    """MTLCC years of every selection ([] = all)"""
    label_subset: LabelSubset = None
    """limited labels: a fraction (0.02), N patches per class (5), a protocol list (stcln_pastis_train) or ids"""
    val_label_subset: LabelSubset = None
    """the validation selection's subset (e.g. stcln_pastis_val)"""
    norm: Literal["source", "train", "none"] = "source"
    """standardisation: the source's statistics of the training folds, pooled over the training patches, or none"""
    crop: int | None = None
    """training crop size in px; null = full patches"""
    crop_mode: Literal["random", "grid"] = "random"
    """one random crop per patch and epoch, or every grid cell"""
    crop_cells: list[tuple[int, int]] | None = None
    """explicit crop cells (row, col) in crop units, e.g. STCLN's [[0, 0], [1, 1]]"""
    num_dates: int | None = None
    """draw this many dates per training access (MTLCC: 30); null = all"""
    eval_num_dates: int | None = None
    """dates drawn per validation / test patch (a fixed, seeded draw; the cross-year protocol's T = 12); null = all"""
    max_doy: int | None = None
    """early season: only dates up to this day of year, in training and evaluation"""
    max_date: str | None = None
    """early season: only dates up to this date (YYYY-MM-DD), in training and evaluation"""
    augment: bool = False
    """time-consistent flips and 90-degree rotations"""
    noise_sigma: float = 0.0
    """Gaussian noise augmentation: sigma in reflectance units"""
    noise_prob: float = 0.0
    """share of training samples that get the noise"""
    sat: str = "S2"
    """which series"""
    batch_size: int = 2
    """training samples per batch and process"""
    eval_batch_size: int = 1
    """patches per forward in validation / test"""
    num_workers: int = 0
    """DataLoader worker processes"""

    def __post_init__(self):
        check(self.path is not None, "data.path is required: pass --data.path FILE.h5 "
              "(made by `python data_prep.py pastis|mtlcc`)")
        check(self.crop is None or self.crop >= 1, f"data.crop must be >= 1; got {self.crop}")
        check(self.num_dates is None or self.num_dates >= 1, f"data.num_dates must be >= 1; got {self.num_dates}")
        check(self.eval_num_dates is None or self.eval_num_dates >= 1,
              f"data.eval_num_dates must be >= 1; got {self.eval_num_dates}")
        check(self.max_doy is None or 1 <= self.max_doy <= 366, f"data.max_doy must be in 1..366; got {self.max_doy}")
        if self.max_date is not None:
            try:
                _dt.date.fromisoformat(str(self.max_date))
            except ValueError:
                raise ValueError(f"data.max_date must be a date YYYY-MM-DD; got {self.max_date!r}") from None
        if isinstance(self.label_subset, float):
            check(0 < self.label_subset <= 1, f"data.label_subset as a fraction must be in (0, 1]; got {self.label_subset}")
        if isinstance(self.label_subset, int) and not isinstance(self.label_subset, bool):
            check(self.label_subset >= 1, f"data.label_subset as patches per class must be >= 1; got {self.label_subset}")
        check(finite(self.noise_sigma) and self.noise_sigma >= 0, f"data.noise_sigma must be >= 0; got {self.noise_sigma}")
        check(finite(self.noise_prob) and 0 <= self.noise_prob <= 1, f"data.noise_prob must be in [0, 1]; got {self.noise_prob}")
        check(self.batch_size >= 1, f"data.batch_size must be >= 1; got {self.batch_size}")
        check(self.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1; got {self.eval_batch_size}")
        check(self.num_workers >= 0, f"data.num_workers must be >= 0; got {self.num_workers}")
        if self.crop_cells is not None:
            check(self.crop is not None, "data.crop_cells needs data.crop")


@dataclass
class FinetuneModelSection:
    """model: what is trained, from which weights, and which parts learn."""
    name: str = "stcln"
    """registered model (sitskit.models.list_models()): stcln (encoder + STA head), utae, …"""
    kwargs: dict = field(default_factory=dict)
    """keyword arguments of sitskit.models.build (per key: --model.kwargs.dropout 0.2)"""
    pretrained: str | None = None
    """encoder weights: pretrain.py's export folder, an MLflow runs:/<id>/encoder URI, or a released STCLN
    checkpoint file; null = from scratch"""
    freeze_encoder: bool = False
    """train only the head (linear probe of the encoder)"""
    encoder_lr: float | None = None
    """learning rate of the encoder (null = optim.lr)"""

    def __post_init__(self):
        check(self.encoder_lr is None or (finite(self.encoder_lr) and self.encoder_lr > 0),
              f"model.encoder_lr must be a positive number; got {self.encoder_lr}")


@dataclass
class LossSection:
    """loss: cross-entropy; void (PASTIS 19, MTLCC 0) is always ignored."""
    class_weights: Literal["inverse_frequency", "inverse_sqrt"] | list[float] | None = None
    """null = uniform; inverse_frequency / inverse_sqrt of the training pixels; or one weight per class"""
    ignore_background: bool = False
    """also ignore PASTIS background (0), as the STCLN reference"""
    label_smoothing: float = 0.0
    """cross-entropy label smoothing"""

    def __post_init__(self):
        check(finite(self.label_smoothing) and 0 <= self.label_smoothing < 1,
              f"loss.label_smoothing must be in [0, 1); got {self.label_smoothing}")


@dataclass
class EvalSection:
    """eval: validation each epoch, best checkpoint, early stopping, and how full patches are scored."""
    protocol: Literal["sitskit", "utae", "stcln"] = "sitskit"
    """metric protocol (docs/metrics.md): sitskit (clean), utae or stcln (each reference's meter, biases included)"""
    metric: Literal["OA", "mIoU", "mF1", "kappa"] = "mIoU"
    """validation metric that picks the best checkpoint (STCLN: OA)"""
    every: int = 1
    """epochs between validations"""
    patience: int = 0
    """early stopping: validations without improvement before stopping (0 = never)"""
    window: int | None = None
    """score full patches with an overlapping sliding window of this size (null = one forward per patch)"""
    overlap: float = 0.5
    """sliding-window overlap"""
    figures: int = 3
    """patches drawn as RGB / truth / prediction / error maps"""

    def __post_init__(self):
        check(self.every >= 1, f"eval.every must be >= 1; got {self.every}")
        check(self.patience >= 0, f"eval.patience must be >= 0; got {self.patience}")
        check(self.window is None or self.window >= 1, f"eval.window must be >= 1; got {self.window}")
        check(finite(self.overlap) and 0 <= self.overlap < 1, f"eval.overlap must be in [0, 1); got {self.overlap}")
        check(self.figures >= 0, f"eval.figures must be >= 0; got {self.figures}")


@dataclass
class FinetuneTrainSection(TrainSection):
    epochs: int = 100
    """passes over the training data"""
    task: Literal["semantic", "panoptic"] = "semantic"
    """semantic segmentation, or panoptic (PaPs; needs instance annotations)"""


SECTIONS = {"run": FinetuneRunSection, "output": OutputSection, "data": FinetuneDataSection,
            "model": FinetuneModelSection, "loss": LossSection, "eval": EvalSection, "optim": OptimSection,
            "train": FinetuneTrainSection}
