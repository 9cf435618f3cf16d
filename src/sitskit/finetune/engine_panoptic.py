"""One panoptic (PaPs) fine-tuning epoch and the panoptic evaluation of a selection of patches.

The epoch is `stage.engine.supervised_epoch`, as for `engine_finetune`: the dropout stream of micro-batch
`micro` comes from a seed derived from (seed, micro, rank), so a resumed run repeats an uninterrupted one.
The loss is `PaPsLoss` on the centres matched one per zone (docs/panoptic.md); the stage switches it to
heatmap-only for the first epochs.

The evaluation scores every patch once with the panoptic map of the *detected* centres. With `tune=True`
(validation) it also collects, over the whole selection, the confidence and mask IoU of every zone-matched
centre, tunes `min_confidence` on them (`tune_min_confidence`), stores it in the model's buffer and then
builds the panoptic maps with the tuned threshold from the detections it kept (one forward per patch).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from sitskit.stage.engine import supervised_epoch
from sitskit.stage.state import TrainState

TERMS = ("centre", "size", "class", "shape")
DETECTION_KEYS = ("centres", "confidence", "class_logits", "mask_prob", "box_valid", "box_start")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_one_epoch(model, loader, optimizer, scheduler, accelerator, state: TrainState, cfg: dict,
                    criterion: Callable, total_steps: int, on_step: Callable[[dict], None] | None = None,
                    on_batch_end: Callable[[], bool] | None = None) -> bool:
    """Rest of epoch `state.epoch` from batch `state.batch` (the loader already skips the done ones).

    criterion: PaPsLoss (its `heatmap_only` set by the caller). Logs loss, the four terms, lr, grad_norm.
    Returns True when training must stop (total_steps reached or stop requested).
    """
    from sitskit.models.paps_loss import check_panoptic_targets

    def compute_loss(batch):
        check_panoptic_targets(batch)
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            out = model(batch["image"], batch["dates"], batch["pad_mask"], zones=batch["zones"])
        losses = criterion(_float(out), batch)
        return losses["loss"], torch.stack([losses[k].detach().float() for k in ("loss", *TERMS)])

    return supervised_epoch(model, loader, optimizer, scheduler, accelerator, state, cfg, compute_loss,
                            total_steps, terms=TERMS, on_step=on_step, on_batch_end=on_batch_end)


def _float(out: dict) -> dict:
    """Model outputs in float32 (autocast may return bf16 logits); lists and ints unchanged."""
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}


def image_detections(det: dict, img: int) -> dict:
    """The detections of image `img` of a batch, on the CPU, as a batch of one (image index 0).
    mask_prob is kept as float16 (only `> mask_threshold` is read when pasting)."""
    keep = det["centres"][:, 0] == img
    out = {k: det[k][keep].cpu() for k in DETECTION_KEYS}
    out["centres"] = out["centres"].clone()
    out["centres"][:, 0] = 0
    out["mask_prob"] = out["mask_prob"].half()
    out["class_logits"] = out["class_logits"].float()
    return out


@torch.no_grad()
def evaluate_panoptic(model, dataset, accelerator, num_classes: int, criterion=None, *, panoptic_classes=None,
                      void_label: int | None = 19, batch_size: int = 1, tune: bool = False, on_patch=None,
                      progress: bool = False, desc: str = "evaluate", num_workers: int = 0) -> dict:
    """Score every patch of `dataset` (task "panoptic") once, the patches split over the processes.

    Returns {"table": PanopticMeter table [K,4] (summed over processes), "confusion": [K,K] semantic confusion
    of `pano_class` vs `semantic`, "loss": {term: mean over patches} (when `criterion`), "n_patches",
    "min_confidence": the threshold used, "tune_score": its TP/(TP+(FP+FN)/2) on the centres (tune only)}.
    tune: tune min_confidence on the whole selection first (stored in the model's buffer), see module doc.
    on_patch(key, image [T,C,H,W], truth {semantic, instances} [H,W], pred {instances, classes [H,W],
    instance_class, instance_score [n], semantic [K,H,W] pano_semantic logits}) (main process, not with tune).
    `num_workers` DataLoader processes read the patches (0: this process).
    """
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from sitskit.data import pad_collate
    from sitskit.finetune.metrics import ConfusionMeter
    from sitskit.finetune.panoptic import PanopticMeter, tune_min_confidence

    if tune and on_patch is not None:
        raise ValueError("evaluate_panoptic: on_patch is not supported with tune=True")
    was_training = model.training
    model.eval()
    dev = accelerator.device
    meter = PanopticMeter(num_classes, classes=panoptic_classes, void_label=void_label, device=dev)
    confusion = ConfusionMeter(num_classes, device=dev)
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loss_sum = torch.zeros(1 + len(TERMS), dtype=torch.float64, device=dev)
    conf, iou, kept = [], [], []

    def score(pano_instance, pano_class, batch, i):
        meter.update(pano_instance, pano_class, batch["instances"][i], batch["semantic"][i])
        confusion.update(pano_class, batch["semantic"][i])

    bar = tqdm(total=len(mine), desc=desc, unit="patch", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True, leave=False)
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, collate_fn=pad_collate,
                        num_workers=num_workers, pin_memory=dev.type == "cuda")
    for cpu_batch in loader:
        batch = to_device(cpu_batch, dev)
        with accelerator.autocast():
            out = model(batch["image"], batch["dates"], batch["pad_mask"], zones=batch["zones"], panoptic=True)
        out = _float(out)
        if criterion is not None:
            losses = criterion(out, batch)
            loss_sum += torch.stack([losses[k].double() for k in ("loss", *TERMS)]) * len(batch["id"])
            conf.append(losses["mask_confidence"].cpu())
            iou.append(losses["mask_iou"].cpu())
        for i, key in enumerate(batch["id"]):
            if tune:
                kept.append((i, key, image_detections(out["detections"], i),
                             {k: cpu_batch[k][i] for k in ("semantic", "instances")}))
                continue
            score(out["pano_instance"][i], out["pano_class"][i], batch, i)
            if on_patch is not None:
                on_patch(key, cpu_batch["image"][i], {k: cpu_batch[k][i] for k in ("semantic", "instances")},
                         {"instances": out["pano_instance"][i].cpu(), "classes": out["pano_class"][i].cpu(),
                          "instance_class": out["instance_class"][i].cpu(),
                          "instance_score": out["instance_score"][i].cpu(),
                          "semantic": out["pano_semantic"][i].cpu()})
        bar.update(len(batch["id"]))
    bar.close()
    result = {"min_confidence": round(float(accelerator.unwrap_model(model).min_confidence), 6)}  # float32 buffer
    if tune:
        from accelerate.utils import gather_object

        if criterion is None:
            raise ValueError("evaluate_panoptic: tune=True needs the criterion (it gives the centre IoUs)")
        all_conf = torch.cat(gather_object([torch.cat(conf) if conf else torch.zeros(0)]))
        all_iou = torch.cat(gather_object([torch.cat(iou) if iou else torch.zeros(0)]))
        t, s = tune_min_confidence(all_conf, all_iou)
        core = accelerator.unwrap_model(model)
        core.min_confidence.fill_(t)
        result.update(min_confidence=t, tune_score=s, tune_centres=int(all_conf.numel()))
        for _, _, det, truth in kept:
            h, w = truth["semantic"].shape
            maps = core.combine({k: v.to(dev) for k, v in det.items()}, 1, h, w)
            score(maps["pano_instance"][0], maps["pano_class"][0], {k: v[None].to(dev) for k, v in truth.items()}, 0)
    n_local = torch.tensor(len(mine), device=dev)
    n_patches = int(accelerator.reduce(n_local, reduction="sum"))
    result.update(table=accelerator.reduce(meter.table, reduction="sum").cpu(),
                  confusion=accelerator.reduce(confusion.confusion, reduction="sum").cpu(), n_patches=n_patches)
    if criterion is not None:
        total = accelerator.reduce(loss_sum, reduction="sum").cpu() / max(n_patches, 1)
        result["loss"] = {"loss": float(total[0]), **{k: float(v) for k, v in zip(TERMS, total[1:])}}
    if was_training:
        model.train()
    return result
