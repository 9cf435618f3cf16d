"""PaPs loss (utae-paps' PaPsLoss terms, all weights 1) and the panoptic-target check (docs/panoptic.md).

    check_panoptic_targets(batch)                  # UserFacingError if the batch has no instance targets
    out = model(x, dates, pad_mask, zones=batch["zones"])
    losses = PaPsLoss()(out, batch)                # {"loss", "centre", "size", "class", "shape",
                                                   #  "mask_iou", "mask_confidence"}

Terms, on the centres matched one per zone by the model (zone id = instance id):
- centre: focal heatmap loss with alpha=0, beta=4: -[sum_pos log p + sum_neg (1-g)^4 log(1-p)] / max(N_pos, 1),
  positives where the target heatmap is exactly 1;
- size: mean over centres of sum_{rows, cols} |s - s_hat| / (s + eps);
- class: cross-entropy of the centre logits vs the object class, void centres (class 19) left out;
- shape: per-pixel loss of the instance mask inside the predicted box vs the zone's instance, mean over
  the box pixels of all centres. Clean default: the true binary cross-entropy of mask = sigmoid(a)*sigmoid(b),
  computed stably from the two logits. reference_numerics=True: utae-paps' log_softmax over [1-p, p].
The saliency map has no term of its own: it is trained through the shape loss, as in the reference.
A term without centres (a patch without parcels) is 0, so the loss stays finite.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sitskit.errors import UserFacingError

PANOPTIC_TARGET_KEYS = ("semantic", "heatmap", "instances", "zones", "size", "object_class")


def check_panoptic_targets(batch: dict) -> None:
    """Refuse a batch (a dataset sample dict or a collated batch) without the PaPs instance targets.

    One UserFacingError naming the patch ids and the missing keys (PASTIS files converted without the
    INSTANCE_ANNOTATIONS folder, or a dataset built with task != "panoptic").
    """
    missing = [k for k in PANOPTIC_TARGET_KEYS if k not in batch]
    if missing:
        ids = batch.get("id")
        where = f"patch(es) {ids if isinstance(ids, str) else ', '.join(map(str, list(ids)[:4]))}: " if ids is not None \
            else ""
        raise UserFacingError(f"{where}no instance targets for the panoptic task (missing {', '.join(missing)}); "
                              "use a PASTIS file with instance annotations and build the dataset with task='panoptic'")


def log1m_product_of_sigmoids(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(1 - sigmoid(a) * sigmoid(b)), stable: log(e^-a + e^-b + e^-(a+b)) - softplus(-a) - softplus(-b)."""
    return torch.logsumexp(torch.stack([-a, -b, -(a + b)]), dim=0) - F.softplus(-a) - F.softplus(-b)


CENTRE_KEYS = ("centres", "centre_zone", "size", "class_logits", "shape_logits", "confidence", "mask_prob",
               "mask_logits", "box_valid", "box_start", "box_extent")


def select_centres(output: dict, keep: torch.Tensor) -> dict:
    """A copy of `output` with only the centres where keep [N] bool is True (the per-centre entries)."""
    return {k: (v[keep] if k in CENTRE_KEYS else v) for k, v in output.items()}


class PaPsLoss(nn.Module):
    """Sum of the weighted PaPs terms. forward(output of a PaPs model with zones, batch) -> dict of scalars.

    batch: heatmap [B,H,W] float, instances [B,H,W] int, size [B,2,H,W], object_class [B,H,W].
    heatmap_only=True (utae-paps' first 5 epochs) keeps only the centre term in "loss".
    """

    def __init__(self, beta: float = 4.0, eps: float = 1e-6, void_label: int | None = 19,
                 weights: dict[str, float] | None = None, reference_numerics: bool = False,
                 heatmap_only: bool = False):
        super().__init__()
        self.beta, self.eps, self.void_label = beta, eps, void_label
        self.weights = {"centre": 1.0, "size": 1.0, "class": 1.0, "shape": 1.0, **(weights or {})}
        self.reference_numerics, self.heatmap_only = reference_numerics, heatmap_only

    def forward(self, output: dict, batch: dict) -> dict:
        check_panoptic_targets(batch)
        if "centre_zone" not in output:
            raise ValueError("PaPsLoss needs the model output of a forward with zones=batch['zones']")
        terms = {"centre": self.centre_loss(output, batch["heatmap"].to(output["heatmap"].dtype))}
        centres = output["centres"]
        b, i, j = centres.unbind(1)
        zero = output["heatmap"].sum() * 0.0
        # a zone whose instance lies outside a crop has size 0 there: its centre is not supervised
        present = batch["size"][b, 0, i, j] > 0
        if bool(present.any()):
            output = select_centres(output, present)
            centres = output["centres"]
            b, i, j = centres.unbind(1)
            size_true = batch["size"][b, :, i, j].to(output["size"].dtype)
            terms["size"] = ((size_true - output["size"]).abs() / (size_true + self.eps)).sum(1).mean()
            cls = batch["object_class"][b, i, j].long()
            keep = cls != self.void_label if self.void_label is not None else torch.ones_like(cls, dtype=torch.bool)
            terms["class"] = F.cross_entropy(output["class_logits"][keep], cls[keep]) if bool(keep.any()) else zero
            shape, iou = self.shape_loss(output, batch["instances"])
            terms["shape"] = shape
        else:
            terms.update({"size": zero, "class": zero, "shape": zero})
            iou = output["heatmap"].new_zeros(0)
            output = select_centres(output, present)
        names = ("centre",) if self.heatmap_only else ("centre", "size", "class", "shape")
        loss = sum(self.weights[n] * terms[n] for n in names)
        # mask_iou / mask_confidence: per supervised centre, for tuning min_confidence (tune_min_confidence)
        return {"loss": loss, **terms, "mask_iou": iou, "mask_confidence": output["confidence"].detach()}

    def centre_loss(self, output: dict, target: torch.Tensor) -> torch.Tensor:
        """Focal heatmap loss (alpha=0, beta). target: [B,H,W] or [B,1,H,W]."""
        target = target.reshape(output["heatmap"].shape)
        pos = target == 1
        if self.reference_numerics:
            p = output["heatmap"]
            log_p, log_1mp = torch.log(p + self.eps), torch.log(1 - p + self.eps)
        else:  # from the logits: no log(0) and no eps bias
            logits = output["heatmap_logits"]
            log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        pos_term = log_p[pos].sum()
        neg_term = ((1 - target[~pos]) ** self.beta * log_1mp[~pos]).sum()
        return -(pos_term + neg_term) / pos.sum().clamp(min=1)

    def shape_loss(self, output: dict, instances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask loss on the box pixels of every centre, and the (detached) IoU of mask > 0.4 vs its instance,
        the union counting the instance's pixels outside the box too (utae-paps' side product for tuning)."""
        centres, zone = output["centres"], output["centre_zone"]
        valid = output["box_valid"]
        _, hc, wc = valid.shape
        h, w = instances.shape[-2:]
        start = output["box_start"]
        r = (start[:, :1] + torch.arange(hc, device=valid.device)[None]).clamp(max=h - 1)
        c = (start[:, 1:] + torch.arange(wc, device=valid.device)[None]).clamp(max=w - 1)
        gt = instances[centres[:, 0, None, None], r[:, :, None], c[:, None, :]] == zone[:, None, None]
        gt = gt & valid
        prob = output["mask_prob"]
        if self.reference_numerics:  # log_softmax over [1-p, p]: loss = softplus(±(1-2p))
            per_pixel = torch.where(gt, F.softplus(1 - 2 * prob), F.softplus(2 * prob - 1))
        else:
            a, b = output["mask_logits"].unbind(1)
            log_p = F.logsigmoid(a) + F.logsigmoid(b)
            per_pixel = -torch.where(gt, log_p, log1m_product_of_sigmoids(a, b))
        loss = per_pixel[valid].mean() if bool(valid.any()) else prob.sum() * 0.0
        with torch.no_grad():
            binary = (prob > 0.4) & valid
            inter = (binary & gt).sum(dim=(1, 2))
            n_ids = max(int(instances.max()), int(zone.max())) + 1
            area = torch.zeros(instances.shape[0], n_ids, device=valid.device, dtype=torch.long)
            area.scatter_add_(1, instances.long().flatten(1), torch.ones_like(instances.long().flatten(1)))
            gt_area = area[centres[:, 0], zone]
            union = binary.sum(dim=(1, 2)) + gt_area - inter
            iou = inter.float() / union.clamp(min=1).float()
        return loss, iou
