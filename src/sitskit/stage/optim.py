"""Optimiser and schedule of the training stages, from timm (`optim` section, sitskit.stage.sections)."""
from __future__ import annotations


def build_optimizer(model_or_groups, optim_cfg: dict):
    """AdamW from timm; biases, norms and tokens (1-D parameters) are left out of weight decay.
    `model_or_groups`: a module, or a list of parameter-group dicts (e.g. an encoder with its own lr)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model_or_groups, opt="adamw", lr=optim_cfg["lr"],
                               weight_decay=optim_cfg["weight_decay"], betas=tuple(optim_cfg["betas"]))


def build_scheduler(optimizer, optim_cfg: dict, total_steps: int):
    """Linear warmup then cosine (to min_lr) or constant; stepped per optimiser step (`step_update`)."""
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    o = optim_cfg
    warmup = {"warmup_t": o["warmup_steps"], "warmup_lr_init": 0.0 if o["warmup_steps"] else o["lr"],
              "t_in_epochs": False}
    if o["schedule"] == "cosine":
        sched = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=o["min_lr"], **warmup)
    else:  # a step schedule that never decays = constant after warmup
        sched = StepLRScheduler(optimizer, decay_t=10 ** 12, decay_rate=1.0, **warmup)
    sched.step_update(0)
    return sched
