"""Generic configuration: defaults (a nested dict) ← YAML preset ← `--section.key value` overrides.

Every key must exist in the defaults (typos fail loudly with the list of valid keys) and each value is
coerced to the type of its default: `--optim.lr 3e-4` gives a float, `--mask.gating false` a bool,
`--data.folds 1,2` (or `[1, 2]`) a list of ints. A default of `None` accepts any YAML value. A section
whose default is an empty dict (e.g. `model.kwargs: {}`) is free-form: any key is accepted there and
its value is parsed as YAML (`--model.kwargs.d_model 64`).

    cfg = load_config(["--config", "configs/pretrain_demo.yaml", "--optim.lr", "1e-3"], DEFAULTS)
    cfg["optim"]["lr"]  # 0.001
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from sitskit.errors import UserFacingError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def load_config(argv: list[str], defaults: dict, *, config_flag: str = "--config") -> dict:
    """Resolve a config from `argv` = `[--config FILE] [--a.b VALUE | --a.b=VALUE | --flag] …`.

    A bare `--a.b` (no value, or followed by another `--option`) sets a boolean key to true.
    Returns a new nested dict; `defaults` is not modified.
    """
    preset, pairs = _split_argv(argv, config_flag)
    cfg = copy.deepcopy(defaults)
    if preset is not None:
        cfg = merge(cfg, load_yaml(preset), source=str(preset))
    for key, raw in pairs:
        set_dotted(cfg, defaults, key, raw)
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserFacingError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserFacingError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict, update: dict, *, source: str = "config", prefix: str = "") -> dict:
    """Recursively overlay `update` on `base` (in place, returned), coercing and validating each leaf."""
    free_form = _is_free_form(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base or free_form:
            if free_form:
                base[key] = value
                continue
            raise UserFacingError(f"{source}: unknown key '{dotted}'; valid keys here: {_valid(base, prefix)}")
        if isinstance(base[key], dict) and value is not None and not isinstance(value, dict):
            raise UserFacingError(f"{source}: '{dotted}' is a section; give a mapping, got {value!r}")
        if isinstance(base[key], dict):
            if value is None:
                continue
            merge(base[key], value, source=source, prefix=f"{dotted}.")
        else:
            base[key] = coerce(value, base[key], dotted, source)
    return base


def set_dotted(cfg: dict, defaults: dict, key: str, raw: Any, source: str = "command line") -> None:
    """Set `cfg[a][b] = raw` for key "a.b", validated against `defaults` and coerced to its type."""
    parts = key.split(".")
    node, ref = cfg, defaults
    for i, part in enumerate(parts[:-1]):
        if isinstance(ref, dict) and not ref and isinstance(node, dict):  # inside a free-form section
            node = node.setdefault(part, {})
            continue
        if not isinstance(ref, dict) or part not in ref or not isinstance(ref[part], dict):
            where = ".".join(parts[: i + 1])
            raise UserFacingError(f"{source}: unknown option '--{key}' ('{where}' is not a section; "
                                  f"valid: {_valid(ref, '.'.join(parts[:i]) + '.' if i else '')})")
        node, ref = node[part], ref[part]
    leaf = parts[-1]
    if isinstance(ref, dict) and not ref:  # free-form: keep YAML's own typing
        node[leaf] = _yaml_scalar(raw)
        return
    if leaf not in ref:
        prefix = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
        raise UserFacingError(f"{source}: unknown option '--{key}'; valid keys here: {_valid(ref, prefix)}")
    if isinstance(ref[leaf], dict):
        raise UserFacingError(f"{source}: '--{key}' is a section; set one of its keys, e.g. "
                              f"'--{key}.{next(iter(ref[leaf]), 'x')}'")
    node[leaf] = coerce(raw, ref[leaf], key, source)


def coerce(value: Any, default: Any, key: str, source: str = "config") -> Any:
    """Convert `value` (a YAML value or a command-line string) to the type of `default`."""
    def fail(expected: str):
        raise UserFacingError(f"{source}: '{key}' expects {expected}, got {value!r}")

    if (isinstance(value, str) and not isinstance(default, str) and default is not None
            and value.strip().lower() in _NONE):
        return None
    if value is None:
        return None
    if default is None:
        return _yaml_scalar(value) if isinstance(value, str) else value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        fail("a boolean (true/false)")
    if isinstance(default, int):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            fail("an integer")
        if isinstance(value, bool) or not as_float.is_integer():
            fail("an integer")
        return int(as_float)
    if isinstance(default, float):
        if isinstance(value, bool):
            fail("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            fail("a number")
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            text = value.strip()
            value = _yaml_scalar(text) if text.startswith("[") else [_yaml_scalar(v) for v in text.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if default:  # coerce the items to the type of the first default item
            value = [coerce(v, default[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
        return list(value)
    if isinstance(default, str):
        if isinstance(value, (dict, list)):
            fail("a string")
        return str(value)
    return value


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def _split_argv(argv: list[str], config_flag: str) -> tuple[str | None, list[tuple[str, Any]]]:
    preset, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise UserFacingError(f"command line: unexpected argument {arg!r}; options look like "
                                  f"'--section.key value'")
        name, eq, inline = arg[2:].partition("=")
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not _looks_like_option(argv[i + 1]):
            value, i = argv[i + 1], i + 2
        else:
            value, i = "true", i + 1  # a bare flag
        if f"--{name}" == config_flag:
            preset = value
        else:
            pairs.append((name, value))
    return preset, pairs


def _looks_like_option(token: str) -> bool:
    if not token.startswith("--"):
        return False
    try:  # "--1e-3" is not an option; negative numbers look like "-3" anyway
        float(token)
        return False
    except ValueError:
        return True


def _yaml_scalar(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _is_free_form(node: dict) -> bool:
    return isinstance(node, dict) and not node


def _valid(node: Any, prefix: str) -> str:
    if not isinstance(node, dict):
        return "(none)"
    return ", ".join(f"{prefix}{k}" for k in node) or "(none)"
