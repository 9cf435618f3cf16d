"""`accelerate launch finetune.py --config demo|pastis_stcln|pastis_utae|mtlcc_stcln|mtlcc_crossyear|FILE.yaml
[--model.pretrained checkpoints/<run>/encoder | runs:/<id>/encoder] [--section.key value …] [--resume RUN]`

Fine-tunes (or trains from scratch) a segmentation model with few labels: validation each epoch, the best
checkpoint by `eval.metric` exported to `<run>/model/`, early stopping, then the test selection scored with
the best model (`<run>/test/metrics.json` + figures, also in MLflow). Other commands:

    python finetune.py evaluate --checkpoint RUN --data FILE.h5 [--split test | --folds 4] [--protocol sitskit|utae|stcln]
    python finetune.py evaluate --predictions PRED.h5 --data FILE.h5 [--protocol …]
    python finetune.py predict  --checkpoint RUN --data FILE.h5 --out PRED.h5 [--probs]
    python finetune.py sweep labels|early-season|cross-year|models|noise --config … [--seeds 0 1 2]

(`python finetune.py evaluate --help` etc. for their options.) docs/finetuning.md explains the keys below.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from sitskit.errors import UserFacingError
from sitskit.finetune.config_finetune import SECTIONS
from sitskit.finetune.report import METRIC_KEYS
from sitskit.stage.base import Stage, index_digest
from sitskit.stage.cli import run_main
from sitskit.stage.state import atomic_write_dir

COMMANDS = ("evaluate", "predict", "sweep")


def main(argv: list[str] | None = None) -> int:
    """Entry point: training by default, or one of COMMANDS."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        from sitskit.finetune import commands

        return commands.main(argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    argv = ["--train.task" if a == "--task" else a for a in argv]
    return run_main(lambda cfg, resume_dir: stage_class(cfg)(cfg, resume_dir).run(), argv, SECTIONS,
                    stage="finetune", prog=_prog(), description=__doc__)


def stage_class(cfg: dict) -> type:
    """Finetuner for semantic segmentation; its panoptic (PaPs) subclass for --task panoptic."""
    if cfg["train"]["task"] == "panoptic":
        from sitskit.finetune.panoptic_stage import PanopticFinetuner

        return PanopticFinetuner
    return Finetuner


def _prog() -> str:
    name = Path(sys.argv[0]).name
    return name if name in ("finetune.py", "sitskit-finetune") else "finetune.py"


def selection(d: dict, which: str) -> dict | None:
    """build_dataset arguments of the train / val / test selection, or None when it is not configured."""
    prefix = "" if which == "train" else f"{which}_"
    folds, split = d[f"{prefix}folds"], d[f"{prefix}split"]
    subset = d["label_subset"] if which == "train" else d["val_label_subset"] if which == "val" else None
    if which != "train" and not folds and split is None and subset is None:
        return None
    return {"folds": folds or None, "split": split, "years": d["years"] or None, "label_subset": subset}


class Finetuner(Stage):
    """Holds the objects of one fine-tuning run."""

    name = "finetune"
    exported = ("model", "test")

    # ---------------------------------------------------------------------------------------- setup
    def build(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        d = cfg["data"]
        if not Path(d["path"]).is_file():
            raise UserFacingError(f"data.path: {d['path']} does not exist")
        self.data_digest = index_digest(d["path"])
        self.dataset = self.build_dataset("train")
        self.val_dataset = self.build_dataset("val")
        self.info = data_info(self.dataset)
        self.ignore = torch.zeros(self.info["num_classes"], dtype=torch.bool)
        self.ignore[self.info["void_ids"]] = True
        if cfg["loss"]["ignore_background"]:
            self.ignore[self.info["background_ids"]] = True
        self.loader = self.build_loader(self.dataset)
        self.pretrained = self.resolve_pretrained()
        from sitskit.finetune.model_setup import build_finetune_model, count_parameters, parameter_groups

        self.model = build_finetune_model(cfg["model"], len(self.dataset.band_names), self.info["num_classes"],
                                          self.pretrained)
        self.n_params = count_parameters(self.model)
        o = cfg["optim"]
        groups = parameter_groups(self.model, o["lr"], o["weight_decay"], cfg["model"]["encoder_lr"])
        self.optimizer = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]))
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.total_steps = (cfg["train"]["max_steps"] or
                            max(1, cfg["train"]["epochs"] * len(self.loader) // o["grad_accum"]))
        from sitskit.stage.optim import build_scheduler

        self.scheduler = build_scheduler(self.optimizer, o, self.total_steps)
        self.criterion = self.build_criterion()
        self.state.extra = {"best": None, "best_epoch": -1, "bad_evals": 0, "validated_epoch": -1}

    def build_dataset(self, which: str, **override):
        """The train / val / test selection (None if not configured); validation and test read full patches
        with every date up to the early-season cut-off, standardised with the training statistics."""
        sel = selection(self.cfg["data"], which)
        if sel is None:
            return None
        d = self.cfg["data"]
        args = dict(task="semantic", norm=None if d["norm"] == "none" else d["norm"], sat=d["sat"],
                    max_doy=d["max_doy"], max_date=d["max_date"], seed=self.cfg["run"]["seed"], **sel)
        if which == "train":
            args.update(crop=d["crop"], crop_mode=d["crop_mode"], crop_cells=d["crop_cells"],
                        num_dates=d["num_dates"], augment=d["augment"], noise_sigma=d["noise_sigma"],
                        noise_prob=d["noise_prob"])
        else:
            args.update(norm=(self.dataset.norm_mean, self.dataset.norm_std), num_dates=d["eval_num_dates"])
        args.update(override)
        return open_dataset(d["path"], which, **args)

    def resolve_pretrained(self) -> Path | None:
        source = self.cfg["model"]["pretrained"]
        if not source:
            return None
        from sitskit.finetune.model_setup import resolve_pretrained

        cache = Path(self.cfg["output"]["dir"]) / ".mlflow_cache"
        if self.accelerator.is_main_process:
            path = resolve_pretrained(source, cache)
        self.accelerator.wait_for_everyone()
        return path if self.accelerator.is_main_process else resolve_pretrained(source, cache)

    def build_criterion(self):
        from functools import partial

        from sitskit.finetune.engine_finetune import masked_cross_entropy
        from sitskit.finetune.model_setup import class_weights

        counts = torch.as_tensor(training_class_pixels(self.dataset), dtype=torch.float64)
        self.class_weight = class_weights(self.cfg["loss"]["class_weights"], counts, self.ignore)
        weight = None if self.class_weight is None else self.class_weight.to(self.accelerator.device)
        return partial(masked_cross_entropy, ignore=self.ignore.to(self.accelerator.device), weight=weight,
                       label_smoothing=self.cfg["loss"]["label_smoothing"])

    def log_inputs(self) -> None:
        from sitskit import tracking

        path = self.cfg["data"]["path"]
        name = f"{self.info['dataset']}:{Path(path).name}"
        tracking.log_dataset(path, name=name, digest=self.data_digest, context="training",
                             n_patches=len(set(self.dataset.ids)))
        tags = {"dataset.ids": ",".join(map(str, self.dataset.ids))[:5000],
                "dataset.n_labelled_patches": str(len(set(self.dataset.ids))),
                "model.parameters": str(self.n_params[0]), "model.trainable_parameters": str(self.n_params[1])}
        if self.val_dataset is not None:
            tags["dataset.val_ids"] = ",".join(map(str, self.val_dataset.ids))[:5000]
        if self.pretrained is not None:
            from sitskit.finetune.model_setup import weights_digest
            from sitskit.models.registry import read_pretrained_config

            tags.update({"pretrained.source": str(self.cfg["model"]["pretrained"]),
                         "pretrained.path": str(self.pretrained.resolve()),
                         "pretrained.sha256": weights_digest(self.pretrained)})
            if self.pretrained.is_dir():
                meta = read_pretrained_config(self.pretrained)
                if meta.get("mlflow_run_id"):
                    tags["pretrained.run_id"] = str(meta["mlflow_run_id"])
        else:
            tags["pretrained.source"] = "none (from scratch)"
        tracking.set_tags(tags)

    # ------------------------------------------------------------------------------------- training
    desc = "finetune"

    def train(self) -> None:
        from tqdm.auto import tqdm

        acc, state, cfg = self.accelerator, self.state, self.cfg
        train_one_epoch = self.epoch_function()
        self.progress = tqdm(total=self.total_steps, initial=state.step, desc=self.desc, unit="step",
                             disable=not (acc.is_main_process and cfg["run"]["progress"]), dynamic_ncols=True)
        while state.step < self.total_steps:
            self.sampler.set_epoch(state.epoch)
            self.dataset.set_epoch(state.epoch)
            self.loader.generator.manual_seed(cfg["run"]["seed"] + state.epoch)
            self.on_epoch_start(state.epoch)
            loader = acc.skip_first_batches(self.loader, state.batch) if state.batch else self.loader
            t0 = time.perf_counter()
            stop = train_one_epoch(self.model, loader, self.optimizer, self.scheduler, acc, state, cfg,
                                   self.criterion, self.total_steps, on_step=self.log_step,
                                   on_batch_end=self.after_batch)
            # training time without validation, summed over resumes (the zoo table's "train s")
            state.extra["train_seconds"] = state.extra.get("train_seconds", 0.0) + time.perf_counter() - t0
            self.progress.update(state.step - self.progress.n)
            if self.stop.requested:
                return
            if stop and state.step < self.total_steps:
                return
            if self.validate_epoch():  # early stopping
                break
            if state.step >= self.total_steps:
                break
            state.epoch, state.batch = state.epoch + 1, 0

    def epoch_function(self):
        """The engine's one-epoch function (the panoptic stage swaps in its own)."""
        from sitskit.finetune.engine_finetune import train_one_epoch

        return train_one_epoch

    def on_epoch_start(self, epoch: int) -> None:
        """Hook before each epoch (e.g. PaPs' heatmap-only warm-up epochs)."""

    def log_step(self, metrics: dict) -> None:
        self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if self.accelerator.is_main_process:
            self.log_metrics(metrics, step=self.state.step)

    def validate_epoch(self) -> bool:
        """Validate after epoch `state.epoch` (every eval.every epochs, and after the last); export the best
        model; return True to stop early. Idempotent per epoch, so a resume right after it repeats nothing."""
        e, extra, ev = self.cfg["eval"], self.state.extra, self.state.epoch
        last = self.state.step >= self.total_steps
        if extra["validated_epoch"] == ev or not (last or (ev + 1) % e["every"] == 0):
            return False
        extra["validated_epoch"] = ev
        if self.val_dataset is None:
            return False
        metrics = self.validate()
        value = self.selection_value(metrics)
        if self.accelerator.is_main_process:
            self.log_metrics(self.validation_log(metrics), step=self.state.step)
        improved = value is not None and (extra["best"] is None or value > extra["best"])
        if improved:
            extra.update(best=value, best_epoch=ev, bad_evals=0)
            self.export_model(metrics)
        else:
            extra["bad_evals"] += 1
        return bool(e["patience"]) and extra["bad_evals"] >= e["patience"]

    # hooks of validate_epoch, overridden by the panoptic stage
    def validate(self) -> dict:
        """Metrics of the validation set."""
        return self.score(self.val_dataset, "val")

    def selection_value(self, metrics: dict):
        """The value the best model maximises (eval.metric); None = not defined."""
        return metrics[self.cfg["eval"]["metric"]]

    def validation_log(self, metrics: dict) -> dict:
        """What validation logs to MLflow."""
        return {f"val/{k}": metrics[k] for k in METRIC_KEYS if metrics.get(k) is not None}

    def score(self, dataset, name: str, on_patch=None) -> dict:
        from sitskit.finetune.engine_finetune import evaluate
        from sitskit.finetune.metrics import compute_metrics

        e = self.cfg["eval"]
        confusion, n = evaluate(self.accelerator.unwrap_model(self.model), dataset, self.accelerator,
                                self.info["num_classes"], window=e["window"], overlap=e["overlap"],
                                batch_size=self.cfg["data"]["eval_batch_size"], on_patch=on_patch,
                                progress=self.cfg["run"]["progress"], desc=name,
                                num_workers=self.cfg["data"]["num_workers"])
        metrics = compute_metrics(confusion, self.info["class_names"], e["protocol"], **self.info["protocol_kwargs"],
                                  exclude_background=self.cfg["loss"]["ignore_background"])
        metrics["n_patches"] = n
        return metrics

    # ------------------------------------------------------------------------------------- the end
    def finish(self, interrupted: bool) -> None:
        if interrupted:
            return
        acc = self.accelerator
        if self.val_dataset is None:  # no validation: the final model is the one kept
            self.export_model(None)
        acc.wait_for_everyone()
        self.load_best()
        test = self.build_dataset("test")
        if test is not None:
            self.evaluate_test(test)
        acc.print(f"done: model exported to {self.run_dir / 'model'}"
                  + (f" (MLflow run {self.state.mlflow_run_id})" if self.tracking else ""))

    def evaluate_test(self, test) -> None:
        from sitskit.finetune.report import PatchSampler, metrics_table, write_evaluation

        sampler = PatchSampler(self.cfg["eval"]["figures"] if self.accelerator.is_main_process else 0,
                               self.dataset.band_names, self.dataset.norm_mean, self.dataset.norm_std)
        t0 = time.perf_counter()
        metrics = self.score(test, "test", on_patch=sampler)
        seconds = time.perf_counter() - t0
        metrics.update(parameters=self.n_params[0], train_seconds=self.state.extra.get("train_seconds"),
                       test_seconds=seconds, test_patches_per_s=metrics["n_patches"] / max(seconds, 1e-9),
                       hardware=_hardware(),
                       cutoff={"max_doy": self.cfg["data"]["max_doy"], "max_date": self.cfg["data"]["max_date"]},
                       checkpoint=str(self.run_dir / "model"), data=str(Path(self.cfg["data"]["path"]).resolve()),
                       selection=selection(self.cfg["data"], "test"))
        if self.accelerator.is_main_process:
            write_evaluation(self.run_dir / "test", metrics, self.info["class_names"], self.info["void_ids"],
                             sampler.patches if self.cfg["run"]["figure"] else None,
                             mlflow_prefix="test" if self.tracking else None, step=self.state.step,
                             class_colors=self.info["class_colors"])
            print(metrics_table(metrics, "test"))

    def export_model(self, val_metrics: dict | None) -> None:
        """save_pretrained of the (best) model into run_dir/model with everything evaluate/predict need."""
        acc = self.accelerator
        if acc.is_main_process:
            from sitskit.models import save_pretrained

            target = self.run_dir / "model"
            extra = {"stage": "finetune", "task": self.cfg["train"]["task"], "mlflow_run_id": self.state.mlflow_run_id or None,
                     "step": self.state.step, "epoch": self.state.epoch, "finetune_config": self.cfg,
                     "val_metric": self.cfg["eval"]["metric"],
                     "val_value": None if val_metrics is None else val_metrics[self.cfg["eval"]["metric"]],
                     "data_sha256_index": self.data_digest, "band_names": list(self.dataset.band_names),
                     "norm_mean": [float(v) for v in self.dataset.norm_mean],
                     "norm_std": [float(v) for v in self.dataset.norm_std],
                     "pretrained": None if self.pretrained is None else str(self.pretrained.resolve()),
                     **{k: self.info[k] for k in ("dataset", "class_names", "num_classes", "void_ids",
                                                  "background_ids")}}
            atomic_write_dir(target, lambda tmp: save_pretrained(acc.unwrap_model(self.model), tmp, extra=extra),
                             f"the model to {target}")
            if self.tracking:
                from sitskit import tracking

                for f in ("config.json", "model.safetensors"):
                    tracking.log_artifact(target / f, "model")
        acc.wait_for_everyone()

    def load_best(self) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(self.run_dir / "model" / "model.safetensors"))
        self.accelerator.unwrap_model(self.model).load_state_dict(weights)


# ------------------------------------------------------------------------------------------- helpers
def _hardware() -> dict:
    """Where the timings of metrics.json were measured: CPU / GPU model, core count and torch threads."""
    from sitskit.tracking import cpu_model

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def open_dataset(path, which: str, **args):
    """build_dataset with errors that say which selection and what was asked."""
    from sitskit.data import build_dataset

    try:
        return build_dataset(path, **args)
    except UserFacingError as exc:
        cut = args.get("max_doy") or args.get("max_date")
        if cut and "selection is empty" in str(exc):
            raise UserFacingError(f"{path}: the early-season cut-off {cut} is before the first date of every "
                                  f"{which} patch") from None
        raise UserFacingError(f"{which} selection: {exc}") from None
    except (ValueError, KeyError, OSError) as exc:
        raise UserFacingError(f"{path} ({which} selection): {exc}") from None


def data_info(dataset) -> dict:
    """Class names, void / background ids, colours and metric options of a dataset's file."""
    import h5py
    import numpy as np

    from sitskit.finetune.metrics import protocol_options

    with h5py.File(dataset.path, "r") as f:
        attrs = dict(f.attrs)
    opts = protocol_options(attrs)
    void = [int(v) for v in np.atleast_1d(attrs.get("void_ids", [dataset.ignore_index]))]
    background = [int(v) for v in np.atleast_1d(attrs.get("background_ids", []))]
    colors = attrs.get("class_colors")
    if isinstance(colors, (str, bytes)):  # stored as text "[[0 0 0] [122 189 82] …]"
        import re

        values = [int(v) for v in re.findall(r"\d+", colors.decode() if isinstance(colors, bytes) else colors)]
        colors = np.array(values).reshape(-1, 3) if len(values) == 3 * int(dataset.num_classes) else None
    return {"dataset": dataset.dataset_name, "class_names": list(dataset.class_names),
            "num_classes": int(dataset.num_classes), "void_ids": void, "background_ids": background,
            "class_colors": None if colors is None else np.asarray(colors), "protocol_kwargs": opts}


def training_class_pixels(dataset) -> list[int]:
    """Labelled pixels per class over the training patches (the file's index; duplicates counted)."""
    import h5py

    with h5py.File(dataset.path, "r") as f:
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["index"]["key"][()]]
        counts = f["index"]["class_pixels"][()]
    row = {k: i for i, k in enumerate(keys)}
    return counts[[row[k] for k in dataset.ids]].sum(0).tolist()


if __name__ == "__main__":
    sys.exit(main())
