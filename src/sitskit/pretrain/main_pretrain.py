"""`accelerate launch pretrain.py --config configs/<preset>.yaml [--section.key value …]`

Sets up data, model, optimiser, schedule, Accelerate, MLflow and checkpoints, then calls
`engine_pretrain.train_one_epoch` until the step budget is spent. Writes `checkpoints/<run-name>/`:
`state/step_XXXXXXXX/` (Accelerate states for exact resumption; the newest `output.keep_states` kept),
`encoder/` (`save_pretrained` export of the encoder, with the MLflow run id) and `config.yaml`.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from sitskit.config import dump_yaml, load_config
from sitskit.errors import UserFacingError

DEFAULTS: dict = {
    "run": {
        "experiment": "sitskit-pretrain",  # MLflow experiment
        "seed": 0,
        "resume": False,  # continue the newest state of output.name (or of the newest run in output.dir)
        "log_every": 10,  # optimiser steps between logged metrics
        "tracking": True,  # log to MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)
        "figure": True,  # reconstruction figure as an MLflow artifact at the end
        "progress": True,
    },
    "output": {
        "dir": "checkpoints",
        "name": None,  # run name = folder under output.dir; default: pretrain-<h5 stem>-<UTC time>
        "save_every": 500,  # optimiser steps between Accelerate states
        "keep_states": 2,  # newest states kept
        "overwrite": False,  # replace an existing run of the same name (else refused unless run.resume)
    },
    "data": {
        "path": None,  # HDF5 file written by `python data_prep.py pastis|mtlcc`
        "folds": [],  # PASTIS folds ([] = all); STCLN pre-trains on fold 5
        "split": None,  # MTLCC split name (e.g. train_fold0)
        "years": [],  # MTLCC years ([] = all)
        "norm": "source",  # source | train | none
        "crop": None,  # random/grid crop size in px; None = full patches
        "crop_mode": "random",
        "num_dates": None,  # random draw of this many dates per access (MTLCC: 30)
        "max_doy": None,
        "sat": "S2",
        "batch_size": 4,
        "num_workers": 0,
        "step_per_crop": False,  # the paper's PASTIS loop: split each batch into a grid, one step per crop
        "step_crop": 32,
    },
    "model": {
        "name": "stcln_pretrain",
        "kwargs": {},  # passed to sitskit.models.build (free-form: --model.kwargs.d_model 64)
    },
    "mask": {
        "strategy": "time-space",  # time-space (STCLN) | time | space
        "ratio": 0.4,
        "sampling": "exact",  # exact share per sample | bernoulli (reference's F.dropout)
        "gating": True,  # STCLN vegetation gating of eligible dates
        "ndvi_threshold": 0.2,
        "min_fraction": 0.9,  # a date is eligible when > this share of the crop has NDVI > threshold
        "ndvi_on": "reflectance",  # reflectance (true NDVI) | input (the reference: standardised bands)
        "red_band": "B4",
        "nir_band": "B8",
    },
    "optim": {
        "lr": 1e-4,
        "weight_decay": 0.0,  # the reference uses Adam without weight decay
        "betas": [0.9, 0.999],
        "schedule": "cosine",  # cosine | constant (both after a linear warmup)
        "warmup_steps": 0,
        "min_lr": 0.0,
        "clip_grad": 5.0,  # max grad norm; 0 disables
        "grad_accum": 1,
    },
    "train": {
        "epochs": 100,
        "max_steps": None,  # optimiser steps; overrides epochs when set
        "mixed_precision": "no",  # no | bf16 | fp16
        "cpu": False,  # force CPU even when a GPU is present
    },
}

_CHOICES = {
    ("mask", "strategy"): ("time-space", "time", "space"),
    ("mask", "sampling"): ("exact", "bernoulli"),
    ("mask", "ndvi_on"): ("reflectance", "input"),
    ("optim", "schedule"): ("cosine", "constant"),
    ("train", "mixed_precision"): ("no", "bf16", "fp16"),
    ("data", "norm"): ("source", "train", "none"),
    ("data", "crop_mode"): ("random", "grid"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = ["--run.resume" if a == "--resume" else a for a in argv]  # short form of --run.resume true
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nOptions (defaults):\n" + dump_yaml(DEFAULTS))
        return 0
    try:
        cfg = load_config(argv, DEFAULTS)
        validate(cfg)
        return Pretrainer(cfg).run()
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop without saving
        print("interrupted without saving", file=sys.stderr)
        return 130


def validate(cfg: dict) -> None:
    for (section, key), choices in _CHOICES.items():
        if cfg[section][key] not in choices:
            raise UserFacingError(f"{section}.{key} must be one of {', '.join(choices)}; got {cfg[section][key]!r}")
    if not cfg["data"]["path"]:
        raise UserFacingError("data.path is required: pass --data.path FILE.h5 (made by `python data_prep.py pastis|mtlcc`)")
    if not Path(cfg["data"]["path"]).is_file():
        raise UserFacingError(f"data.path: {cfg['data']['path']} does not exist")
    if not 0.0 < cfg["mask"]["ratio"] <= 1.0:
        raise UserFacingError(f"mask.ratio must be in (0, 1]; got {cfg['mask']['ratio']}")
    for section, key in (("optim", "grad_accum"), ("data", "batch_size"), ("run", "log_every"),
                         ("output", "save_every"), ("data", "step_crop"), ("output", "keep_states")):
        if cfg[section][key] < 1:
            raise UserFacingError(f"{section}.{key} must be >= 1; got {cfg[section][key]}")
    if cfg["train"]["max_steps"] is not None and cfg["train"]["max_steps"] < 1:
        raise UserFacingError(f"train.max_steps must be >= 1; got {cfg['train']['max_steps']}")


class Pretrainer:
    """Holds the objects of one run; `run()` trains and returns an exit code."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.stop_requested = False

    # ---------------------------------------------------------------------------------------- setup
    def run(self) -> int:
        from accelerate import Accelerator
        from accelerate.utils import broadcast_object_list, set_seed

        cfg = self.cfg
        self.accelerator = acc = Accelerator(mixed_precision=cfg["train"]["mixed_precision"],
                                             cpu=cfg["train"]["cpu"])
        set_seed(cfg["run"]["seed"])  # identical model init on every rank
        self.run_dir = Path(broadcast_object_list([str(self.resolve_run_dir())])[0])
        self.states_dir = self.run_dir / "state"
        self.claim_run_dir()

        self.dataset = self.build_dataset()
        self.loader = self.build_loader(self.dataset)
        self.model = self.build_model(len(self.dataset.band_names))
        self.optimizer = self.build_optimizer(self.model)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.total_steps = self.count_total_steps()
        self.scheduler = self.build_scheduler(self.optimizer, self.total_steps)
        self.masker = self.build_masker(self.dataset)

        from sitskit.pretrain.engine_pretrain import TrainState

        self.state = TrainState()
        acc.register_for_checkpointing(self.scheduler, self.state)
        latest = self.latest_state() if cfg["run"]["resume"] else None
        if latest is not None:
            acc.load_state(str(latest))
            self.scheduler.step_update(self.state.step)
            acc.print(f"resumed from {latest} (step {self.state.step}, epoch {self.state.epoch}, "
                      f"batch {self.state.batch})")
        elif cfg["run"]["resume"]:
            acc.print(f"run.resume: no saved state in {self.states_dir}; starting from scratch")

        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            self.start_tracking()
        acc.wait_for_everyone()
        return self.train()

    def claim_run_dir(self) -> None:
        """Never write into another run's folder silently: continue it (run.resume), or replace it only
        when asked (output.overwrite)."""
        used = [p.name + "/" for p in (self.states_dir, self.run_dir / "encoder") if p.exists()]
        if not used or self.cfg["run"]["resume"]:
            return
        if not self.cfg["output"]["overwrite"]:
            raise UserFacingError(f"{self.run_dir} already holds a run ({', '.join(used)}); continue it with "
                                  "--resume, pick another --output.name, or replace it with --output.overwrite true")
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            for p in (self.states_dir, self.run_dir / "encoder"):
                shutil.rmtree(p, ignore_errors=True)
        acc.wait_for_everyone()

    def resolve_run_dir(self) -> Path:
        out_cfg = self.cfg["output"]
        out = Path(out_cfg["dir"])
        if out_cfg["name"] is not None:
            return out / str(out_cfg["name"])
        if self.cfg["run"]["resume"]:  # newest run that has a saved state
            runs = [p.parent.parent for p in out.glob("*/state/step_*")]
            if runs:
                return max(runs, key=lambda p: p.stat().st_mtime)
        stem = Path(self.cfg["data"]["path"]).stem
        return out / f"pretrain-{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"

    def build_dataset(self):
        from sitskit.data import build_dataset

        d = self.cfg["data"]
        try:
            return build_dataset(
                d["path"], task="pretrain", folds=d["folds"] or None, split=d["split"], years=d["years"] or None,
                norm=None if d["norm"] == "none" else d["norm"], crop=d["crop"], crop_mode=d["crop_mode"],
                num_dates=d["num_dates"], max_doy=d["max_doy"], seed=self.cfg["run"]["seed"], sat=d["sat"])
        except (ValueError, KeyError, OSError) as exc:
            if isinstance(exc, UserFacingError):
                raise
            raise UserFacingError(f"data.path {d['path']}: {exc}") from exc

    def build_loader(self, dataset):
        from torch.utils.data import DataLoader, DistributedSampler

        from sitskit.data import pad_collate

        acc, d = self.accelerator, self.cfg["data"]
        if len(dataset) == 0:
            raise UserFacingError(f"data.path {d['path']}: the selection (folds/split/years) holds no patch")
        # Every rank shuffles with the same seed and epoch, then takes its own share of the indices.
        self.sampler = DistributedSampler(dataset, num_replicas=acc.num_processes, rank=acc.process_index,
                                          shuffle=True, seed=self.cfg["run"]["seed"], drop_last=False)
        # A private generator keeps the DataLoader from drawing on the global RNG (exact resumption).
        return DataLoader(dataset, batch_size=d["batch_size"], sampler=self.sampler, collate_fn=pad_collate,
                          num_workers=d["num_workers"], pin_memory=acc.device.type == "cuda",
                          persistent_workers=False, generator=torch.Generator().manual_seed(self.cfg["run"]["seed"]))

    def build_model(self, in_channels: int):
        from sitskit.models import build

        m = self.cfg["model"]
        try:
            return build(m["name"], in_channels=in_channels, **m["kwargs"])
        except (TypeError, KeyError, ValueError) as exc:
            raise UserFacingError(f"model: cannot build {m['name']!r} with {m['kwargs']}: {exc}") from exc

    def build_optimizer(self, model):
        from timm.optim import create_optimizer_v2

        o = self.cfg["optim"]
        # timm leaves biases, norms and the mask token (1-D parameters) out of weight decay
        return create_optimizer_v2(model, opt="adamw", lr=o["lr"], weight_decay=o["weight_decay"],
                                   betas=tuple(o["betas"]))

    def count_total_steps(self) -> int:
        t, d = self.cfg["train"], self.cfg["data"]
        if t["max_steps"] is not None:
            return t["max_steps"]
        micro_per_batch = 1
        if d["step_per_crop"]:
            sample = self.dataset[0]["image"]
            micro_per_batch = len(range(0, sample.shape[-2], d["step_crop"])) * len(range(0, sample.shape[-1], d["step_crop"]))
        return max(1, t["epochs"] * len(self.loader) * micro_per_batch // self.cfg["optim"]["grad_accum"])

    def build_scheduler(self, optimizer, total_steps: int):
        from timm.scheduler import CosineLRScheduler, StepLRScheduler

        o = self.cfg["optim"]
        warmup = {"warmup_t": o["warmup_steps"], "warmup_lr_init": 0.0 if o["warmup_steps"] else o["lr"],
                  "t_in_epochs": False}
        if o["schedule"] == "cosine":
            sched = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=o["min_lr"], **warmup)
        else:  # a step schedule that never decays = constant after warmup
            sched = StepLRScheduler(optimizer, decay_t=10 ** 12, decay_rate=1.0, **warmup)
        sched.step_update(0)
        return sched

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
            raise UserFacingError(str(exc)) from exc

    # ------------------------------------------------------------------------------------- tracking
    def start_tracking(self) -> None:
        self.tracking = self.cfg["run"]["tracking"]
        if not self.tracking:
            return
        from sitskit import tracking

        resumed = bool(self.state.mlflow_run_id)
        try:
            self.mlflow_run = tracking.start_run(self.cfg["run"]["experiment"], self.run_dir.name,
                                                 run_id=self.state.mlflow_run_id or None)
        except Exception as exc:  # e.g. resuming against another tracking store
            if not resumed:
                raise
            self.accelerator.print(f"warning: cannot continue MLflow run {self.state.mlflow_run_id} "
                                   f"({type(exc).__name__}: {exc}); starting a new one")
            resumed = False
            self.mlflow_run = tracking.start_run(self.cfg["run"]["experiment"], self.run_dir.name)
        self.state.mlflow_run_id = self.mlflow_run.info.run_id
        if not resumed:
            tracking.log_config(self.cfg)
            tags = tracking.environment_tags()
            tags.update({"stage": "pretrain", "run_dir": str(self.run_dir.resolve()),
                         "num_processes": str(self.accelerator.num_processes),
                         "dataset.ids": ",".join(map(str, getattr(self.dataset, "ids", [])))[:5000]})
            tracking.set_tags(tags)

    def log_step(self, metrics: dict) -> None:
        self.last_example = metrics.pop("example")
        band_loss = metrics.pop("band_loss")
        self.last_metrics = metrics
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", masked=f"{metrics['masked_share']:.2f}",
                                      refresh=False)
        if self.accelerator.is_main_process and self.tracking:
            from sitskit import tracking

            bands = list(self.dataset.band_names)
            metrics = dict(metrics, **{f"loss_band/{b}": v for b, v in zip(bands, band_loss)})
            tracking.log_metrics(metrics, step=self.state.step)

    # ------------------------------------------------------------------------------------- training
    def train(self) -> int:
        from tqdm.auto import tqdm

        from sitskit.pretrain.engine_pretrain import train_one_epoch

        acc, state = self.accelerator, self.state
        self.tracking = self.cfg["run"]["tracking"] and acc.is_main_process
        self.progress = tqdm(total=self.total_steps, initial=state.step, desc="pretrain", unit="step",
                             disable=not (acc.is_main_process and self.cfg["run"]["progress"]),
                             dynamic_ncols=True)
        self.last_example = None
        self.last_saved = state.step
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        exit_code = 0
        try:
            finished = state.step >= self.total_steps
            while not finished:
                self.sampler.set_epoch(state.epoch)
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(state.epoch)
                self.loader.generator.manual_seed(self.cfg["run"]["seed"] + state.epoch)
                loader = acc.skip_first_batches(self.loader, state.batch) if state.batch else self.loader
                step_before = state.step
                finished = train_one_epoch(self.model, loader, self.optimizer, self.scheduler, acc, self.masker,
                                           state, self.cfg, self.total_steps, on_step=self.log_step,
                                           on_batch_end=self._after_batch)
                self.progress.update(state.step - self.progress.n)
                if self.stop_requested:
                    exit_code = 130
                    break
                if not finished:
                    if state.step == step_before and state.batch == 0:
                        raise UserFacingError("an epoch made no optimiser step: the data loader is empty")
                    state.epoch, state.batch = state.epoch + 1, 0
            self.broadcast_buffers()
            self.save_state()
            self.export_encoder()
            if acc.is_main_process and self.tracking:
                self.log_final_artifacts()
        except BaseException:
            if acc.is_main_process and self.tracking:
                from sitskit import tracking

                tracking.end_run("FAILED")
            raise
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            self.progress.close()
        if acc.is_main_process and self.tracking:
            from sitskit import tracking

            tracking.end_run("KILLED" if exit_code else "FINISHED")
        acc.wait_for_everyone()
        acc.end_training()
        where = f"{self.run_dir}/encoder"
        acc.print(("interrupted; state saved, resume with --resume --output.name " + self.run_dir.name)
                  if exit_code else f"done: encoder exported to {where}")
        return exit_code

    def _after_batch(self) -> bool:
        """After each batch: progress, periodic checkpoint, Ctrl-C check (collective on all ranks)."""
        state = self.state
        self.progress.update(state.step - self.progress.n)
        at_boundary = state.micro % self.cfg["optim"]["grad_accum"] == 0
        if at_boundary and state.step - self.last_saved >= self.cfg["output"]["save_every"]:
            self.save_state()
        if at_boundary and self.accelerator.check_trigger():
            self.stop_requested = True
            return True
        return False

    def _on_sigint(self, signum, frame):
        if self.stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        self.accelerator.set_trigger()
        self.accelerator.print("\nCtrl-C: saving state after this batch (press again to abort without saving)")

    def broadcast_buffers(self) -> None:
        """DDP copies rank 0's buffers (BatchNorm statistics) to the others at each forward; do it once
        more at the end so every rank holds exactly the weights that are exported."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            for buf in self.accelerator.unwrap_model(self.model).buffers():
                buf.copy_(broadcast(buf.clone(), from_process=0))

    # ---------------------------------------------------------------------------------- checkpoints
    def latest_state(self) -> Path | None:
        steps = sorted(self.states_dir.glob("step_*"))
        return steps[-1] if steps else None

    def save_state(self) -> None:
        """Atomic: every process writes into a temp dir, the main process renames it, barriers around."""
        acc, step = self.accelerator, self.state.step
        final = self.states_dir / f"step_{step:08d}"
        tmp = self.states_dir / f".tmp_step_{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            self.states_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(self.states_dir.glob("step_*"))[: -self.cfg["output"]["keep_states"]]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_saved = step

    def export_encoder(self) -> None:
        """`save_pretrained(model.encoder)` into run_dir/encoder (atomic rename), with the MLflow run id."""
        acc = self.accelerator
        if acc.is_main_process:
            from sitskit.models import save_pretrained

            encoder = acc.unwrap_model(self.model).encoder
            target, tmp = self.run_dir / "encoder", self.run_dir / ".tmp_encoder"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(encoder, tmp, extra={
                "mlflow_run_id": self.state.mlflow_run_id or None, "stage": "pretrain", "step": self.state.step,
                "pretrain_config": self.cfg, "band_names": list(self.dataset.band_names),
                "norm_mean": [float(v) for v in getattr(self.dataset, "norm_mean", [])],
                "norm_std": [float(v) for v in getattr(self.dataset, "norm_std", [])]})
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        acc.wait_for_everyone()

    def log_final_artifacts(self) -> None:
        from sitskit import tracking

        tracking.log_artifact(self.run_dir / "config.yaml")
        for f in sorted((self.run_dir / "encoder").glob("*.json")):
            tracking.log_artifact(f, "encoder")
        if self.cfg["run"]["figure"] and self.last_example is not None:
            from sitskit.pretrain.figures import reconstruction_figure

            x, pred, mask, pad, days = self.last_example
            keep = slice(None) if pad is None else ~pad.cpu()
            fig = reconstruction_figure(x.cpu()[keep], pred.cpu()[keep], mask.cpu()[keep], days.cpu()[keep],
                                        self.dataset.band_names, getattr(self.dataset, "norm_mean", None),
                                        getattr(self.dataset, "norm_std", None))
            tracking.log_figure(fig, "reconstruction.png")
            import matplotlib.pyplot as plt

            plt.close(fig)
