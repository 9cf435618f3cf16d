"""Writing an evaluation: metrics.json, its figures (PNG beside it and in MLflow) and a printed table."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

METRIC_KEYS = ("OA", "mIoU", "mF1", "kappa")


class PatchSampler:
    """Keeps the first `n` patches seen (main process) for the RGB / truth / prediction / error figure.
    Subclasses (the panoptic overlay) override `record`."""

    def __init__(self, n: int, band_names, mean, std):
        self.n, self.band_names, self.patches = n, list(band_names), []
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __call__(self, key, image, truth, pred) -> None:
        if len(self.patches) < self.n:
            self.patches.append({"rgb": self.rgb(image), "title": key, **self.record(truth, pred)})

    def rgb(self, image):
        """image: normalised [T, C, H, W] tensor -> [H, W, 3] in [0, 1], or None without B4/B3/B2 (e.g. S1)."""
        from sitskit.finetune.figures import patch_rgb

        raw = image.numpy() * self.std[None, :, None, None] + self.mean[None, :, None, None]
        try:
            return patch_rgb(raw, self.band_names)
        except ValueError:
            return None

    def record(self, truth, probs) -> dict:
        """truth: [H, W] classes; probs: [K, H, W] -> what the figure needs of the patch."""
        return {"truth": truth.numpy(), "pred": probs.argmax(0).numpy()}


def write_evaluation(out_dir: Path, metrics: dict, class_names: list[str], ignore: list[int],
                     patches: list[dict] | None = None, mlflow_prefix: str | None = None,
                     step: int | None = None, class_colors=None) -> Path:
    """metrics.json (atomic) + confusion.png, iou.png, patches.png in `out_dir`; when an MLflow run is active,
    the same files as artifacts under `mlflow_prefix/` and the headline metrics as `<prefix>/OA` etc."""
    from sitskit.finetune.figures import confusion_figure, iou_bars_figure, patch_maps_figure

    figures = {"confusion.png": confusion_figure(metrics), "iou.png": iou_bars_figure(metrics, class_colors)}
    if patches:
        figures["patches.png"] = patch_maps_figure(patches, class_names, class_colors, ignore=ignore)
    return save_evaluation(out_dir, metrics, figures, METRIC_KEYS, mlflow_prefix, step)


def save_evaluation(out_dir: Path, metrics: dict, figures: dict, headline, mlflow_prefix: str | None,
                    step: int | None) -> Path:
    """metrics.json (atomic) and the figures ({file name: matplotlib figure}, closed here) in `out_dir`; with
    an active MLflow run, the folder as artifacts under `mlflow_prefix/` and metrics[k] for k in `headline`
    as `<prefix>/<k>`. Returns the path of metrics.json."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "metrics.json"
    tmp = out_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1) + "\n")
    os.replace(tmp, target)
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
    if mlflow_prefix is not None:
        import mlflow

        if mlflow.active_run() is not None:
            from sitskit import tracking

            mlflow.log_artifacts(str(out_dir), mlflow_prefix)
            tracking.log_metrics({f"{mlflow_prefix}/{k}": metrics[k] for k in headline
                                  if metrics.get(k) is not None}, step=step or 0)
    return target


def metrics_table(metrics: dict, title: str) -> str:
    """A short markdown table: headline metrics, then per-class IoU / F1 / support."""
    head = " | ".join(f"{k} {_fmt(metrics.get(k))}" for k in METRIC_KEYS)
    lines = [(f"{title}: {head}  ({metrics.get('n_patches', '?')} patches, {metrics.get('n_pixels', 0):,} pixels, "
             f"protocol {metrics.get('protocol')})"), "", "| class | IoU | F1 | support |", "|---|---:|---:|---:|"]
    for name, row in metrics.get("per_class", {}).items():
        lines.append(f"| {name} | {_fmt(row['IoU'])} | {_fmt(row['F1'])} | {row['support']:,} |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
