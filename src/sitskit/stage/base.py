"""What every training stage shares: Accelerate, the run folder, safe states, signals, MLflow.

A stage subclasses `Stage`, implements `build()` (data, model, optimiser, scheduler) and `train()` (its epochs,
calling `self.after_batch()` between batches), and is run by `Stage.run()`:

    accelerator → run folder (claim or resume) → build() → load state → config.yaml + MLflow → train()
    → final state → end MLflow run (FINISHED, KILLED on SIGINT/SIGTERM, FAILED on an error)

Precedence of hardware settings (docs/architecture.md): `train.mixed_precision` / `train.cpu` when set in the
config or on the command line, else `accelerate launch` flags / `accelerate config` (they reach the process as
ACCELERATE_* variables), else fp32 on the best device.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from sitskit.errors import UserFacingError
from sitskit.stage.config import dump_yaml
from sitskit.stage.signals import StopRequest
from sitskit.stage.state import TrainState, atomic_save, load_run_state, read_progress, save_run_state


class Stage:
    name = "stage"  # "pretrain", "finetune"
    exported = ("encoder",)  # run-folder entries (besides state/) that mark a folder as used

    def __init__(self, cfg: dict, resume_dir: Path | None = None):
        self.cfg = cfg
        self.resume = resume_dir is not None
        self.state = TrainState()
        self.tracking = False
        self.stop = None
        self.progress = None
        self.skip_metrics_until = -1
        self.last_saved = 0  # step of the newest saved state
        self.data_digest = None  # build(): index_digest of the training file, checked on --resume

    # ------------------------------------------------------------------------------------------ setup
    def build(self) -> None:
        """Set self.dataset, self.loader, self.model, self.optimizer, self.scheduler, self.total_steps."""
        raise NotImplementedError

    def train(self) -> None:
        raise NotImplementedError

    def run(self) -> int:
        from accelerate.utils import broadcast_object_list, set_seed

        cfg = self.cfg
        self.accelerator = self.make_accelerator()
        if cfg["run"]["deterministic"]:
            torch.use_deterministic_algorithms(True)
        set_seed(cfg["run"]["seed"])  # identical model init on every rank
        self.run_dir = Path(broadcast_object_list([str(self.resolve_run_dir())])[0])
        self.states_dir = self.run_dir / "state"
        try:
            self.claim_run_dir()
            return self.run_in_claimed_dir()
        finally:
            self.release_run_dir()

    def run_in_claimed_dir(self) -> int:
        acc, cfg = self.accelerator, self.cfg
        self.build()
        self.restore()
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        self.tracking = bool(cfg["run"]["tracking"]) and acc.is_main_process
        exit_code = 0
        try:
            if self.tracking:
                self.start_tracking()
            acc.wait_for_everyone()
            with StopRequest(acc, announce=acc.print) as self.stop:
                self.train()
                exit_code = self.stop.exit_code
                self.save_state()
                self.finish(interrupted=bool(exit_code))
        except BaseException as exc:
            if self.tracking:
                from sitskit import tracking

                tracking.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if self.progress is not None:
                self.progress.close()
        if self.tracking:
            from sitskit import tracking

            tracking.end_run("KILLED" if exit_code else "FINISHED")
        acc.wait_for_everyone()
        acc.end_training()
        if exit_code:
            acc.print(f"interrupted; state saved at step {self.state.step}, continue with --resume {self.run_dir}")
        return exit_code

    def build_loader(self, dataset):
        """The training DataLoader. Every rank shuffles with the same seed and epoch (`self.sampler.set_epoch`),
        then takes its own share; a private generator keeps it off the global RNG (exact resumption)."""
        from torch.utils.data import DataLoader, DistributedSampler

        from sitskit.data import pad_collate

        acc, d = self.accelerator, self.cfg["data"]
        self.sampler = DistributedSampler(dataset, num_replicas=acc.num_processes, rank=acc.process_index,
                                          shuffle=True, seed=self.cfg["run"]["seed"], drop_last=False)
        return DataLoader(dataset, batch_size=d["batch_size"], sampler=self.sampler, collate_fn=pad_collate,
                          num_workers=d["num_workers"], pin_memory=acc.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg["run"]["seed"]))

    def make_accelerator(self):
        from accelerate import Accelerator

        t = self.cfg["train"]
        env_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        on_cpu = t["cpu"] if t["cpu"] is not None else (env_cpu or not torch.cuda.is_available())
        precision = t["mixed_precision"] or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
        if precision == "fp16" and on_cpu:
            raise UserFacingError("train.mixed_precision fp16 needs a GPU (this run is on the CPU); use bf16 or no")
        if precision not in ("no", "bf16", "fp16"):
            raise UserFacingError(f"mixed precision {precision!r} (from ACCELERATE_MIXED_PRECISION) is not one of "
                                  "no, bf16, fp16")
        kwargs = {"mixed_precision": t["mixed_precision"]} if t["mixed_precision"] else {}
        if t["cpu"] is not None:
            kwargs["cpu"] = t["cpu"]
        return Accelerator(**kwargs)

    def resolve_run_dir(self) -> Path:
        out = self.cfg["output"]
        if out["name"] is not None:
            return Path(out["dir"]) / str(out["name"])
        stem = Path(self.cfg["data"]["path"]).stem
        return Path(out["dir"]) / f"{self.name}-{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"

    def claim_run_dir(self) -> None:
        """Never write into another run's folder silently: continue it (--resume), or replace it only when
        asked (output.overwrite). Checks the location is writable before any work."""
        acc, run_dir = self.accelerator, self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise UserFacingError(f"{run_dir} is a file, not a run folder; choose another --output.name / --output.dir")
        from accelerate.utils import broadcast_object_list

        busy = self.lock_run_dir() if acc.is_main_process else None
        busy = broadcast_object_list([busy])[0]
        if busy:
            raise UserFacingError(busy)
        used = [p + "/" for p in ("state", *self.exported) if (run_dir / p).exists()]
        if self.resume:
            if not list(self.states_dir.glob("step_*")):
                raise UserFacingError(f"--resume {run_dir}: no saved state in {self.states_dir} (the run made no step "
                                      "before it stopped); start it again without --resume")
        elif used and not self.cfg["output"]["overwrite"]:
            raise UserFacingError(f"{run_dir} already holds a run ({', '.join(used)}); continue it with --resume, "
                                  "pick another --output.name, or replace it with --output.overwrite true")
        acc.wait_for_everyone()
        if acc.is_main_process:
            if used and not self.resume:
                for p in ("state", *self.exported):
                    shutil.rmtree(run_dir / p, ignore_errors=True)
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                probe = run_dir / ".write_test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as exc:
                raise UserFacingError(f"cannot write the run folder {run_dir}: {exc.strerror or exc}") from None
        acc.wait_for_everyone()

    def lock_run_dir(self) -> str | None:
        """Hold an exclusive lock on `<run>/.lock` for the life of this process (the OS drops it at exit, even
        on SIGKILL), so that two runs never write one folder. -> None, or the message when another holds it."""
        import fcntl

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # an unwritable location is reported by the writability check
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            return (f"{self.run_dir} is in use by another running process (pid {holder}); wait for it to end or "
                    "stop it, or pick another --output.name")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._run_dir_lock = fd  # kept open: closing it would release the lock
        return None

    def release_run_dir(self) -> None:
        fd = getattr(self, "_run_dir_lock", None)
        if fd is not None:
            os.close(fd)
            self._run_dir_lock = None

    # ------------------------------------------------------------------------------------ checkpoints
    def latest_state(self) -> Path | None:
        steps = sorted(self.states_dir.glob("step_*"))
        return steps[-1] if steps else None

    def run_info(self) -> dict:
        info = {"stage": self.name, "num_processes": self.accelerator.num_processes,
                "num_threads": torch.get_num_threads()}
        if self.data_digest is not None:
            info["data_sha256_index"] = self.data_digest
        return info

    def restore(self) -> None:
        if not self.resume:
            return
        latest = self.latest_state()
        model = self.accelerator.unwrap_model(self.model)
        progress = load_run_state(latest, model, self.optimizer, self.scheduler, self.state)
        if progress.get("stage") != self.name:
            raise UserFacingError(f"{latest}: a {progress.get('stage')} state, not a {self.name} one")
        if progress.get("num_processes") != self.accelerator.num_processes:
            raise UserFacingError(f"--resume {self.run_dir}: saved with {progress.get('num_processes')} processes, "
                                  f"resumed with {self.accelerator.num_processes}; use the same process count")
        if progress.get("num_threads") != torch.get_num_threads():
            self.accelerator.print(
                f"warning: the run was saved with {progress.get('num_threads')} CPU threads and resumes with "
                f"{torch.get_num_threads()}: results stay close but not bit-identical (set OMP_NUM_THREADS="
                f"{progress.get('num_threads')}; `accelerate launch` sets 1 by default)")
        if self.data_digest is not None and progress.get("data_sha256_index") not in (None, self.data_digest):
            raise UserFacingError(f"--resume {self.run_dir}: {self.cfg['data']['path']} is not the data file the run "
                                  "started on (its /index differs)")
        self.last_saved = self.state.step
        self.on_restored(progress)
        self.accelerator.print(f"resumed from {latest} (step {self.state.step}, epoch {self.state.epoch}, "
                               f"batch {self.state.batch})")

    def on_restored(self, progress: dict) -> None:
        """Hook: a stage re-applies what it keeps beyond model/optimiser/scheduler."""

    def save_state(self) -> None:
        """Atomic (temp folder + rename), by the main process; barriers around it."""
        acc, step = self.accelerator, self.state.step
        if step == 0:
            return
        acc.wait_for_everyone()
        error = None
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            try:
                atomic_save(self.states_dir, step, lambda tmp: save_run_state(
                    tmp, model, self.optimizer, self.scheduler, self.state, self.run_info()))
                for old in sorted(self.states_dir.glob("step_*"))[: -self.cfg["output"]["keep_states"]]:
                    shutil.rmtree(old, ignore_errors=True)
            except UserFacingError as exc:
                error = exc
        acc.wait_for_everyone()
        if error is not None:
            raise error
        self.last_saved = step

    def finish(self, interrupted: bool) -> None:
        """Hook after the final state: exports, figures, final metrics."""

    # --------------------------------------------------------------------------------------- tracking
    def start_tracking(self) -> None:
        from sitskit import tracking

        resumed = bool(self.state.mlflow_run_id)
        try:
            self.mlflow_run = tracking.start_run(self.cfg["run"]["experiment"], self.run_dir.name,
                                                 run_id=self.state.mlflow_run_id or None,
                                                 parent_run_id=os.environ.get("SITSKIT_PARENT_RUN_ID"))
        except Exception as exc:  # noqa: BLE001 — e.g. resuming against another tracking store
            if not resumed:
                raise UserFacingError(f"MLflow store {tracking.tracking_uri()}: cannot start a run "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
            self.accelerator.print(f"warning: cannot continue MLflow run {self.state.mlflow_run_id} "
                                   f"({type(exc).__name__}); starting a new one")
            resumed = False
            self.mlflow_run = tracking.start_run(self.cfg["run"]["experiment"], self.run_dir.name)
        self.state.mlflow_run_id = self.mlflow_run.info.run_id
        if resumed:
            self.skip_metrics_until = tracking.last_logged_step(self.state.mlflow_run_id, "loss")
            tracking.set_tags({"resumed_at_step": str(self.state.step)})
            return
        tracking.log_config(self.cfg)
        tags = tracking.environment_tags()
        tags.update({"stage": self.name, "run_dir": str(self.run_dir.resolve()),
                     "num_processes": str(self.accelerator.num_processes),
                     "mixed_precision": str(self.accelerator.mixed_precision),
                     "device": str(self.accelerator.device)})
        tracking.set_tags(tags)
        self.log_inputs()

    def log_inputs(self) -> None:
        """Hook: datasets as MLflow inputs, lineage tags."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Main process only; steps already logged by an interrupted attempt are skipped (no duplicates)."""
        if self.tracking and step > self.skip_metrics_until:
            from sitskit import tracking

            tracking.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------------------------------ loop
    def after_batch(self, at_boundary: bool = True) -> bool:
        """Between batches: progress, periodic state, stop check (collective). Returns True to stop."""
        if self.progress is not None:
            self.progress.update(self.state.step - self.progress.n)
        if not at_boundary:
            return False
        if self.state.step - self.last_saved >= self.cfg["output"]["save_every"]:
            self.save_state()
        return self.stop.check()


def index_digest(path: str | Path) -> str:
    """sha256 of a sitskit HDF5 file's /index (keys, folds, sizes…): identifies the data a run used."""
    import hashlib

    import h5py

    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for name in sorted(f["index"]):
            h.update(name.encode())
            h.update(f["index"][name][()].tobytes())
    return h.hexdigest()


__all__ = ["Stage", "index_digest", "read_progress"]
