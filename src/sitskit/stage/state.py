"""Run state on disk without pickle: what `--resume` needs to repeat an uninterrupted run exactly.

A state folder `state/step_XXXXXXXX/` holds exactly these files, written by the main process (data-parallel
ranks hold identical weights and optimiser states):

    model.safetensors      the unwrapped model's state dict
    optimizer.safetensors  every tensor of optimizer.state_dict(), flattened ("state.3.exp_avg")
    optimizer.json         the rest of optimizer.state_dict() (param groups, step counts as numbers)
    progress.json          TrainState (step, micro, epoch, batch, MLflow run id, …), the scheduler state,
                           the thread count and process count of the run

Nothing is unpickled when loading: safetensors and JSON only. Any other file in the folder (e.g. an Accelerate
`custom_checkpoint_0.pkl`) is refused, not read. Why no RNG states: every random draw of the stages derives from
(seed, step, rank) or (seed, epoch, index), so the global generators need not be restored.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sitskit.errors import UserFacingError

STATE_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "progress.json")
STATE_FORMAT = 1


@dataclass
class TrainState:
    """Progress of a stage; saved in progress.json."""
    step: int = 0  # optimiser steps done
    micro: int = 0  # micro-batches done (forward/backward passes)
    epoch: int = 0  # current epoch
    batch: int = 0  # batches of the current epoch done
    mlflow_run_id: str = ""
    extra: dict = field(default_factory=dict)  # stage-specific JSON values (best metric, early-stop counter, …)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, sd: dict) -> None:
        for key in ("step", "micro", "epoch", "batch", "mlflow_run_id"):
            setattr(self, key, sd[key])
        self.extra = dict(sd.get("extra", {}))


def save_run_state(folder: Path, model: torch.nn.Module, optimizer, scheduler, state: TrainState,
                   run_info: dict) -> None:
    """Write the four files into `folder` (which must not exist yet). Raises OSError on a full disk."""
    folder.mkdir(parents=True)
    tensors, plain = _split_tensors(optimizer.state_dict())
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    try:
        save_file(weights, str(folder / "model.safetensors"))
        save_file(tensors, str(folder / "optimizer.safetensors"))
    except SafetensorError as exc:  # safetensors wraps the OSError of a full disk
        raise OSError(errno.ENOSPC if "space" in str(exc).lower() else errno.EIO, str(exc)) from exc
    (folder / "optimizer.json").write_text(json.dumps(plain))
    progress = {"format": STATE_FORMAT, "train_state": state.state_dict(),
                "scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None, **run_info}
    (folder / "progress.json").write_text(json.dumps(progress, indent=1))


def read_progress(folder: Path) -> dict:
    check_state_folder(folder)
    try:
        progress = json.loads((folder / "progress.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserFacingError(f"{folder / 'progress.json'}: not a readable sitskit state ({exc})") from None
    if not isinstance(progress, dict) or progress.get("format") != STATE_FORMAT or "train_state" not in progress:
        raise UserFacingError(f"{folder / 'progress.json'}: not a sitskit state file of format {STATE_FORMAT}")
    return progress


def load_run_state(folder: Path, model: torch.nn.Module, optimizer, scheduler, state: TrainState) -> dict:
    """Restore model, optimiser, scheduler and `state` from `folder`; returns progress.json."""
    from sitskit.models.registry import load_state_dict_checked

    progress = read_progress(folder)
    try:
        weights = load_file(str(folder / "model.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        plain = json.loads((folder / "optimizer.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise UserFacingError(f"{folder}: corrupt state ({exc})") from None
    load_state_dict_checked(model, weights, source=str(folder / "model.safetensors"))
    try:
        optimizer.load_state_dict(_join_tensors(plain, tensors))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserFacingError(f"{folder / 'optimizer.json'}: does not match this optimiser ({exc})") from None
    if scheduler is not None and progress.get("scheduler") is not None:
        scheduler.load_state_dict(progress["scheduler"])
    state.load_state_dict(progress["train_state"])
    return progress


def check_state_folder(folder: Path) -> None:
    """Refuse folders with foreign files (a pickle is never opened) or missing pieces."""
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    foreign = sorted(present - set(STATE_FILES))
    if foreign:
        raise UserFacingError(f"{folder}: unexpected file(s) {', '.join(foreign)} in a sitskit state folder; "
                              "refusing to load it (sitskit states hold only safetensors and JSON, and are never "
                              "unpickled)")
    missing = [f for f in STATE_FILES if f not in present]
    if missing:
        raise UserFacingError(f"{folder}: incomplete state, missing {', '.join(missing)}")


def atomic_save(states_dir: Path, step: int, write) -> Path:
    """Run `write(tmp_folder)`, then rename it to step_XXXXXXXX. On failure nothing is left behind and a full
    disk or an unwritable location becomes one UserFacingError."""
    return atomic_write_dir(states_dir / f"step_{step:08d}", write, f"the state to {states_dir}")


def atomic_write_dir(target: Path, write, what: str) -> Path:
    """Run `write(tmp_folder)` on a hidden sibling of `target`, then replace `target` by it (one rename). On
    failure nothing is left behind and the OSError (full disk, unwritable folder) becomes one
    UserFacingError "cannot write {what}: …"."""
    tmp = target.parent / f".tmp_{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserFacingError(f"cannot write {what}: {exc.strerror or exc}") from None
    return target


def _split_tensors(sd: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Replace every tensor of a nested dict/list by {"__tensor__": key}; return (tensors, skeleton)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if torch.is_tensor(node):
            key = path or "value"
            tensors[key] = node.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(node, dict):
            return {"__dict__": [[_key(k), walk(v, f"{path}.{k}" if path else str(k))] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    skeleton = walk(sd, prefix)
    return tensors, skeleton


def _join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {_unkey(k): _join_tensors(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [_join_tensors(v, tensors) for v in skeleton]
    return skeleton


def _key(k):  # optimizer state keys are ints; JSON objects only have string keys, so keep a typed pair
    return {"int": k} if isinstance(k, int) else k


def _unkey(k):
    return k["int"] if isinstance(k, dict) else k


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.tolist()
    return value
