"""Semantic-segmentation metrics: one confusion matrix, three scoring protocols (docs/metrics.md).

The meter accumulates the **full** [K, K] confusion over every class of the data file, excluded classes
(PASTIS void, MTLCC unknown) included as truth and as prediction. Each protocol only drops pixels by their
(truth, prediction) pair and then reads counts, so every protocol is a function of that one matrix:

* ``sitskit`` zeroes the rows of the excluded classes,
* ``utae`` zeroes the rows and columns of the ignored classes (utae-paps' IoU meter),
* ``stcln`` zeroes the excluded rows (and, on MTLCC, the unknown column) like test_STCLN.py's pixel filter;
  its restricted-label IoU and sklearn-style macro F1 are functions of the remaining counts.

Summing confusions over batches, processes or folds therefore gives exactly the metrics of the pooled pixels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sitskit.errors import UserFacingError

PROTOCOLS = ("sitskit", "utae", "stcln")


class ConfusionMeter:
    """Accumulates a [K, K] int64 confusion matrix (rows = truth, columns = prediction) on any device.

    Keep K = every class of the data file (void / unknown included), so that all protocols can be computed
    from ``.confusion``. Across processes: ``meter.confusion = accelerator.reduce(meter.confusion, "sum")``.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None):
        self.num_classes = int(num_classes)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor,
               valid_mask: torch.Tensor | None = None) -> None:
        """pred, target: integer [B, H, W] or [N] (same shape); valid_mask: bool, same shape, True = count.

        Target values outside [0, K) (e.g. a -1 crop padding) are skipped; a prediction outside [0, K) is a
        bug of the caller and raises ValueError.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        k = self.num_classes
        pred = pred.reshape(-1).to(self.confusion.device, torch.int64)
        target = target.reshape(-1).to(self.confusion.device, torch.int64)
        keep = (target >= 0) & (target < k)
        if valid_mask is not None:
            keep &= valid_mask.reshape(-1).to(self.confusion.device, torch.bool)
        pred, target = pred[keep], target[keep]
        if pred.numel() and bool(((pred < 0) | (pred >= k)).any()):
            raise ValueError(f"predictions must lie in 0..{k - 1}")
        self.confusion += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def compute(self, class_names: Sequence[str], protocol: str = "sitskit", **kwargs) -> dict:
        return compute_metrics(self.confusion, class_names, protocol, **kwargs)


# ------------------------------------------------------------------------------------------- protocols
@dataclass
class Scoring:
    """What a protocol keeps: `kept` [K, K] (the confusion of the pixels it scores), the classes it averages
    over, and for stcln the label sets of its restricted IoU and its macro F1."""
    kept: np.ndarray
    scored: list[int]
    iou_labels: list[int] | None = None  # None: IoU from the whole `kept` matrix
    sklearn_f1: bool = False


def protocol_sitskit(conf: np.ndarray, ignore: Sequence[int] = (), background: int | None = None,
                     exclude_background: bool = False, **_) -> Scoring:
    """Clean protocol. Truth pixels of excluded classes (``ignore``: PASTIS void, MTLCC unknown; plus
    background when ``exclude_background``) are not scored. A prediction into an excluded class is kept: it
    is a wrong prediction (a false negative of the true class). Every other class is scored; classes absent
    from truth and prediction are undefined (None) and left out of the means.

    Bias: none known; it is the strictest of the three (excluded predictions are never hidden).
    """
    excluded = set(ignore) | ({background} if exclude_background and background is not None else set())
    kept = conf.copy()
    kept[sorted(excluded), :] = 0
    return Scoring(kept, [k for k in range(len(conf)) if k not in excluded])


def protocol_utae(conf: np.ndarray, ignore: Sequence[int] = (), **_) -> Scoring:
    """utae-paps' IoU meter. The rows **and columns** of ``ignore`` (PASTIS void 19) are zeroed: void truth
    pixels and pixels predicted void both drop out. mIoU is the nan-mean over all other classes, background
    included; OA = trace / sum of that masked matrix. F1, precision, recall and kappa (which utae-paps does
    not report) are computed from the same masked matrix.

    Bias: a model can hide its hardest pixels by predicting void (they leave the matrix); background, the
    majority class, is averaged into mIoU.
    """
    kept = conf.copy()
    ignore = sorted(set(ignore))
    kept[ignore, :] = 0
    kept[:, ignore] = 0
    return Scoring(kept, [k for k in range(len(conf)) if k not in ignore])


def protocol_stcln(conf: np.ndarray, ignore: Sequence[int] = (), background: int | None = None,
                   dataset: str | None = None, **_) -> Scoring:
    """STCLN's test_STCLN.py, biases included.

    Pixels: PASTIS drops truth in {background, void}; MTLCC drops truth = unknown **or prediction = unknown**.
    OA = accuracy and kappa = Cohen's kappa of the remaining pixels. mIoU: nan-mean of TP / (TP + FP + FN)
    over a confusion restricted to the labels present in the remaining truth, so pixels predicted into any
    other label (PASTIS 0 or 19) are not counted at all. mF1: sklearn ``f1_score(average="macro")``: labels =
    union of remaining truth and prediction, a label never predicted (or never true) has F1 0 and counts.

    Bias: MTLCC pixels predicted "unknown" leave the score (hard pixels hidden, optimistic); the restricted
    IoU ignores errors into excluded labels (optimistic); background is not scored on PASTIS.
    """
    if dataset not in ("pastis", "mtlcc"):
        raise UserFacingError(f"protocol stcln: dataset must be 'pastis' or 'mtlcc', not {dataset!r}")
    kept = conf.copy()
    ignore = sorted(set(ignore))
    if dataset == "pastis":
        kept[ignore + ([background] if background is not None else []), :] = 0
    else:
        kept[ignore, :] = 0
        kept[:, ignore] = 0
    truth_labels = [int(k) for k in np.flatnonzero(kept.sum(1))]
    union = [int(k) for k in np.flatnonzero(kept.sum(1) + kept.sum(0))]
    return Scoring(kept, union, iou_labels=truth_labels, sklearn_f1=True)


PROTOCOL_FUNCTIONS = {"sitskit": protocol_sitskit, "utae": protocol_utae, "stcln": protocol_stcln}


# --------------------------------------------------------------------------------------------- metrics
def _div(num: np.ndarray, den: np.ndarray, zero: float = np.nan) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, zero)
    np.divide(num, den, out=out, where=den > 0)
    return out


def cohen_kappa(conf: np.ndarray) -> float:
    """Cohen's kappa of a square confusion; nan when undefined (no pixel, or chance agreement 1)."""
    n = conf.sum()
    if n == 0:
        return float("nan")
    po = np.trace(conf) / n
    pe = float((conf.sum(1).astype(np.float64) * conf.sum(0)).sum()) / float(n) ** 2
    return float("nan") if pe >= 1 else float((po - pe) / (1 - pe))


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _json_number(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def compute_metrics(confusion, class_names: Sequence[str], protocol: str = "sitskit", *,
                    ignore: Sequence[int] = (), background: int | None = None,
                    exclude_background: bool = False, dataset: str | None = None) -> dict:
    """Metrics of a raw [K, K] confusion (rows = truth, columns = prediction; tensor, array or lists).

    ignore: excluded class indices (PASTIS [19], MTLCC [0]); background: PASTIS 0 (stcln drops it, sitskit
    with `exclude_background`); dataset: "pastis" / "mtlcc" (needed by stcln). `protocol_options(attrs)` reads
    all three from a data file's attributes.

    Returns {OA, mIoU, mF1, kappa, per_class: {name: {IoU, F1, precision, recall, support}}, confusion (the
    [K, K] counts the protocol scored, rows = truth), classes (the K names), scored_classes, protocol,
    n_pixels}. Undefined values (a class absent from truth and prediction, no pixel at all) are None and are
    left out of the means; the caller adds n_patches.
    """
    if protocol not in PROTOCOL_FUNCTIONS:
        raise UserFacingError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    conf = confusion.detach().cpu().numpy() if torch.is_tensor(confusion) else np.asarray(confusion)
    conf = conf.astype(np.int64)
    k = len(class_names)
    if conf.shape != (k, k):
        raise UserFacingError(f"confusion of shape {conf.shape} does not match {k} class names")
    s = PROTOCOL_FUNCTIONS[protocol](conf, ignore=ignore, background=background,
                                     exclude_background=exclude_background, dataset=dataset)
    kept = s.kept
    n = int(kept.sum())
    tp = np.diag(kept).astype(np.float64)
    support = kept.sum(1)
    fn, fp = support - tp, kept.sum(0) - tp

    if s.iou_labels is None:
        iou = _div(tp, tp + fp + fn)
    else:  # confusion restricted to iou_labels: pixels outside them (as truth or prediction) do not count
        r = kept[np.ix_(s.iou_labels, s.iou_labels)]
        r_tp = np.diag(r).astype(np.float64)
        iou = np.full(k, np.nan)
        iou[s.iou_labels] = _div(r_tp, r.sum(1) + r.sum(0) - r_tp)
    if s.sklearn_f1:  # sklearn zero_division=0: a label of the union with no prediction / no truth scores 0
        precision, recall = _div(tp, tp + fp, 0.0), _div(tp, tp + fn, 0.0)
        f1 = _div(2 * tp, 2 * tp + fp + fn, 0.0)
    else:
        precision, recall, f1 = _div(tp, tp + fp), _div(tp, tp + fn), _div(2 * tp, 2 * tp + fp + fn)
    scored = np.zeros(k, bool)
    scored[s.scored] = True
    for arr in (iou, precision, recall, f1):
        arr[~scored] = np.nan
    if s.iou_labels is not None:
        iou_mask = np.zeros(k, bool)
        iou_mask[s.iou_labels] = True
        iou[~iou_mask] = np.nan
        miou = _nanmean(iou[iou_mask])
    else:
        miou = _nanmean(iou[scored])

    per_class = {
        class_names[c]: {"IoU": _json_number(iou[c]), "F1": _json_number(f1[c]),
                         "precision": _json_number(precision[c]), "recall": _json_number(recall[c]),
                         "support": int(support[c])}
        for c in s.scored
    }
    return {
        "OA": _json_number(float(np.trace(kept) / n) if n else float("nan")),
        "mIoU": _json_number(miou),
        "mF1": _json_number(_nanmean(f1[scored])),
        "kappa": _json_number(cohen_kappa(kept)),
        "per_class": per_class,
        "confusion": kept.tolist(),
        "classes": list(class_names),
        "scored_classes": [class_names[c] for c in s.scored],
        "protocol": protocol,
        "n_pixels": n,
    }


def protocol_options(attrs) -> dict:
    """compute_metrics keywords from a data file's root attributes (docs/hdf5_format.md): ignore = void_ids,
    background = first of background_ids (if any), dataset."""
    def ints(name):
        return [int(v) for v in np.atleast_1d(attrs.get(name, []))]
    dataset = attrs.get("dataset")
    if isinstance(dataset, bytes):
        dataset = dataset.decode()
    backgrounds = ints("background_ids")
    return {"ignore": ints("void_ids"), "background": backgrounds[0] if backgrounds else None,
            "dataset": dataset}
