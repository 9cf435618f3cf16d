"""MLflow helpers shared by the training stages. Only the main process should call these.

Tracking URI: $MLFLOW_TRACKING_URI if set, else `sqlite:///mlflow.db` in the current directory (MLflow 3
refuses the old ./mlruns file store without an opt-in flag). Browse with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from sitskit.stage.config import flatten

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def start_run(experiment: str, run_name: str, run_id: str | None = None, parent_run_id: str | None = None):
    """Start (or, with `run_id`, resume) a run and return the mlflow.ActiveRun. `parent_run_id` nests it
    (a sweep's child). Two processes creating a fresh sqlite store at once corrupt its schema migration, so
    starts on a sqlite store are serialised by a lock file beside it (and retried on a lost race)."""
    import random
    import time

    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    for attempt in range(6):
        try:
            with _store_lock(uri):
                if run_id is not None:
                    return mlflow.start_run(run_id=run_id)
                mlflow.set_experiment(experiment)
                tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
                return mlflow.start_run(run_name=run_name, tags=tags)
        except Exception as exc:  # a store race is retried; anything else propagates
            if attempt == 5 or not _is_store_race(exc):
                raise
            time.sleep(0.5 + random.random() * 1.5)
    raise AssertionError("unreachable")


class _store_lock:
    """An exclusive flock on `<db>.lock` for a sqlite:/// store; a no-op for other stores."""

    def __init__(self, uri: str):
        self.path = uri[len("sqlite:///"):] + ".lock" if uri.startswith("sqlite:///") else None
        self.fd = None

    def __enter__(self):
        if self.path:
            import fcntl

            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _is_store_race(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("locked", "already exists", "unique constraint", "operationalerror",
                                   "integrityerror", "migration"))


def last_logged_step(run_id: str, key: str) -> int:
    """Highest step logged for metric `key` (-1 if none): a resumed run skips what is already there."""
    import mlflow

    history = mlflow.MlflowClient(tracking_uri()).get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def log_dataset(path: str | Path, name: str, digest: str, context: str, n_patches: int) -> None:
    """The data file as an MLflow dataset input: absolute path, name, hash of its /index, size."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    path = Path(path).resolve()
    try:
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local-file source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path))
    except Exception:  # noqa: BLE001 — an MLflow without a local-file source: keep the record, without the input
        source = None
    if source is not None:
        mlflow.log_input(MetaDataset(source=source, name=name, digest=digest[:36]), context=context)
    mlflow.set_tags({f"data.{context}.path": str(path), f"data.{context}.sha256_index": digest,
                     f"data.{context}.n_patches": str(n_patches),
                     f"data.{context}.bytes": str(path.stat().st_size)})


def download_run_artifact(uri: str, cache_root: str | Path) -> Path:
    """`runs:/<id>/<path>` → a local folder (downloaded once into cache_root/<id>/<path>)."""
    import mlflow

    if not uri.startswith("runs:/"):
        raise ValueError(uri)
    run_id, _, sub = uri[len("runs:/"):].partition("/")
    target = Path(cache_root) / run_id / sub
    if target.is_dir() and any(target.iterdir()):
        return target
    mlflow.set_tracking_uri(tracking_uri())
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target.parent))
    except Exception as exc:  # noqa: BLE001
        from sitskit.errors import UserFacingError

        raise UserFacingError(f"{uri}: cannot download from the MLflow store {tracking_uri()} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return Path(local)


def log_config(cfg: dict) -> None:
    """The full resolved config as flattened params ("optim.lr") plus config.yaml as an artifact."""
    import mlflow

    from sitskit.stage.config import dump_yaml

    params = {k: _param_value(v) for k, v in flatten(cfg).items()}
    items = list(params.items())
    for i in range(0, len(items), 100):  # log_params accepts at most 100 per call
        mlflow.log_params(dict(items[i:i + 100]))
    mlflow.log_text(dump_yaml(cfg), "config.yaml")  # the only copy of config.yaml in the run


def log_metrics(metrics: dict[str, Any], step: int) -> None:
    """Log plain floats (tensors are converted; non-finite or non-numeric values are skipped)."""
    import math

    import mlflow

    clean = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            clean[key] = float(value)
    if clean:
        mlflow.log_metrics(clean, step=step)


def environment_tags() -> dict[str, str]:
    """git commit (+dirty flag), torch/CUDA versions, hardware; set once per run."""
    import torch

    from sitskit import __version__

    tags = {
        "sitskit.version": __version__,
        "git.commit": _git("rev-parse", "HEAD") or "unknown",
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "torch.version": torch.__version__,
        "cuda.version": str(torch.version.cuda),
        "cuda.available": str(torch.cuda.is_available()).lower(),
        "python.version": platform.python_version(),
        "hardware.cpu": cpu_model(),
        "hardware.cpu_count": str(os.cpu_count()),
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        tags["hardware.gpu"] = torch.cuda.get_device_name(0)
        tags["hardware.gpu_count"] = str(torch.cuda.device_count())
    try:
        import accelerate

        tags["accelerate.version"] = accelerate.__version__
    except ImportError:
        pass
    return tags


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


def log_figure(fig, name: str) -> None:
    import mlflow

    mlflow.log_figure(fig, name)


def end_run(status: str = "FINISHED") -> None:
    import mlflow

    mlflow.end_run(status=status)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], check=False, capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
