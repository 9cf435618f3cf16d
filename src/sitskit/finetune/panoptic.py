"""Panoptic quality (SQ / RQ / PQ) as utae-paps' PanopticMeter after its 2022 void fix (docs/panoptic.md).

    meter = PanopticMeter(class_names=PASTIS_CLASSES)
    meter.update(out["pano_instance"], out["pano_class"], batch["instances"], batch["semantic"])
    metrics = meter.compute()     # {"SQ", "RQ", "PQ", "per_class", "table", "table_classes", ...}
    # across processes: meter.table = accelerator.reduce(meter.table, "sum")

Per image: predicted instances with IoU > 0.5 against one ground-truth void instance are deleted, then every
ground-truth void pixel is removed from the prediction. Per evaluated class (1..18 on PASTIS), a predicted
segment is the pixels of one predicted instance with that class, a true segment the pixels of one true
instance with that class; a (predicted, true) pair with IoU > 0.5 is a TP (such pairs are unique), FP =
n_pred - TP, FN = n_true - TP. Accumulated over the split: SQ = sum IoU_TP / TP (0 without TP),
RQ = TP / (TP + FP/2 + FN/2), PQ = SQ * RQ; the averages are over classes with TP + FP + FN > 0.
Values are fractions (0..1), like the semantic metrics. The inputs are never modified.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

TABLE_COLUMNS = ("TP", "FP", "FN", "sum_IoU")


class PanopticMeter:
    """Accumulates a [K, 4] float64 table (TP, FP, FN, sum IoU per class index) — one tensor, so summing it
    over processes or folds gives the metrics of the pooled images.

    num_classes K (20 on PASTIS), classes: the evaluated class indices (default 1..K-2: not background 0,
    not void K-1), void_label: the class of the void instances (19; None = no void handling).
    """

    def __init__(self, num_classes: int = 20, classes: Sequence[int] | None = None, void_label: int | None = 19,
                 class_names: Sequence[str] | None = None, device: torch.device | str | None = None):
        self.num_classes = int(num_classes)
        self.classes = list(range(1, self.num_classes - 1) if classes is None else classes)
        self.void_label = void_label
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        self.table = torch.zeros(self.num_classes, 4, dtype=torch.float64, device=device)
        self._evaluated = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        self._evaluated[self.classes] = True

    def reset(self) -> None:
        self.table.zero_()

    def merge(self, other: PanopticMeter) -> PanopticMeter:
        self.table += other.table.to(self.table.device)
        return self

    @torch.no_grad()
    def update(self, inst_pred: torch.Tensor, sem_pred: torch.Tensor, inst_true: torch.Tensor,
               sem_true: torch.Tensor) -> None:
        """inst_pred, sem_pred, inst_true, sem_true: integer [B,H,W] (or [H,W]); instance 0 = none.

        sem_pred: the predicted class of each pixel (e.g. `pano_class`); sem_true: the pixel classes.
        """
        shapes = {tuple(t.shape) for t in (inst_pred, sem_pred, inst_true, sem_true)}
        if len(shapes) != 1:
            raise ValueError(f"panoptic inputs differ in shape: {sorted(shapes)}")
        dev = self.table.device
        tensors = [t.to(dev, torch.int64) for t in (inst_pred, sem_pred, inst_true, sem_true)]
        if tensors[0].dim() == 2:
            tensors = [t[None] for t in tensors]
        for ip, sp, it, st in zip(*tensors):
            self.table += self._image_table(ip.flatten(), sp.flatten(), it.flatten(), st.flatten())

    def _image_table(self, ip, sp, it, st) -> torch.Tensor:
        k = self.num_classes
        if self.void_label is not None:
            void = st == self.void_label
            if bool(void.any()):
                void_inst = torch.where(void, it, torch.zeros_like(it))
                iou, pred_ids, _ = pair_iou(ip, void_inst)
                drop = pred_ids[(iou > 0.5).any(dim=1)] if iou.numel() else pred_ids[:0]
                gone = torch.isin(ip, drop) | void
                ip = torch.where(gone, torch.zeros_like(ip), ip)
                sp = torch.where(gone, torch.zeros_like(sp), sp)
        pred_seg = torch.where((ip > 0) & self._evaluated[sp.clamp(0, k - 1)] & (sp < k), ip * k + sp,
                               torch.zeros_like(ip))
        true_seg = torch.where((it > 0) & self._evaluated[st.clamp(0, k - 1)] & (st < k), it * k + st,
                               torch.zeros_like(it))
        iou, pred_ids, true_ids = pair_iou(pred_seg, true_seg)
        table = torch.zeros(k, 4, dtype=torch.float64, device=ip.device)
        pred_cls, true_cls = pred_ids % k, true_ids % k
        n_pred = torch.bincount(pred_cls, minlength=k).double()
        n_true = torch.bincount(true_cls, minlength=k).double()
        match = (iou > 0.5) & (pred_cls[:, None] == true_cls[None, :])
        pi, _ = torch.nonzero(match, as_tuple=True)
        tp = torch.bincount(pred_cls[pi], minlength=k).double()
        table[:, 0] = tp
        table[:, 1] = n_pred - tp
        table[:, 2] = n_true - tp
        table[:, 3] = torch.zeros(k, dtype=torch.float64, device=ip.device).index_add_(
            0, pred_cls[pi], iou[match].double())
        return table

    def compute(self) -> dict:
        """{SQ, RQ, PQ (means over present classes; None if none), per_class {name: {SQ, RQ, PQ, TP, FP, FN}},
        table [[TP, FP, FN, sum IoU]] for the evaluated classes, table_classes (their names), table_columns}."""
        t = self.table.detach().cpu().double().numpy()[self.classes]
        tp, fp, fn, siou = t.T
        sq = np.divide(siou, tp, out=np.zeros_like(tp), where=tp > 0)
        denom = tp + 0.5 * fp + 0.5 * fn
        present = denom > 0
        rq = np.divide(tp, denom, out=np.full_like(tp, np.nan), where=present)
        pq = sq * rq
        names = [self.class_names[c] for c in self.classes]
        per_class = {
            name: {"SQ": _num(sq[i]) if present[i] else None, "RQ": _num(rq[i]), "PQ": _num(pq[i]),
                   "TP": int(tp[i]), "FP": int(fp[i]), "FN": int(fn[i])}
            for i, name in enumerate(names)
        }
        mean = (lambda v: _num(float(v[present].mean()))) if present.any() else (lambda v: None)
        return {"SQ": mean(sq), "RQ": mean(rq), "PQ": mean(pq), "per_class": per_class,
                "table": t.tolist(), "table_classes": names, "table_columns": list(TABLE_COLUMNS)}


def pair_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU of every non-zero label of `a` with every non-zero label of `b` (same-shape int label maps).

    -> iou [n_a, n_b] float64, a_ids [n_a], b_ids [n_b] (sorted label values).
    """
    a_ids, a_inv = torch.unique(a.flatten(), return_inverse=True)
    b_ids, b_inv = torch.unique(b.flatten(), return_inverse=True)
    na, nb = a_ids.numel(), b_ids.numel()
    joint = torch.bincount(a_inv * nb + b_inv, minlength=na * nb).view(na, nb).double()
    area_a, area_b = joint.sum(1), joint.sum(0)
    iou = joint / (area_a[:, None] + area_b[None, :] - joint).clamp(min=1)
    ka, kb = a_ids != 0, b_ids != 0
    return iou[ka][:, kb], a_ids[ka], b_ids[kb]


def tune_min_confidence(confidence: torch.Tensor, iou: torch.Tensor,
                        thresholds: Sequence[float] | None = None) -> tuple[float, float]:
    """Confidence threshold maximising TP / (TP + (FP + FN)/2) over all supervised centres of a split.

    confidence, iou: [N] (PaPsLoss outputs mask_confidence / mask_iou, concatenated over the whole validation
    set). At threshold t: TP = conf > t and IoU > 0.5, FP = conf > t and IoU <= 0.5, FN = N - TP (each centre
    stands for one true parcel). thresholds default 0, 0.01, ..., 0.99 (utae-paps' grid). -> (t, score).
    """
    conf = confidence.detach().double().cpu().flatten()
    good = iou.detach().cpu().flatten() > 0.5
    grid = torch.tensor(np.arange(0, 1, 0.01) if thresholds is None else list(thresholds), dtype=torch.float64)
    above = conf[None, :] > grid[:, None]  # [n_t, N]
    tp = (above & good).sum(1).double()
    fp = (above & ~good).sum(1).double()
    fn = conf.numel() - tp
    score = tp / (tp + 0.5 * (fp + fn)).clamp(min=1e-12)
    best = int(score.argmax())
    return float(grid[best]), float(score[best])


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)
