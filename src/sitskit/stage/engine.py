"""The parts of an epoch every training stage shares: the optimiser step after `grad_accum` micro-batches,
and the supervised epoch of the fine-tuning stages (semantic and panoptic differ only in their loss).

Randomness of micro-batch `micro` (dropout) comes from a seed derived from (seed, micro, rank), so a resumed
run repeats an uninterrupted one exactly (docs/stages.md).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import torch

from sitskit.pretrain.masking import step_seed
from sitskit.stage.state import TrainState


def optimizer_step(model, optimizer, scheduler, accelerator, state: TrainState, clip: float | None):
    """Clip (when clip > 0), step, zero the gradients, advance `state.step` and the per-step schedule.
    Returns (the learning rate this step used, of the last parameter group: optim.lr; grad norm or None)."""
    lr = optimizer.param_groups[-1]["lr"]
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip) if clip and clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    scheduler.step_update(state.step)
    return lr, grad_norm


def supervised_epoch(model, loader, optimizer, scheduler, accelerator, state: TrainState, cfg: dict,
                     compute_loss: Callable, total_steps: int, terms: Sequence[str] = (),
                     on_step: Callable[[dict], None] | None = None,
                     on_batch_end: Callable[[], bool] | None = None) -> bool:
    """Rest of epoch `state.epoch` from batch `state.batch` (the loader already skips the done ones).

    compute_loss(batch) -> (loss, [1 + len(terms)] detached values: the loss, then each term), forward under
    `accelerator.autocast()` included. Every `run.log_every` steps, on_step gets {loss, loss_<term>, lr,
    samples_per_s, grad_norm} averaged over the micro-batches since the last log and over processes.
    Returns True when training must stop (total_steps reached or on_batch_end() asked to).
    """
    seed, accum, clip = cfg["run"]["seed"], cfg["optim"]["grad_accum"], cfg["optim"]["clip_grad"]
    log_every, rank = cfg["run"]["log_every"], accelerator.process_index
    model.train()
    sums, n, samples, t0 = None, 0, 0, time.perf_counter()
    for batch in loader:
        sync = (state.micro + 1) % accum == 0
        torch.manual_seed(step_seed(seed, state.micro, rank, 0))  # dropout stream of this micro-batch
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            loss, values = compute_loss(batch)
            accelerator.backward(loss / accum)
        sums = values if sums is None else sums + values  # stays on the device: no sync per micro-batch
        n, samples = n + 1, samples + batch["image"].shape[0]
        state.micro += 1
        if sync:
            lr, grad_norm = optimizer_step(model, optimizer, scheduler, accelerator, state, clip)
            if on_step is not None and (state.step % log_every == 0 or state.step == total_steps):
                mean = accelerator.reduce(sums / max(n, 1), reduction="mean").tolist()
                metrics = {"loss": mean[0], **{f"loss_{k}": v for k, v in zip(terms, mean[1:])}, "lr": float(lr),
                           "samples_per_s": samples * accelerator.num_processes / max(time.perf_counter() - t0, 1e-9)}
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                on_step(metrics)
                sums, n, samples, t0 = None, 0, 0, time.perf_counter()
        state.batch += 1
        stop = on_batch_end() if on_batch_end is not None else False
        if state.step >= total_steps or stop:
            return True
    return False
