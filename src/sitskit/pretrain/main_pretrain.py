"""`accelerate launch pretrain.py --config demo|pastis|mtlcc|FILE.yaml [--section.key value …] [--resume RUN]`

Masked spatio-temporal reconstruction (STCLN). Sets up data, model, optimiser, schedule and the mask
generator, then calls `engine_pretrain.train_one_epoch` until the step budget is spent. Writes
`<output.dir>/<name>/`: `state/step_XXXXXXXX/` (safe states for exact `--resume`), `encoder/`
(`save_pretrained` export, also logged to MLflow so `runs:/<id>/encoder` works as `--model.pretrained` of
finetune.py) and `config.yaml`. Every key below is also a YAML preset key; docs/pretraining.md explains them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from sitskit.errors import UserFacingError
from sitskit.pretrain.config_pretrain import SECTIONS
from sitskit.stage.base import Stage, index_digest
from sitskit.stage.cli import run_main
from sitskit.stage.state import atomic_write_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 Ctrl-C, 143 SIGTERM)."""
    return run_main(lambda cfg, resume_dir: Pretrainer(cfg, resume_dir).run(), argv, SECTIONS, stage="pretrain",
                    prog=_prog(), description=__doc__)


def _prog() -> str:
    name = Path(sys.argv[0]).name
    return name if name in ("pretrain.py", "sitskit-pretrain") else "pretrain.py"


class Pretrainer(Stage):
    """Holds the objects of one pre-training run."""

    name = "pretrain"
    exported = ("encoder",)

    # ---------------------------------------------------------------------------------------- setup
    def build(self) -> None:
        acc = self.accelerator
        self.dataset, self.holdout = self.build_datasets()
        self.data_digest = index_digest(self.cfg["data"]["path"])
        self.loader = self.build_loader(self.dataset)
        self.model = self.build_model(len(self.dataset.band_names))
        self.optimizer = self.build_optimizer(self.model)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.total_steps = self.count_total_steps()
        self.scheduler = self.build_scheduler(self.optimizer, self.total_steps)
        self.masker = self.build_masker(self.dataset)

    def build_datasets(self):
        from sitskit.data import build_dataset

        d = self.cfg["data"]
        path = Path(d["path"])
        if not path.is_file():
            raise UserFacingError(f"data.path: {path} does not exist")
        common = {"task": "pretrain", "folds": d["folds"] or None, "split": d["split"], "years": d["years"] or None,
                      "norm": None if d["norm"] == "none" else d["norm"], "crop": d["crop"], "crop_mode": d["crop_mode"],
                      "num_dates": d["num_dates"], "max_doy": d["max_doy"], "seed": self.cfg["run"]["seed"], "sat": d["sat"]}
        try:
            full = build_dataset(path, **common)
            holdout = None
            n_hold = d["holdout_patches"]
            if n_hold and len(full.ids) > n_hold:
                # the last patches of a seeded permutation: fixed for the run, never trained on
                perm = torch.randperm(len(full.ids), generator=torch.Generator().manual_seed(self.cfg["run"]["seed"]))
                ids = _ids(full, full.ids)
                held = sorted({ids[i] for i in perm[-n_hold:].tolist()})
                kept = [i for i in dict.fromkeys(ids) if i not in held]
                if not kept:
                    raise UserFacingError(f"data.holdout_patches {n_hold} leaves no patch to train on")
                train = build_dataset(path, **common, label_subset=kept)
                holdout = build_dataset(path, **{**common, "crop_mode": "grid" if d["crop"] else "random",
                                                 "seed": self.cfg["run"]["seed"] + 1}, label_subset=held)
                return train, holdout
            return full, holdout
        except (ValueError, KeyError, OSError) as exc:
            if isinstance(exc, UserFacingError):
                raise
            raise UserFacingError(f"data.path {path}: {exc}") from exc

    def build_model(self, in_channels: int):
        from sitskit.models import build

        m = self.cfg["model"]
        try:
            return build(m["name"], in_channels=in_channels, **m["kwargs"])
        except (TypeError, KeyError, ValueError) as exc:
            raise UserFacingError(f"model: cannot build {m['name']!r} with {m['kwargs']}: {exc}") from exc

    def build_optimizer(self, model):
        from sitskit.stage.optim import build_optimizer

        return build_optimizer(model, self.cfg["optim"])

    def count_total_steps(self) -> int:
        t, d = self.cfg["train"], self.cfg["data"]
        if t["max_steps"] is not None:
            return t["max_steps"]
        micro_per_batch = 1
        if d["step_per_crop"]:
            sample = self.dataset[0]["image"]
            h, w = sample.shape[-2:]
            if h % d["step_crop"] or w % d["step_crop"]:
                raise UserFacingError(f"data.step_crop {d['step_crop']} must divide the patch size {h}x{w}")
            micro_per_batch = (h // d["step_crop"]) * (w // d["step_crop"])
        return max(1, t["epochs"] * len(self.loader) * micro_per_batch // self.cfg["optim"]["grad_accum"])

    def build_scheduler(self, optimizer, total_steps: int):
        from sitskit.stage.optim import build_scheduler

        return build_scheduler(optimizer, self.cfg["optim"], total_steps)

    def build_masker(self, dataset):
        from sitskit.pretrain.masking import MaskGenerator

        m = self.cfg["mask"]
        try:
            return MaskGenerator(ratio=m["ratio"], strategy=m["strategy"], sampling=m["sampling"],
                                 gating=m["gating"], ndvi_threshold=m["ndvi_threshold"],
                                 min_fraction=m["min_fraction"], ndvi_on=m["ndvi_on"],
                                 band_names=dataset.band_names, norm_mean=getattr(dataset, "norm_mean", None),
                                 norm_std=getattr(dataset, "norm_std", None), red_band=m["red_band"],
                                 nir_band=m["nir_band"])
        except ValueError as exc:
            raise UserFacingError(f"mask: {exc}") from exc

    def log_inputs(self) -> None:
        from sitskit import tracking

        tracking.log_dataset(self.cfg["data"]["path"], name=f"{self.dataset.dataset_name}:{Path(self.cfg['data']['path']).name}",
                             digest=self.data_digest, context="training", n_patches=len(self.dataset.ids))
        tracking.set_tags({"dataset.ids": ",".join(map(str, self.dataset.ids))[:5000],
                           "dataset.holdout_ids": ",".join(map(str, self.holdout.ids)) if self.holdout else ""})

    # ------------------------------------------------------------------------------------- training
    def train(self) -> None:
        from tqdm.auto import tqdm

        from sitskit.pretrain.engine_pretrain import HoldoutEvaluator, train_one_epoch

        acc, state = self.accelerator, self.state
        self.progress = tqdm(total=self.total_steps, initial=state.step, desc="pretrain", unit="step",
                             disable=not (acc.is_main_process and self.cfg["run"]["progress"]), dynamic_ncols=True)
        self.last_example = None
        self.nothing_masked_warned = False
        self.holdout_eval = HoldoutEvaluator(self.holdout, self.masker, self.cfg, acc) if self.holdout else None
        if self.holdout_eval is not None and self.tracking and self.skip_metrics_until < 0:
            self.log_metrics({f"holdout/{k}": v for k, v in self.holdout_eval.baselines.items()}, step=0)
        finished = state.step >= self.total_steps
        while not finished:
            self.sampler.set_epoch(state.epoch)
            self.dataset.set_epoch(state.epoch)
            self.loader.generator.manual_seed(self.cfg["run"]["seed"] + state.epoch)
            loader = acc.skip_first_batches(self.loader, state.batch) if state.batch else self.loader
            step_before = state.step
            finished = train_one_epoch(self.model, loader, self.optimizer, self.scheduler, acc, self.masker, state,
                                       self.cfg, self.total_steps, on_step=self.log_step,
                                       on_batch_end=self._after_batch)
            self.progress.update(state.step - self.progress.n)
            if self.stop.requested or (finished and state.step < self.total_steps):
                break
            if not finished:
                if state.step == step_before and state.batch == 0:
                    raise UserFacingError("an epoch made no optimiser step: the data loader is empty")
                state.epoch, state.batch = state.epoch + 1, 0
                self.log_holdout()
        self.broadcast_buffers()

    def _after_batch(self) -> bool:
        return self.after_batch(at_boundary=self.state.micro % self.cfg["optim"]["grad_accum"] == 0)

    def log_step(self, metrics: dict) -> None:
        self.last_example = metrics.pop("example")
        band_loss = metrics.pop("band_loss")
        if metrics["masked_share"] == 0 and not self.nothing_masked_warned:
            self.nothing_masked_warned = True
            self.accelerator.print("warning: nothing was masked in the last steps (the loss is 0 and nothing is "
                                   "learnt): check mask.ratio, mask.gating, mask.min_fraction and mask.ndvi_threshold")
        self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", masked=f"{metrics['masked_share']:.2f}",
                                  refresh=False)
        if self.accelerator.is_main_process:
            bands = list(self.dataset.band_names)
            self.log_metrics(dict(metrics, **{f"loss_band/{b}": v for b, v in zip(bands, band_loss)}),
                             step=self.state.step)

    def log_holdout(self) -> None:
        if self.holdout_eval is not None:
            loss = self.holdout_eval(self.model)
            if self.accelerator.is_main_process:
                self.log_metrics({"holdout/loss": loss}, step=self.state.step)

    def broadcast_buffers(self) -> None:
        """DDP copies rank 0's buffers (BatchNorm statistics) to the others at each forward; do it once
        more at the end so every rank holds exactly the weights that are exported."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            for buf in self.accelerator.unwrap_model(self.model).buffers():
                buf.copy_(broadcast(buf.clone(), from_process=0))

    # ------------------------------------------------------------------------------------- the end
    def finish(self, interrupted: bool) -> None:
        if interrupted:
            return
        self.log_holdout()
        self.export_encoder()
        if self.tracking:
            self.log_final_artifacts()
        done = self.run_dir / "encoder"
        self.accelerator.print(f"done: encoder exported to {done}"
                               + (f" (MLflow: runs:/{self.state.mlflow_run_id}/encoder)" if self.tracking else ""))

    def export_encoder(self) -> None:
        """`save_pretrained(model.encoder)` into run_dir/encoder (atomic rename), with the MLflow run id."""
        acc = self.accelerator
        if acc.is_main_process:
            from sitskit.models import save_pretrained

            encoder = acc.unwrap_model(self.model).encoder
            target = self.run_dir / "encoder"
            extra = {"mlflow_run_id": self.state.mlflow_run_id or None, "stage": "pretrain", "step": self.state.step,
                     "pretrain_config": self.cfg, "band_names": list(self.dataset.band_names),
                     "data_sha256_index": self.data_digest,
                     "norm_mean": [float(v) for v in getattr(self.dataset, "norm_mean", [])],
                     "norm_std": [float(v) for v in getattr(self.dataset, "norm_std", [])]}
            atomic_write_dir(target, lambda tmp: save_pretrained(encoder, tmp, extra=extra),
                             f"the encoder to {target}")
        acc.wait_for_everyone()

    def log_final_artifacts(self) -> None:
        from sitskit import tracking

        tracking.log_artifact(self.run_dir / "encoder" / "config.json", "encoder")
        tracking.log_artifact(self.run_dir / "encoder" / "model.safetensors", "encoder")
        if self.cfg["run"]["figure"] and self.last_example is not None:
            import matplotlib.pyplot as plt

            from sitskit.pretrain.engine_pretrain import reconstruct_example
            from sitskit.pretrain.figures import reconstruction_figure

            x, mask, pad, days = self.last_example
            pred = reconstruct_example(self.accelerator.unwrap_model(self.model), x, days, pad, mask)
            keep = slice(None) if pad is None else ~pad.cpu()
            fig = reconstruction_figure(x.cpu()[keep], pred.cpu()[keep], mask.cpu()[keep], days.cpu()[keep],
                                        self.dataset.band_names, getattr(self.dataset, "norm_mean", None),
                                        getattr(self.dataset, "norm_std", None))
            tracking.log_figure(fig, "reconstruction.png")
            plt.close(fig)


def _ids(dataset, keys: list[str]) -> list[int]:
    """Patch keys → the `id` values label_subset matches on (PASTIS ID_PATCH, MTLCC tile id)."""
    import h5py

    with h5py.File(dataset.path, "r") as f:
        return [int(f[f"patches/{k}"].attrs["id"]) for k in keys]
