"""Command line of a training stage: config, `--resume`, and one-line errors with conventional exit codes.

    python pretrain.py --config demo --data.path data/pastis.h5          # a new run
    python pretrain.py --resume checkpoints/<run>                         # continue it, from its config.yaml
    python pretrain.py --resume --output.name <run> --train.max_steps 500 # same, and train longer

`--resume` never guesses: it needs the run folder or `--output.name`. The run's saved `config.yaml` is the
configuration; a preset given again is ignored; other overrides are refused unless they are resumable
(`sitskit.stage.sections.RESUMABLE_KEYS`: more steps or epochs, logging, workers).
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from sitskit.errors import UserFacingError
from sitskit.stage.config import flatten, help_requested, parse_config, print_help, validate_sections
from sitskit.stage.sections import RESUMABLE_KEYS


def parse_stage_args(argv: list[str], sections: dict[str, type], *, stage: str, prog: str,
                     description: str) -> tuple[dict, Path | None]:
    """Returns (config, run folder to resume or None)."""
    argv, resume, resume_path = _pop_resume(argv)
    if not resume:
        return parse_config(argv, sections, prog=prog, description=description, stage=stage), None
    run_dir = Path(resume_path) if resume_path else _named_run(argv, stage)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise UserFacingError(f"--resume {run_dir}: no config.yaml there (not a sitskit {stage} run folder)")
    try:
        saved = yaml.safe_load(saved_path.read_text())
        saved = validate_sections(saved, sections)
    except (yaml.YAMLError, AttributeError, TypeError) as exc:
        raise UserFacingError(f"{saved_path}: unreadable ({exc})") from None
    overrides = _drop_option(argv, "--config")
    cfg = parse_config(overrides, sections, prog=prog, description=description, stage=stage, base=saved)
    old, new = flatten(saved), flatten(cfg)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused[:4])
        raise UserFacingError(f"--resume {run_dir}: cannot change {shown} in a resumed run (only "
                              f"{', '.join(RESUMABLE_KEYS)} may change); start a new run with another --output.name")
    cfg["output"]["dir"], cfg["output"]["name"] = str(run_dir.parent), run_dir.name
    return cfg, run_dir


def run_main(main_fn, argv: list[str] | None, sections: dict[str, type], *, stage: str, prog: str,
             description: str) -> int:
    """Parse, run `main_fn(cfg, resume_dir) -> exit code`, and turn errors into one line + exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = ["--output.overwrite=true" if a == "--overwrite" else a for a in argv]  # like data_prep's flag
    try:
        if help_requested(argv):
            print_help(sections, prog, description)
            return 0
        if "--print_config" in argv:
            cfg = parse_config([a for a in argv if a != "--print_config"], sections, prog=prog,
                               description=description, stage=stage)
            print(yaml.safe_dump(cfg, sort_keys=False), end="")
            return 0
        cfg, resume_dir = parse_stage_args(argv, sections, stage=stage, prog=prog, description=description)
        return main_fn(cfg, resume_dir)
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop without saving
        print("interrupted without saving", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `--help | head`: stop quietly, also at interpreter exit
        quiet_closed_pipe()
        return 0


def quiet_closed_pipe() -> None:
    """After a BrokenPipeError on stdout: point stdout at /dev/null so the final flush raises nothing."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _pop_resume(argv: list[str]) -> tuple[list[str], bool, str | None]:
    rest, resume, path, i = [], False, None, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--resume", "--run.resume"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                if nxt.lower() in ("true", "false"):
                    resume = resume or nxt.lower() == "true"
                else:
                    resume, path = True, nxt
                i += 2
                continue
            resume, i = True, i + 1
            continue
        if arg.startswith(("--resume=", "--run.resume=")):
            value = arg.split("=", 1)[1]
            if value.lower() not in ("false", "no", "0"):
                resume = True
                path = None if value.lower() in ("true", "yes", "1") else value
            i += 1
            continue
        rest.append(arg)
        i += 1
    return rest, resume, path


def _option_value(argv: list[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _drop_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def _named_run(argv: list[str], stage: str) -> Path:
    name = _option_value(argv, "--output.name")
    if not name:
        raise UserFacingError("--resume needs the run to continue: --resume checkpoints/<run> or "
                              "--resume --output.name <run> (it never picks a run by itself)")
    out_dir = _option_value(argv, "--output.dir")
    if out_dir is None:
        preset = _option_value(argv, "--config")
        if preset:
            from sitskit.stage.config import preset_path

            data = yaml.safe_load(preset_path(preset, stage).read_text()) or {}
            out_dir = (data.get("output") or {}).get("dir")
    return Path(out_dir or "checkpoints") / name
