"""One pre-training epoch: masked reconstruction with MSE on the masked entries (STCLN, docs/pretraining.md).

A *micro-batch* is one forward/backward (a batch, or one crop of it with `data.step_per_crop`); every
`grad_accum` micro-batches make one optimiser step. All randomness of micro-batch number `micro` — the
mask and dropout — comes from seeds derived from (seed, micro, rank), so a resumed run repeats an
uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

from sitskit.models.stcln import STCLNPretrain
from sitskit.pretrain.masking import MaskGenerator, step_generator, step_seed
from sitskit.stage.engine import optimizer_step
from sitskit.stage.state import TrainState


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target: [B, T, C, H, W]; mask: bool [B, T, H, W] (True = masked). Mean squared error over
    the masked entries only (every channel of a masked pixel-date), in fp32; 0 when nothing is masked.
    Returns (loss scalar, per-band loss [C] detached)."""
    return masked_entries_mse(STCLNPretrain.masked_entries(pred, mask), STCLNPretrain.masked_entries(target, mask))


def masked_entries_mse(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`masked_mse` of the masked entries alone: pred, target [M, C] (the masked pixel-dates)."""
    err = (pred.float() - target.float()).square()
    m = max(err.shape[0], 1)
    per_band = err.sum(dim=0) / m
    return err.sum() / (m * err.shape[1]), per_band.detach()


def forward_loss(model, x, dates, pad_mask, mask, masked_only: bool):
    """Reconstruction and masked MSE -> (loss, per-band loss). masked_only: the model computes the masked
    pixel-dates only (STCLNPretrain's `masked_only`), so no work is spent on outputs the loss ignores."""
    if masked_only:
        pred = model(x, dates, pad_mask, mask, masked_only=True)
        return masked_entries_mse(pred, STCLNPretrain.masked_entries(x, mask))
    return masked_mse(model(x, dates, pad_mask, mask), x, mask)


def grid_crops(size_hw: tuple[int, int], crop: int) -> list[tuple[slice, slice]]:
    """Row-major grid of non-overlapping crop×crop windows (the paper's 4×4 grid of 32×32 on 128×128)."""
    H, W = size_hw
    if H % crop or W % crop:
        raise ValueError(f"data.step_crop={crop} must divide the patch size {H}x{W}")
    return [(slice(i, i + crop), slice(j, j + crop)) for i in range(0, H, crop) for j in range(0, W, crop)]


def train_one_epoch(
    model: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    accelerator,
    masker: MaskGenerator,
    state: TrainState,
    cfg: dict,
    total_steps: int,
    on_step: Callable[[dict], None] | None = None,
    on_batch_end: Callable[[], bool] | None = None,
) -> bool:
    """Run the rest of epoch `state.epoch` from batch `state.batch` (the loader must already skip the
    done batches). `on_step(metrics)` is called on every process after each logged optimiser step;
    `on_batch_end()` after each batch, returning True to stop (Ctrl-C, checkpoint). Returns True when
    training must stop (total_steps reached or stop requested)."""
    seed = cfg["run"]["seed"]
    accum = cfg["optim"]["grad_accum"]
    clip = cfg["optim"]["clip_grad"]
    log_every = cfg["run"]["log_every"]
    step_crop = cfg["data"]["step_crop"] if cfg["data"]["step_per_crop"] else None
    rank = accelerator.process_index
    model.train()
    masked_only = cfg["model"].get("masked_only", False) and _supports_masked_only(accelerator.unwrap_model(model))

    meter = _Meter(accelerator)
    for batch in loader:
        image = batch["image"].to(accelerator.device, non_blocking=True)
        dates = batch["dates"].to(accelerator.device, non_blocking=True)
        pad_mask = batch.get("pad_mask")
        pad_mask = None if pad_mask is None else pad_mask.to(accelerator.device, non_blocking=True)
        for x in _micro_batches(image, step_crop):
            sync = (state.micro + 1) % accum == 0
            torch.manual_seed(step_seed(seed, state.micro, rank, 0))  # dropout stream of this micro-batch
            mask, eligible = masker(x, pad_mask, step_generator(seed, state.micro, rank, 1))
            no_sync = contextlib.nullcontext() if sync else accelerator.no_sync(model)
            with no_sync:
                loss, per_band = forward_loss(model, x, dates, pad_mask, mask, masked_only)
                accelerator.backward(loss / accum)
            meter.add(loss.detach(), per_band, mask, eligible, pad_mask, x.shape[0])
            state.micro += 1
            if not sync:
                continue
            lr, grad_norm = optimizer_step(model, optimizer, scheduler, accelerator, state, clip)
            if state.step % log_every == 0 or state.step == total_steps:
                metrics = meter.summary(lr, grad_norm)
                # inputs only: the figure's reconstruction is computed once, at the end (`reconstruct_example`)
                metrics["example"] = (x[0].detach().clone(), mask[0].detach(),
                                      None if pad_mask is None else pad_mask[0].detach(), dates[0])
                if on_step is not None:
                    on_step(metrics)
            if state.step >= total_steps:
                break
        state.batch += 1
        stop_requested = on_batch_end() if on_batch_end is not None else False
        if state.step >= total_steps or stop_requested:
            return True
    return False


def _supports_masked_only(model) -> bool:
    import inspect

    return "masked_only" in inspect.signature(model.forward).parameters


@torch.no_grad()
def reconstruct_example(model: torch.nn.Module, x: torch.Tensor, dates: torch.Tensor, pad_mask: torch.Tensor | None,
                        mask: torch.Tensor) -> torch.Tensor:
    """One sample's full reconstruction for the logged figure, in eval mode (no dropout).
    x: [T, C, H, W]; dates: [T]; pad_mask: [T] or None; mask: [T, H, W] -> [T, C, H, W]."""
    was_training = model.training
    model.eval()
    try:
        one = None if pad_mask is None else pad_mask[None]
        return model(x[None], dates[None], one, mask[None])[0]
    finally:
        model.train(was_training)


def _micro_batches(image: torch.Tensor, step_crop: int | None) -> Iterator[torch.Tensor]:
    if step_crop is None:
        yield image
        return
    for rows, cols in grid_crops(image.shape[-2:], step_crop):
        yield image[..., rows, cols]


class _Meter:
    """Accumulates loss / masked share between logged steps and reduces them over processes."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.reset()

    def reset(self):
        self.loss_sum = 0.0
        self.band_sum = None
        self.n = 0
        self.masked = 0.0
        self.valid = 0.0
        self.eligible = 0.0
        self.valid_dates = 0.0
        self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, loss, per_band, mask, eligible, pad_mask, n_samples):
        # tensors stay on their device: no host sync per micro-batch, only when a step is logged
        self.loss_sum = self.loss_sum + loss.float()
        self.band_sum = per_band.float() if self.band_sum is None else self.band_sum + per_band.float()
        self.n += 1
        B, T, H, W = mask.shape
        valid_dates = B * T if pad_mask is None else (~pad_mask).sum()
        self.masked = self.masked + mask.sum()
        self.valid = self.valid + valid_dates * (H * W)
        self.eligible = self.eligible + eligible.sum()
        self.valid_dates = self.valid_dates + valid_dates
        self.samples += n_samples

    def summary(self, lr: float, grad_norm) -> dict:
        acc = self.accelerator
        masked_share = float(self.masked) / max(float(self.valid), 1.0)
        eligible_share = float(self.eligible) / max(float(self.valid_dates), 1.0)
        local = torch.cat([torch.stack([self.loss_sum.to(acc.device) / max(self.n, 1)]),
                           torch.tensor([masked_share, eligible_share], device=acc.device),
                           (self.band_sum / max(self.n, 1)).to(acc.device)])
        mean = acc.reduce(local, reduction="mean")
        elapsed = time.perf_counter() - self.t0
        samples = self.samples * acc.num_processes
        out = {"loss": float(mean[0]), "masked_share": float(mean[1]), "eligible_date_share": float(mean[2]),
               "lr": float(lr), "samples_per_s": samples / max(elapsed, 1e-9),
               "band_loss": [float(v) for v in mean[3:]]}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        self.reset()
        return out


class HoldoutEvaluator:
    """Masked MSE on held-out patches with fixed masks, beside two trivial estimates of the same hidden entries
    (temporal interpolation, 3x3 neighbour mean; docs/experiments.md): a falling loss means something only when
    it drops below what copying neighbours achieves. Every rank computes it (cheap, a few patches)."""

    def __init__(self, dataset, masker: MaskGenerator, cfg: dict, accelerator):
        import numpy as np

        from sitskit.data import pad_collate
        from sitskit.pretrain.baselines import baseline_errors

        self.accelerator = accelerator
        dataset.set_epoch(0)
        gen = step_generator(cfg["run"]["seed"], 0, 0, 7)
        self.items, sums, n = [], {}, 0
        for i in range(len(dataset)):
            batch = pad_collate([dataset[i]])
            mask, _ = masker(batch["image"], batch["pad_mask"], gen)
            if not mask.any():
                continue
            self.items.append((batch, mask))
            x, hidden = batch["image"][0].numpy(), mask[0].numpy()
            for name, err in baseline_errors(x, hidden, batch["dates"][0].numpy().astype(np.float64)).items():
                sums[name] = sums.get(name, 0.0) + err
            n += int(hidden.sum()) * x.shape[1]
        self.n = n
        self.baselines = {name: s / max(n, 1) for name, s in sums.items()}

    @torch.no_grad()
    def __call__(self, model) -> float:
        """Masked MSE of `model` over the held-out entries (model put back in train mode)."""
        if not self.items:
            return float("nan")
        model.eval()
        device, total = self.accelerator.device, 0.0
        for batch, mask in self.items:
            x = batch["image"].to(device)
            with self.accelerator.autocast():
                pred = model(x, batch["dates"].to(device), batch["pad_mask"].to(device), mask.to(device))
            m = mask.to(device)[:, :, None].expand_as(x)
            total += float((pred.float() - x).square()[m].sum())
        model.train()
        return total / max(self.n, 1)
