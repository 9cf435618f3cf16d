"""Config sections shared by every training stage (pretrain, finetune). Each field's docstring is its `--help`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sitskit.stage.config import check, finite


@dataclass
class RunSection:
    """run: seed, logging and tracking."""
    experiment: str = "sitskit"
    """MLflow experiment name"""
    seed: int = 0
    """seed of model init, data order, crops, masks and dropout (a resumed run repeats the same streams)"""
    log_every: int = 10
    """optimiser steps between logged metrics"""
    tracking: bool = True
    """log to MLflow ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)"""
    figure: bool = True
    """log the stage's figures to MLflow at the end"""
    progress: bool = True
    """show a progress bar"""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): identical metrics across repeated runs on the same hardware"""

    def __post_init__(self):
        check(self.log_every >= 1, f"run.log_every must be >= 1; got {self.log_every}")
        check(0 <= self.seed < 2 ** 32, f"run.seed must be in [0, 2^32); got {self.seed}")


@dataclass
class OutputSection:
    """output: where the run folder goes and how it is kept."""
    dir: str = "checkpoints"
    """output root; the run folder is <dir>/<name>"""
    name: str | None = None
    """run name = folder under output.dir; default: <stage>-<data file stem>-<UTC time>"""
    save_every: int = 500
    """optimiser steps between saved states (also saved at the end and on SIGINT/SIGTERM)"""
    keep_states: int = 2
    """newest saved states kept"""
    overwrite: bool = False
    """replace an existing run of the same name (otherwise refused unless --resume)"""

    def __post_init__(self):
        check(self.save_every >= 1, f"output.save_every must be >= 1; got {self.save_every}")
        check(self.keep_states >= 1, f"output.keep_states must be >= 1; got {self.keep_states}")
        check(bool(self.dir), "output.dir must not be empty")
        if self.name is not None:
            check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
                  f"output.name must be a plain folder name; got {self.name!r}")


@dataclass
class OptimSection:
    """optim: AdamW (timm), warmup + cosine or constant schedule (timm), clipping, accumulation."""
    lr: float = 1e-4
    """peak learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay (biases, norms and tokens excluded); the STCLN reference uses Adam without decay"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas"""
    schedule: Literal["cosine", "constant"] = "cosine"
    """learning-rate schedule after the linear warmup"""
    warmup_steps: int = 0
    """linear warmup from 0, in optimiser steps"""
    min_lr: float = 0.0
    """final learning rate of the cosine schedule"""
    clip_grad: float = 5.0
    """max gradient norm; 0 disables clipping"""
    grad_accum: int = 1
    """micro-batches per optimiser step"""

    def __post_init__(self):
        check(finite(self.lr) and self.lr > 0, f"optim.lr must be a positive number; got {self.lr}")
        check(finite(self.weight_decay) and self.weight_decay >= 0,
              f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        check(len(self.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in self.betas),
              f"optim.betas must be two numbers in [0, 1); got {list(self.betas)}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0; got {self.warmup_steps}")
        check(finite(self.min_lr) and 0 <= self.min_lr <= self.lr,
              f"optim.min_lr must be in [0, optim.lr]; got {self.min_lr}")
        check(finite(self.clip_grad) and self.clip_grad >= 0, f"optim.clip_grad must be >= 0; got {self.clip_grad}")
        check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1; got {self.grad_accum}")


@dataclass
class TrainSection:
    """train: length and hardware. Hardware keys left at null come from `accelerate config` / `accelerate launch`
    (docs/architecture.md, "Precedence")."""
    epochs: int = 100
    """passes over the training data"""
    max_steps: int | None = None
    """optimiser steps; overrides epochs when set"""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """null = what accelerate launch / accelerate config say (ACCELERATE_MIXED_PRECISION), else this"""
    cpu: bool | None = None
    """force the CPU; null = accelerate's choice (ACCELERATE_USE_CPU, else a GPU when present)"""

    def __post_init__(self):
        check(self.epochs >= 1, f"train.epochs must be >= 1; got {self.epochs}")
        check(self.max_steps is None or self.max_steps >= 1, f"train.max_steps must be >= 1; got {self.max_steps}")


# Keys a resumed run may change (they do not alter what has been computed so far).
RESUMABLE_KEYS = ("train.epochs", "train.max_steps", "run.log_every", "run.progress", "run.figure",
                  "output.save_every", "output.keep_states", "data.num_workers")
