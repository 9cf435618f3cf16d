"""Typed stage configuration on jsonargparse: one dataclass per section, YAML presets, dotted overrides.

    cfg = parse_config(argv, {"run": RunSection, "optim": OptimSection, ...}, prog="pretrain.py", stage="pretrain")
    cfg["optim"]["lr"]

Layers, later wins: section defaults ← `--config PRESET` (a YAML path, or a preset name shipped in the package:
`--config demo` finds `sitskit/configs/pretrain_demo.yaml`) ← `--section.key value`. `--help` lists every key with
its type, default, allowed values and comment (the field's docstring); `--print_config` prints the resolved YAML.
Free-form `kwargs` mappings take YAML values per key: `--model.kwargs.encoder_kwargs "{widths: [8, 32]}"`.

Why jsonargparse: it reads dataclass annotations and attribute docstrings directly (no second schema), checks
`Literal` choices and tuple lengths, and already has `--config` / `--print_config` / dotted keys; OmegaConf has no
`--help`, and simple-parsing does not layer YAML presets with dotted overrides as cleanly. Value ranges are
checked in each dataclass's `__post_init__`, run here after parsing, so every bad value is one line naming its key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sitskit.errors import UserFacingError


def preset_path(name: str, stage: str) -> Path:
    """A YAML path as given, else a preset shipped in `sitskit/configs/` (`demo` → `<stage>_demo.yaml`)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = resources.files("sitskit") / "configs"
    for candidate in (name, f"{name}.yaml", f"{stage}_{name}.yaml", f"{stage}_{name}"):
        p = Path(str(shipped / candidate))
        if p.suffix == ".yaml" and p.is_file():
            return p
    available = sorted(p.name for p in Path(str(shipped)).glob(f"{stage}_*.yaml"))
    raise UserFacingError(f"--config {name}: no such file, and no shipped preset of that name "
                          f"(shipped {stage} presets: {', '.join(a.removesuffix('.yaml') for a in available)})")


def build_parser(sections: dict[str, type], prog: str, description: str):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML preset: a path, or a shipped preset name (e.g. demo, pastis, mtlcc)")
    for name, cls in sections.items():
        parser.add_class_arguments(cls, name, sub_configs=False)
    return parser


def split_free_form(argv: list[str], sections: dict[str, type]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Pull `--<section>.kwargs.<key> VALUE` out of argv (jsonargparse takes a whole dict only)."""
    free = {f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls) if _is_mapping(f)}
    rest, pulled, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        parent = next((p for p in free if name.startswith(p + ".")), None)
        if parent is None:
            rest.append(arg)
            i += 1
            continue
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        else:
            raise UserFacingError(f"command line: --{name} needs a value")
        pulled.append((parent, name[len(parent) + 1:], value))
    return rest, pulled


def parse_config(argv: list[str], sections: dict[str, type], *, prog: str, description: str, stage: str,
                 base: dict | None = None) -> dict:
    """Resolve argv into a nested dict of plain values, validated. `base` (a saved config) replaces the
    section defaults, e.g. when resuming."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config":
            argv[i + 1] = str(preset_path(argv[i + 1], stage))
    argv = [f"--config={preset_path(a.split('=', 1)[1], stage)}" if a.startswith("--config=") else a for a in argv]
    argv, free = split_free_form(argv, sections)
    parser = build_parser(sections, prog, description)
    tmp = None
    try:
        if base is not None:
            import tempfile

            fd, tmp = tempfile.mkstemp(suffix=".yaml")
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump({k: v for k, v in base.items() if k in sections}, f)
            argv = ["--config", tmp, *argv]
        ns = parser.parse_args(argv)
    except Exception as exc:  # noqa: BLE001 — jsonargparse.ArgumentError, with a multi-line message
        raise UserFacingError(_one_line(exc)) from None
    finally:
        if tmp:
            os.unlink(tmp)
    cfg = ns.as_dict()
    cfg.pop("config", None)
    cfg.pop("__path__", None)
    for parent, key, raw in free:
        section, mapping = parent.split(".", 1)
        node = cfg[section].setdefault(mapping, {}) if cfg[section].get(mapping) is not None else None
        if node is None:
            node = cfg[section][mapping] = {}
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _yaml_value(raw)
    return validate_sections(cfg, sections)


def validate_sections(cfg: dict, sections: dict[str, type]) -> dict:
    """Run each section's `__post_init__` checks; return plain nested dicts (lists, not tuples)."""
    out = {}
    for name, cls in sections.items():
        values = {k: v for k, v in cfg.get(name, {}).items() if not k.startswith("__")}
        try:
            obj = cls(**values)
        except (ValueError, TypeError) as exc:
            raise UserFacingError(_prefix(name, str(exc))) from None
        out[name] = _plain(dataclasses.asdict(obj))
    return out


def check(condition: bool, message: str) -> None:
    """For `__post_init__`: raise the one-line error `message` unless `condition`."""
    if not condition:
        raise ValueError(message)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def help_requested(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def print_help(sections: dict[str, type], prog: str, description: str) -> None:
    """The stage's docstring as written, then every key with type, default, choices and comment."""
    print(description.strip() + "\n")
    build_parser(sections, prog, None).print_help(sys.stdout)


def dump_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_mapping(f: dataclasses.Field) -> bool:
    return f.type in (dict, "dict") or str(f.type).startswith("dict")


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _prefix(section: str, message: str) -> str:
    return message if message.startswith(f"{section}.") else f"{section}: {message}"


def _one_line(exc: Exception) -> str:
    """jsonargparse's messages span lines ('Parser key "x":\\n  Expected …'): join them into one."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    text = re.sub(r'^Parser key "([^"]+)":\s*', r"\1: ", text)
    text = re.sub(r"Expected a typing\.Literal\[([^\]]*)\]", lambda m: "expected one of " + m.group(1).replace("'", ""), text)
    text = re.sub(r"Expected a <class '(\w+)'>", r"expected a \1", text)
    text = text.replace(". Got value:", ", got").replace("Got value:", "got")
    text = text.replace("expected a int,", "expected an integer,").replace("expected a float,", "expected a finite number,")
    if text.startswith("unrecognized arguments"):
        text = "command line: " + text + " (see --help for the keys)"
    return text
