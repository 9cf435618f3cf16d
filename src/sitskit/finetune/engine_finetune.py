"""One fine-tuning epoch (cross-entropy on labelled pixels) and the evaluation of a selection of patches.

The epoch is `stage.engine.supervised_epoch` with this loss. Randomness of micro-batch `micro` (dropout) comes
from a seed derived from (seed, micro, rank), and samples from (seed, epoch, index), so a resumed run repeats
an uninterrupted one exactly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sitskit.stage.engine import supervised_epoch
from sitskit.stage.state import TrainState


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor,
                         weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """logits: [B, K, H, W]; target: int64 [B, H, W]; ignore: bool [K] (classes never scored: void, optionally
    background). Mean over the labelled pixels (weighted like torch's CE); exactly 0 — not NaN — with a gradient
    of zeros when the batch holds no labelled pixel (torch's CE returns NaN there)."""
    valid = ~ignore[target.clamp(0, len(ignore) - 1)] & (target >= 0) & (target < len(ignore))
    if not bool(valid.any()):
        return logits.sum() * 0.0
    logits = logits.float().permute(0, 2, 3, 1)[valid]  # [N, K]
    return F.cross_entropy(logits, target[valid], weight=weight, label_smoothing=label_smoothing)


def train_one_epoch(model, loader, optimizer, scheduler, accelerator, state: TrainState, cfg: dict,
                    criterion: Callable, total_steps: int, on_step: Callable[[dict], None] | None = None,
                    on_batch_end: Callable[[], bool] | None = None) -> bool:
    """Rest of epoch `state.epoch` from batch `state.batch` (the loader already skips the done ones), with
    `criterion(logits, target)` (`masked_cross_entropy`). Logs loss, lr, grad_norm. Returns True when training
    must stop (total_steps reached or stop requested)."""
    device = accelerator.device

    def compute_loss(batch):
        x, dates, pad_mask, target = (batch[k].to(device, non_blocking=True)
                                      for k in ("image", "dates", "pad_mask", "semantic"))
        with accelerator.autocast():
            logits = model(x, dates, pad_mask)
        loss = criterion(logits, target)
        return loss, loss.detach().float()[None]

    return supervised_epoch(model, loader, optimizer, scheduler, accelerator, state, cfg, compute_loss,
                            total_steps, on_step=on_step, on_batch_end=on_batch_end)


@torch.no_grad()
def evaluate(model, dataset, accelerator, num_classes: int, window: int | None = None, overlap: float = 0.5,
             batch_size: int = 1, on_patch=None, progress: bool = False,
             desc: str = "evaluate", num_workers: int = 0):
    """Score every patch of `dataset` exactly once, the patches split over the processes without padding.

    `batch_size` patches per forward (native; with `window`, each patch's windows are batched instead), read
    by `num_workers` DataLoader processes (0: in this process) while the model runs.

    Returns the confusion matrix [K, K] (rows = truth) summed over the processes, and the number of patches.
    `on_patch(key, image, truth, probs)` (main process, e.g. for figures or a prediction file) sees each of
    its patches. Models trained on crops score full patches natively, or with `window` (sliding window).
    """
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from sitskit.data import pad_collate
    from sitskit.finetune.inference import predict_patch
    from sitskit.finetune.metrics import ConfusionMeter

    was_training = model.training
    model.eval()
    meter = ConfusionMeter(num_classes, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))

    def forward(x, d, p):
        with accelerator.autocast():
            return model(x, d, p).float()

    bar = tqdm(total=len(mine), desc=desc, unit="patch", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True, leave=False)
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, collate_fn=pad_collate,
                        num_workers=num_workers, pin_memory=accelerator.device.type == "cuda")
    for batch in loader:
        x = batch["image"].to(accelerator.device, non_blocking=True)
        dates, pad_mask = batch["dates"].to(accelerator.device), batch["pad_mask"].to(accelerator.device)
        if window is None:  # one forward for the batch: padded dates change no model's output (tested)
            probs = predict_patch(forward, x, dates, pad_mask, num_classes=num_classes)
        else:
            probs = torch.cat([predict_patch(forward, x[i:i + 1], dates[i:i + 1], pad_mask[i:i + 1], window=window,
                                             overlap=overlap, num_classes=num_classes) for i in range(len(x))])
        pred = probs.argmax(1)
        truth = batch["semantic"].to(accelerator.device)
        meter.update(pred, truth)
        if on_patch is not None:
            for i, key in enumerate(batch["id"]):
                on_patch(key, batch["image"][i], batch["semantic"][i], probs[i].cpu())
        bar.update(len(x))
    bar.close()
    confusion = accelerator.reduce(meter.confusion, reduction="sum")
    n_patches = int(accelerator.reduce(torch.tensor(len(mine), device=accelerator.device), reduction="sum"))
    if was_training:
        model.train()
    return confusion.cpu(), n_patches
