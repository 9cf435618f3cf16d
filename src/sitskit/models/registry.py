"""Model registry (timm style): build any model by name, export/import it as safetensors + config.json.

    model = build("stcln", in_channels=10, num_classes=20)
    save_pretrained(model, "out/model", extra={"mlflow_run_id": run_id})
    same = from_pretrained("out/model")

Every built model carries `model.config = {"name": name, **kwargs}` (the keyword arguments given to
`build`, not the defaults), which is what `save_pretrained` writes and `from_pretrained` rebuilds from.
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sitskit.errors import UserFacingError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_RESERVED_KEYS = ("name", "config", "format_version", "sitskit_version")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Decorator registering a factory (a class or a function returning an nn.Module) under `name`."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    """Sorted names accepted by `build`."""
    return sorted(_REGISTRY)


def build(name: str, **config) -> nn.Module:
    """Build the registered model `name` with keyword arguments `config`; sets `model.config`."""
    if name not in _REGISTRY:
        raise UserFacingError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    factory = _REGISTRY[name]
    _check_kwargs(name, factory, config)
    model = factory(**config)
    model.config = {"name": name, **config}
    return model


def _check_kwargs(name: str, factory: Callable, config: dict) -> None:
    """Reject unknown keyword arguments with the list of valid ones (instead of a bare TypeError)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(config) - set(params))
    if unknown:
        valid = ", ".join(p for p in params if p != "self")
        raise UserFacingError(f"model {name!r}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `out_dir/model.safetensors` (the full state dict) and `out_dir/config.json`.

    config.json = `{"name", "config", "format_version", "sitskit_version", **extra}` (e.g. the MLflow
    run id). Both files are written to temporary names first and renamed, so an interrupted export
    never leaves a half-written file under the final names.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise UserFacingError("save_pretrained: the model has no `config` (build it with sitskit.models.build)")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED_KEYS))
    if clash:
        raise UserFacingError(f"save_pretrained: extra keys {clash} are reserved")
    from sitskit import __version__

    kwargs = {k: v for k, v in config.items() if k != "name"}
    meta = {"name": config["name"], "config": kwargs, "format_version": 1, "sitskit_version": __version__, **extra}
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=False)
    except TypeError as exc:
        raise UserFacingError(f"save_pretrained: config or extra is not JSON-serialisable: {exc}") from exc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # contiguous CPU copies: safetensors refuses views/shared storage
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(out_dir / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"name": config["name"]}))
    _atomic_write(out_dir / CONFIG_NAME, lambda p: Path(p).write_text(meta_text + "\n"))
    return out_dir


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_pretrained_config(model_dir: str | os.PathLike) -> dict:
    """The parsed config.json of an exported model directory (name, config and the extra keys)."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise UserFacingError(f"{path}: not found (expected a directory written by save_pretrained)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserFacingError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not isinstance(meta.get("config"), dict):
        raise UserFacingError(f"{path}: expected an object with a string 'name' and an object 'config'")
    return meta


def from_pretrained(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides) -> nn.Module:
    """Rebuild the model exported by `save_pretrained` and load its weights strictly.

    `overrides` replace config entries that do not change the weights (e.g. `dropout=0.0`). The model is
    returned in eval mode, like Hugging Face `from_pretrained`.
    """
    model_dir = Path(model_dir)
    meta = read_pretrained_config(model_dir)
    model = build(meta["name"], **{**meta["config"], **overrides})
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise UserFacingError(f"{weights}: not found")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise UserFacingError(f"{weights}: cannot read safetensors file ({exc})") from exc
    load_state_dict_checked(model, state, source=str(weights))
    return model.to(map_location).eval()


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state, strict=True)` with one readable error naming the offending keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_abbrev(unexpected)}")
    if wrong:
        problems.append(
            "shape mismatch " + _abbrev([f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong])
        )
    if problems:
        raise UserFacingError(f"{source}: weights do not match model {getattr(model, 'config', {}).get('name')!r}: "
                              + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _abbrev(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', …' if len(items) > n else ''}] ({len(items)})"
