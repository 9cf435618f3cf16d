"""Panoptic (PaPs) fine-tuning: `finetune.py --task panoptic`, and its evaluate / predict commands.

`PanopticFinetuner` is the semantic `Finetuner` with the PaPs loss, a panoptic epoch, validation with the
panoptic meter over the whole validation set, `min_confidence` tuned on the whole validation set, the best
model by validation PQ, and a test evaluation whose `metrics.json` holds SQ / RQ / PQ, the panoptic
`per_class` entries and the `[TP, FP, FN, ΣIoU]` table next to the semantic metrics of the panoptic map
(docs/panoptic.md, "Fine-tuning").
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from sitskit.errors import UserFacingError
from sitskit.finetune.main_finetune import Finetuner, selection
from sitskit.finetune.report import METRIC_KEYS, PatchSampler, save_evaluation

PANOPTIC_KEYS = ("PQ", "SQ", "RQ")
PANOPTIC_MODELS = ("utae_paps", "stcln_paps")
SELECTION_METRIC = "PQ"  # the best checkpoint: highest validation PQ (as utae-paps), whatever eval.metric says


def heatmap_only_epochs(epochs: int) -> int:
    """Epochs trained on the centre (heatmap) term alone: utae-paps' 5 of 100, scaled to the run (epochs // 20,
    at most 5), so a short run is not mostly heatmap-only."""
    return min(5, int(epochs) // 20)


def check_instance_file(path, what: str = "data.path") -> None:
    """Refuse, in one line, a data file that cannot feed the panoptic task (MTLCC, PASTIS without instances)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as exc:
        raise UserFacingError(f"{what} {path}: not a readable HDF5 file ({exc})") from None
    name = attrs.get("dataset")
    name = name.decode() if isinstance(name, bytes) else name
    if name == "mtlcc":
        raise UserFacingError(f"{what} {path}: MTLCC has no instance annotations; the panoptic task needs PASTIS")
    if not int(attrs.get("has_instances", 0)):
        raise UserFacingError(f"{what} {path}: converted without instance annotations (has_instances = 0); "
                              "the panoptic task needs PASTIS with INSTANCE_ANNOTATIONS")


def panoptic_classes(num_classes: int, void_ids, background_ids) -> list[int]:
    """Classes scored by PQ: every class but background and void (PASTIS: 1..18)."""
    skip = set(void_ids) | set(background_ids)
    return [k for k in range(num_classes) if k not in skip]


def panoptic_metrics(table, confusion, class_names, protocol: str, protocol_kwargs: dict, *, void_ids,
                     background_ids, exclude_background: bool = False) -> dict:
    """metrics.json of a panoptic evaluation from the panoptic table [K,4] and the semantic confusion [K,K].

    Top level: SQ, RQ, PQ, per_class (panoptic: {name: {SQ, RQ, PQ, TP, FP, FN}}), table / table_classes /
    table_columns, and OA / mIoU / mF1 / kappa of the panoptic map's classes (0 where no instance);
    `semantic`: the whole compute_metrics dict of that map.
    """
    from sitskit.finetune.metrics import compute_metrics
    from sitskit.finetune.panoptic import PanopticMeter

    k = len(class_names)
    meter = PanopticMeter(k, classes=panoptic_classes(k, void_ids, background_ids),
                          void_label=void_ids[0] if void_ids else None, class_names=class_names)
    meter.table = torch.as_tensor(table, dtype=torch.float64).clone()
    pano = meter.compute()
    semantic = compute_metrics(confusion, class_names, protocol, **protocol_kwargs,
                               exclude_background=exclude_background)
    return {**pano, **{m: semantic[m] for m in METRIC_KEYS}, "semantic": semantic}


class PanopticFinetuner(Finetuner):
    """`finetune.py --task panoptic`: PaPs on U-TAE (`utae_paps`) or on a pre-trained STCLN encoder (`stcln_paps`)."""

    def build(self) -> None:
        cfg = self.cfg
        if Path(cfg["data"]["path"]).is_file():
            check_instance_file(cfg["data"]["path"])
        if cfg["model"]["name"] not in PANOPTIC_MODELS:
            raise UserFacingError(f"model.name {cfg['model']['name']!r} is not a panoptic model; --task panoptic "
                                  f"needs one of {', '.join(PANOPTIC_MODELS)}")
        if cfg["eval"]["window"] is not None:
            raise UserFacingError("eval.window: the panoptic task scores whole patches (set eval.window null)")
        if cfg["loss"]["class_weights"] is not None or cfg["loss"]["label_smoothing"]:
            raise UserFacingError("loss.class_weights / loss.label_smoothing are not used by the PaPs loss; "
                                  "leave them at null / 0 for --task panoptic")
        super().build()

    def build_dataset(self, which: str, **override):
        return super().build_dataset(which, task="panoptic", **override)

    def build_criterion(self):
        from sitskit.models.paps_loss import PaPsLoss

        core = self.accelerator.unwrap_model(self.model)
        void = self.info["void_ids"][0] if self.info["void_ids"] else None
        self.eval_criterion = PaPsLoss(void_label=void, reference_numerics=core.reference_numerics)
        return PaPsLoss(void_label=void, reference_numerics=core.reference_numerics)

    # ------------------------------------------------------------------------------------- training
    desc = "finetune panoptic"

    def epoch_function(self):
        from sitskit.finetune.engine_panoptic import train_one_epoch

        return train_one_epoch

    def on_epoch_start(self, epoch: int) -> None:
        """The reference trains the heatmap head alone for its first epochs."""
        self.criterion.heatmap_only = epoch < heatmap_only_epochs(self.cfg["train"]["epochs"])

    # validate_epoch as the semantic stage's, but min_confidence is tuned on the whole validation set first
    # (the tuned value is in the exported weights) and the best model is the one with the highest PQ
    def validate(self) -> dict:
        return self.score(self.val_dataset, "val", tune=True)

    def selection_value(self, metrics: dict):
        return metrics[SELECTION_METRIC]

    def validation_log(self, metrics: dict) -> dict:
        logged = {f"val/{k}": metrics[k] for k in (*PANOPTIC_KEYS, *METRIC_KEYS) if metrics.get(k) is not None}
        logged.update({f"val/loss_{k}" if k != "loss" else "val/loss": v for k, v in metrics["loss"].items()})
        logged["val/min_confidence"] = metrics["min_confidence"]
        return logged

    def score(self, dataset, name: str, on_patch=None, tune: bool = False) -> dict:
        from sitskit.finetune.engine_panoptic import evaluate_panoptic

        info = self.info
        result = evaluate_panoptic(
            self.accelerator.unwrap_model(self.model), dataset, self.accelerator, info["num_classes"],
            self.eval_criterion, panoptic_classes=panoptic_classes(info["num_classes"], info["void_ids"],
                                                                   info["background_ids"]),
            void_label=info["void_ids"][0] if info["void_ids"] else None,
            batch_size=self.cfg["data"]["eval_batch_size"], tune=tune, on_patch=on_patch,
            progress=self.cfg["run"]["progress"], desc=name, num_workers=self.cfg["data"]["num_workers"])
        metrics = panoptic_metrics(result["table"], result["confusion"], info["class_names"],
                                   self.cfg["eval"]["protocol"], info["protocol_kwargs"], void_ids=info["void_ids"],
                                   background_ids=info["background_ids"],
                                   exclude_background=self.cfg["loss"]["ignore_background"])
        metrics.update({k: result[k] for k in ("n_patches", "min_confidence", "loss", "tune_score", "tune_centres")
                        if k in result})
        return metrics

    def export_model(self, val_metrics: dict | None) -> None:
        """The semantic export (weights with the tuned `min_confidence` buffer, config.json), then config.json
        gains val_metric "PQ", its value, `min_confidence` and the validation SQ / RQ / PQ."""
        tracking, self.tracking = self.tracking, False  # artifacts are logged once config.json is final
        try:
            super().export_model(val_metrics)
        finally:
            self.tracking = tracking
        if self.accelerator.is_main_process:
            path = self.run_dir / "model" / "config.json"
            meta = json.loads(path.read_text())
            meta.update(self.export_extra(val_metrics))
            tmp = path.with_name(".config.json.tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp, path)
            if self.tracking:
                from sitskit import tracking as mlflow_tracking

                for f in ("config.json", "model.safetensors"):
                    mlflow_tracking.log_artifact(path.parent / f, "model")
        self.accelerator.wait_for_everyone()

    def export_extra(self, val_metrics: dict | None) -> dict:
        core = self.accelerator.unwrap_model(self.model)
        return {"val_metric": SELECTION_METRIC,
                "val_value": None if val_metrics is None else val_metrics[SELECTION_METRIC],
                "min_confidence": round(float(core.min_confidence), 6),  # 0.39, not 0.38999998
                "val_panoptic": None if val_metrics is None else
                {k: val_metrics.get(k) for k in (*PANOPTIC_KEYS, "tune_score", "tune_centres")}}

    # ------------------------------------------------------------------------------------- the end
    def evaluate_test(self, test) -> None:
        info = self.info
        sampler = PanopticSampler(self.cfg["eval"]["figures"] if self.accelerator.is_main_process else 0,
                                  self.dataset.band_names, self.dataset.norm_mean, self.dataset.norm_std)
        metrics = self.score(test, "test", on_patch=sampler)
        metrics.update(cutoff={"max_doy": self.cfg["data"]["max_doy"], "max_date": self.cfg["data"]["max_date"]},
                       checkpoint=str(self.run_dir / "model"), data=str(Path(self.cfg["data"]["path"]).resolve()),
                       selection=selection(self.cfg["data"], "test"))
        if self.accelerator.is_main_process:
            write_panoptic_evaluation(self.run_dir / "test", metrics, info["class_names"],
                                      sampler.patches if self.cfg["run"]["figure"] else None,
                                      mlflow_prefix="test" if self.tracking else None, step=self.state.step,
                                      class_colors=info["class_colors"])
            print(panoptic_table(metrics, "test"))


# ------------------------------------------------------------------------------------------ reports
class PanopticSampler(PatchSampler):
    """Keeps the first `n` patches seen (main process) for the panoptic overlay figure."""

    def record(self, truth, pred) -> dict:
        return {"true_instances": truth["instances"].numpy(), "true_classes": truth["semantic"].numpy(),
                "pred_instances": pred["instances"].numpy(), "pred_classes": pred["classes"].numpy()}


def instance_outlines(instances: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels of an instance (id > 0) with a 4-neighbour of another id (or the image border)."""
    padded = np.pad(instances, 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(instances.shape, bool)
    for dy, dx in ((0, 1), (1, 0), (1, 2), (2, 1)):
        edge |= padded[dy:dy + instances.shape[0], dx:dx + instances.shape[1]] != centre
    return edge & (instances > 0)


def panoptic_overlay_figure(patches, class_names, class_colors_rgb=None):
    """One row per patch: truth | prediction, each the instance outlines (coloured by class) over the RGB."""
    from matplotlib.patches import Patch

    from sitskit.finetune.figures import _plt, class_colors

    plt = _plt()
    colors = class_colors(class_names, class_colors_rgb)
    fig, axes = plt.subplots(len(patches), 2, figsize=(7.0, 3.2 * len(patches) + 0.4), squeeze=False)
    present: set[int] = set()
    for row, p in zip(axes, patches):
        base = p["rgb"] if p["rgb"] is not None else np.full((*p["true_instances"].shape, 3), 0.5)
        for ax, which in zip(row, ("true", "pred")):
            inst, cls = p[f"{which}_instances"], p[f"{which}_classes"]
            img = np.array(base, np.float32, copy=True)
            edge = instance_outlines(inst)
            img[edge] = colors[np.clip(cls[edge], 0, len(colors) - 1)]
            present |= set(np.unique(cls[inst > 0]).tolist())
            n = len(np.unique(inst[inst > 0]))
            ax.imshow(img, interpolation="nearest")
            ax.set_title(f"{p['title']} {'truth' if which == 'true' else 'prediction'} ({n} parcels)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(facecolor=colors[c], edgecolor="0.3", label=class_names[c]) for c in sorted(present)
               if 0 <= c < len(class_names)]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.74, 0.5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.74, 1))
    return fig


def pq_bars_figure(metrics: dict, class_colors_rgb=None):
    """Per-class PQ bars (classes present in truth or prediction), with the mean PQ line."""
    from sitskit.finetune.figures import class_bars_figure, class_colors

    names = [n for n, r in metrics["per_class"].items() if r["TP"] + r["FP"] + r["FN"] > 0]
    all_names = metrics["semantic"]["classes"]
    colors = class_colors(all_names, class_colors_rgb)
    rows = [metrics["per_class"][n] for n in names]
    pq = [r["PQ"] or 0.0 for r in rows]
    labels = [f"{v:.2f} (TP {r['TP']}, FP {r['FP']}, FN {r['FN']})" for v, r in zip(pq, rows)]
    return class_bars_figure(names, pq, colors[[all_names.index(n) for n in names]], labels, metrics["PQ"], "PQ",
                             "per-class panoptic quality", xmax=1.3)


def write_panoptic_evaluation(out_dir: Path, metrics: dict, class_names, patches=None,
                              mlflow_prefix: str | None = None, step: int | None = None, class_colors=None) -> Path:
    """metrics.json (atomic) + pq.png, panoptic.png (overlays) and the semantic confusion.png / iou.png in
    `out_dir`; with an active MLflow run, the files as artifacts under `mlflow_prefix/` and the headline
    metrics as `<prefix>/PQ` etc. (as report.write_evaluation)."""
    from sitskit.finetune.figures import confusion_figure, iou_bars_figure

    semantic = metrics["semantic"]
    figures = {"pq.png": pq_bars_figure(metrics, class_colors), "confusion.png": confusion_figure(semantic),
               "iou.png": iou_bars_figure(semantic, class_colors)}
    if patches:
        figures["panoptic.png"] = panoptic_overlay_figure(patches, class_names, class_colors)
    return save_evaluation(out_dir, metrics, figures, (*PANOPTIC_KEYS, *METRIC_KEYS), mlflow_prefix, step)


def panoptic_table(metrics: dict, title: str) -> str:
    """Markdown: headline metrics, then per-class SQ / RQ / PQ and counts."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    head = " | ".join(f"{k} {fmt(metrics.get(k))}" for k in (*PANOPTIC_KEYS, "mIoU", "OA"))
    lines = [f"{title}: {head}  ({metrics.get('n_patches', '?')} patches"
             + (f", min_confidence {metrics['min_confidence']:.2f}" if metrics.get("min_confidence") is not None
                else "") + ")", "", "| class | SQ | RQ | PQ | TP | FP | FN |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in metrics["per_class"].items():
        if r["TP"] + r["FP"] + r["FN"]:
            lines.append(f"| {name} | {fmt(r['SQ'])} | {fmt(r['RQ'])} | {fmt(r['PQ'])} | {r['TP']} | {r['FP']} | "
                         f"{r['FN']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- commands hooks
def _checkpoint_panoptic_dataset(args, meta):
    from sitskit.finetune.commands import checkpoint_dataset

    check_instance_file(args.data, "--data")
    if args.window is not None:
        raise UserFacingError("--window: a panoptic model scores whole patches")
    ds, label, cutoff = checkpoint_dataset(args, meta)  # the run's selection, bands, statistics and cut-off
    ds.task = "panoptic"  # the same patches with the PaPs targets (a PASTIS file with instances, checked above)
    return ds, label, cutoff


def _info(meta: dict, ds) -> dict:
    from sitskit.finetune.main_finetune import data_info

    info = data_info(ds)
    info["class_names"] = list(meta["class_names"])
    return info


def evaluate_checkpoint(args, model, meta: dict, run_dir: Path) -> int:
    """`finetune.py evaluate --checkpoint RUN` of a panoptic run: metrics.json + figures in --out (default
    <run>/eval-<selection>-<protocol>), with the checkpoint's own min_confidence."""
    from sitskit.finetune.commands import _accelerator, _loader_args, _mlflow_run
    from sitskit.finetune.engine_panoptic import evaluate_panoptic

    ds, label, cutoff = _checkpoint_panoptic_dataset(args, meta)
    acc = _accelerator(args)
    model = model.to(acc.device)
    info = _info(meta, ds)
    sampler = PanopticSampler(args.figures, ds.band_names, ds.norm_mean, ds.norm_std)
    result = evaluate_panoptic(model, ds, acc, info["num_classes"],
                               panoptic_classes=panoptic_classes(info["num_classes"], info["void_ids"],
                                                                 info["background_ids"]),
                               void_label=info["void_ids"][0] if info["void_ids"] else None, on_patch=sampler,
                               progress=True, desc=f"evaluate {label}", **_loader_args(args, meta))
    metrics = panoptic_metrics(result["table"], result["confusion"], info["class_names"], args.protocol,
                               info["protocol_kwargs"], void_ids=info["void_ids"],
                               background_ids=info["background_ids"],
                               exclude_background=meta["finetune_config"]["loss"]["ignore_background"])
    metrics.update(n_patches=result["n_patches"], min_confidence=result["min_confidence"], cutoff=cutoff,
                   checkpoint=str(run_dir), data=str(Path(args.data).resolve()), selection=label)
    out = Path(args.out) if args.out else run_dir / f"eval-{label}-{args.protocol}"
    with _mlflow_run(meta.get("mlflow_run_id")):
        write_panoptic_evaluation(out, metrics, info["class_names"], sampler.patches,
                                  mlflow_prefix=f"eval-{label}-{args.protocol}", class_colors=info["class_colors"])
    print(panoptic_table(metrics, f"{label} ({args.protocol})"))
    print(f"\nwrote {out / 'metrics.json'} and figures")
    return 0


def predict_checkpoint(args, model, meta: dict, run_dir: Path) -> int:
    """`finetune.py predict --checkpoint RUN` of a panoptic run: `semantic` = the panoptic map's class (0
    where no instance), `instances`, `instance_class`, `instance_score` per patch; `--probs`: the softmax of
    `pano_semantic` (uniform where no instance covers the pixel)."""
    from sitskit.finetune.commands import _accelerator, _loader_args
    from sitskit.finetune.engine_panoptic import evaluate_panoptic
    from sitskit.finetune.predictions import PredictionWriter

    ds, label, cutoff = _checkpoint_panoptic_dataset(args, meta)
    acc = _accelerator(args)
    model = model.to(acc.device)
    info = _info(meta, ds)
    with PredictionWriter(args.out, args.data, model=meta["name"], checkpoint=str(run_dir),
                          overwrite=args.overwrite, instances=True) as writer:
        def write(key, image, truth, pred):
            writer.write(key, pred["classes"].to(torch.uint8).numpy(),
                         pred["semantic"].softmax(0).half().numpy() if args.probs else None,
                         instances=pred["instances"].numpy(), instance_class=pred["instance_class"].numpy(),
                         instance_score=pred["instance_score"].numpy())

        evaluate_panoptic(model, ds, acc, info["num_classes"],
                          panoptic_classes=panoptic_classes(info["num_classes"], info["void_ids"],
                                                            info["background_ids"]),
                          void_label=info["void_ids"][0] if info["void_ids"] else None, on_patch=write,
                          progress=True, desc=f"predict {label}", **_loader_args(args, meta))
        writer.file.attrs["selection"] = label
        writer.file.attrs["cutoff"] = json.dumps(cutoff)
        writer.file.attrs["min_confidence"] = round(float(model.min_confidence), 6)
    print(f"wrote {args.out} ({len(ds.ids)} patches of {args.data}, with instances)")
    return 0


def evaluate_predictions(args) -> int:
    """`finetune.py evaluate --predictions PRED.h5` of a file with instances: the panoptic metrics.json."""
    import h5py

    from sitskit.finetune.predictions import score_panoptic_predictions

    pred = Path(args.predictions)
    check_instance_file(args.data, "--data")
    keys = None
    if args.folds:
        with h5py.File(args.data, "r") as f:
            idx = {k: f["index"][k][()] for k in ("key", "fold")}
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k, fold in zip(idx["key"], idx["fold"])
                if int(fold) in args.folds]
    elif args.split or args.years:
        raise UserFacingError("--split / --years: PASTIS prediction files are selected with --folds")
    metrics = score_panoptic_predictions(pred, args.data, args.protocol, keys=keys)
    metrics.update(predictions=str(pred.resolve()), data=str(Path(args.data).resolve()))
    out = Path(args.out) if args.out else pred.with_name(pred.stem + f"-eval-{args.protocol}")
    write_panoptic_evaluation(out, metrics, metrics["semantic"]["classes"], None)
    print(panoptic_table(metrics, f"{pred.name} ({args.protocol})"))
    print(f"\nwrote {out / 'metrics.json'}")
    return 0
