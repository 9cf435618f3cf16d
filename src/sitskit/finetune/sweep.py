"""`finetune.py sweep KIND --config PRESET [--seeds 0 1 2] [grid options] [-- --section.key value …]`

Runs a grid of fine-tunes, each a normal `finetune.py` run (its own process, run folder and MLflow run) nested
under one parent MLflow run (the sweep), then writes `<out>/results.csv`, `<out>/results.md` and `<out>/<kind>.png`
(metric mean ± sd over seeds). A finished cell (its test/metrics.json exists) is not run again, so an
interrupted sweep continues where it stopped.

    labels        --fractions 0.01 0.02 0.05 0.1 1.0 --pretrained none ckpt/a/encoder ckpt/b/encoder
    early-season  --cutoffs 2017-04-30 2017-06-30 … (data.max_date) --pretrained none ckpt/a/encoder
    cross-year    --pretrained none ckpt/a/encoder (the preset decides years and dates; one cell per encoder)
    models        --models stcln utae convlstm …
    noise         --sigmas 0 0.01 0.02 0.05 --noise-prob 0.5
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from sitskit.errors import Terminated, UserFacingError, raise_on_sigterm

KINDS = ("labels", "early-season", "cross-year", "models", "noise")
AXIS = {"labels": "label share", "early-season": "cut-off", "cross-year": "encoder", "models": "model",
        "noise": "sigma"}  # what the grid value of each kind is
METRICS = ("OA", "mIoU", "mF1", "kappa", "PQ", "SQ", "RQ")  # PQ / SQ / RQ: panoptic runs (--task panoptic)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserFacingError(f"finetune.py sweep: {message}")


def parse(argv: list[str]):
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = _Parser(prog="finetune.py sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--config", required=True, help="fine-tuning preset every cell starts from")
    p.add_argument("--data", help="data file (else the preset's data.path)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", help="sweep folder (default checkpoints/sweep-<kind>-<UTC time>)")
    p.add_argument("--name", help="sweep name (MLflow parent run; default the folder name)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 1.0])
    p.add_argument("--cutoffs", nargs="+", help="early-season cut-off dates YYYY-MM-DD (data.max_date)")
    p.add_argument("--pretrained", nargs="+", default=["none"],
                   help="encoders to compare: none (from scratch), folders or runs:/ URIs")
    p.add_argument("--labels", nargs="+", help="display names of --pretrained (default derived from paths)")
    p.add_argument("--models", nargs="+", default=["stcln", "utae"])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.05])
    p.add_argument("--noise-prob", type=float, default=0.5)
    p.add_argument("--metric", default="mIoU", choices=METRICS, help="plotted metric")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run at once (each gets cores/jobs threads unless OMP_NUM_THREADS is set)")
    p.add_argument("--launcher", default="python", help="how each cell runs: python | 'accelerate launch …'")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise UserFacingError(f"finetune.py sweep: --jobs {args.jobs}: must be 1 or more")
    args.overrides = rest
    return args


def grid(args) -> list[dict]:
    """Cells: {"label": name shown, "x": grid value, "seed": s, "args": finetune.py overrides}."""
    labels = args.labels or [_label(p) for p in args.pretrained]
    if len(labels) != len(args.pretrained):
        raise UserFacingError("--labels must name each --pretrained entry")
    encoders = [(lab, [] if p == "none" else ["--model.pretrained", p]) for lab, p in zip(labels, args.pretrained)]
    cells = []
    for seed in args.seeds:
        seed_args = ["--run.seed", str(seed)]
        if args.kind == "labels":
            for lab, enc in encoders:
                for f in args.fractions:
                    sub = [] if f >= 1 else ["--data.label_subset", repr(float(f))]
                    cells.append({"label": lab, "x": f, "seed": seed, "args": enc + sub + seed_args})
        elif args.kind == "early-season":
            if not args.cutoffs:
                raise UserFacingError("sweep early-season needs --cutoffs YYYY-MM-DD …")
            for lab, enc in encoders:
                for c in args.cutoffs:
                    cells.append({"label": lab, "x": c, "seed": seed, "args": enc + ["--data.max_date", c] + seed_args})
        elif args.kind == "cross-year":
            for lab, enc in encoders:
                cells.append({"label": lab, "x": lab, "seed": seed, "args": enc + seed_args})
        elif args.kind == "models":
            for m in args.models:
                cells.append({"label": m, "x": m, "seed": seed, "args": ["--model.name", m] + seed_args})
        elif args.kind == "noise":
            for s in args.sigmas:
                cells.append({"label": "noise", "x": s, "seed": seed,
                              "args": ["--data.noise_sigma", str(s), "--data.noise_prob",
                                       str(args.noise_prob if s > 0 else 0.0)] + seed_args})
    return cells


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except Terminated:  # SIGTERM: stop like Ctrl-C (running cells save their state), exit 143
        print("finetune.py sweep: SIGTERM: the running cells were stopped; finished cells are kept, rerun the same "
              "command to continue", file=sys.stderr)
        return 143


def _main(argv: list[str]) -> int:
    args = parse(argv)
    raise_on_sigterm()
    from sitskit import tracking

    out = Path(args.out or f"checkpoints/sweep-{args.kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or out.name
    cells = grid(args)
    base = ["--config", args.config] + (["--data.path", args.data] if args.data else []) + args.overrides
    parent = tracking.start_run("sitskit-sweeps", name)
    import mlflow

    mlflow.set_tags({"sweep.kind": args.kind, "sweep.cells": str(len(cells)), "sweep.folder": str(out.resolve())})
    mlflow.log_params({"config": args.config, "seeds": " ".join(map(str, args.seeds)),
                       "overrides": " ".join(args.overrides)[:5000]})
    mlflow.end_run()
    rows, status = [], "FINISHED"
    env = dict(os.environ, SITSKIT_PARENT_RUN_ID=parent.info.run_id)
    if args.jobs > 1:  # share the cores: each cell gets cores // jobs threads unless the user set them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    todo = [(i, c) for i, c in enumerate(cells, 1) if not (out / _cell_name(c) / "test" / "metrics.json").is_file()]
    running: dict = {}  # Popen -> (cell name, start time)
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                i, cell = todo.pop(0)
                run_name = _cell_name(cell)
                cmd = _launcher(args.launcher) + [*base, *cell["args"], "--output.dir", str(out),
                                                  "--output.name", run_name, "--output.overwrite", "true",
                                                  "--run.progress", "false"]
                shown = ["finetune.py", *cmd[len(_launcher(args.launcher)):]]
                print(f"[{i}/{len(cells)}] $ {shlex.join(shown)}", flush=True)
                running[subprocess.Popen(cmd, env=env)] = (run_name, time.perf_counter())
            proc = _wait_any(running)
            run_name, t0 = running.pop(proc)
            if proc.returncode:
                raise UserFacingError(f"sweep cell {run_name} failed with exit code {proc.returncode}; fix it and "
                                      "rerun the same command (finished cells are kept)")
            (out / run_name / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    except (KeyboardInterrupt, UserFacingError):
        status = "KILLED"
        for proc in running:  # the other cells stop too (they save their state and can be resumed)
            proc.terminate()
        for proc in running:
            proc.wait()
        raise
    finally:
        rows = [result_row(out, c) for c in cells if (out / _cell_name(c) / "test" / "metrics.json").is_file()]
        if rows:
            write_results(out, rows, args)
            tracking.start_run("", "", run_id=parent.info.run_id)
            for f in ("results.csv", "results.md", f"{args.kind}.png"):
                if (out / f).exists():
                    mlflow.log_artifact(str(out / f))
            mlflow.end_run(status=status)
    print(f"\n{(out / 'results.md').read_text()}\nwrote {out / 'results.csv'}, {out / 'results.md'}, "
          f"{out / (args.kind + '.png')}")
    return 0


def _wait_any(running: dict):
    """The first of the running cell processes to finish."""
    while True:
        for proc in running:
            if proc.poll() is not None:
                return proc
        time.sleep(0.5)


def result_row(out: Path, cell: dict) -> dict:
    """One results.csv row: the cell, its test metrics, parameters, training seconds (without validation;
    the cell's wall time for runs written before that was recorded) and test patches per second."""
    run_name = _cell_name(cell)
    metrics = json.loads((out / run_name / "test" / "metrics.json").read_text())
    wall = out / run_name / "wall_seconds.txt"
    train = metrics.get("train_seconds") or (float(wall.read_text()) if wall.exists() else None)
    return {"label": cell["label"], "x": cell["x"], "seed": cell["seed"], "run": run_name,
            "parameters": metrics.get("parameters"), "train_seconds": train,
            "patches_per_s": metrics.get("test_patches_per_s"), **{k: metrics.get(k) for k in METRICS}}


def write_results(out: Path, rows: list[dict], args) -> None:
    import matplotlib.pyplot as plt

    from sitskit.finetune.figures import sweep_plot

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "results.md").write_text(summary_table(rows, args.kind))
    axis = AXIS[args.kind]
    fig = sweep_plot([{**r, axis: r["x"]} for r in rows], x=axis, y=args.metric, hue="label",
                     title=f"{args.kind}: {args.metric} (mean ± sd)")
    fig.savefig(out / f"{args.kind}.png", dpi=110)
    plt.close(fig)


def summary_table(rows: list[dict], kind: str) -> str:
    """Markdown: one line per (label, x) with mean ± sd over seeds of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["x"]), []).append(r)
    head = AXIS[kind]
    shown = [m for m in METRICS if any(r.get(m) is not None for r in rows)] or list(METRICS[:4])
    lines = [f"| encoder / setting | {head} | seeds | parameters | " + " | ".join(shown)
             + " | train s | test patches/s |", "|---|---|---:|---:|" + "---:|" * (len(shown) + 2)]
    for (label, x), rs in groups.items():
        cells = [mean_sd([r[m] for r in rs]) for m in shown]
        params = next((r.get("parameters") for r in rs if r.get("parameters")), None)
        lines.append(f"| {label} | {x} | {len(rs)} | {f'{params:,}' if params else 'n/a'} | " + " | ".join(cells)
                     + f" | {_mean(rs, 'train_seconds', '.0f')} | {_mean(rs, 'patches_per_s', '.1f')} |")
    return "\n".join(lines) + "\n"


def mean_sd(values) -> str:
    """'m ± sd' (sample sd) of the non-None values; the value alone for one (no sd to show); 'n/a' if none."""
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    m = sum(v) / len(v)
    if len(v) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def _mean(rows: list[dict], key: str, fmt: str) -> str:
    v = [r[key] for r in rows if r.get(key) is not None]
    return format(sum(v) / len(v), fmt) if v else "n/a"


def _label(p: str) -> str:
    if p == "none":
        return "scratch"
    parts = Path(p.replace("runs:/", "")).parts
    return parts[-2] if len(parts) >= 2 and parts[-1] in ("encoder", "model") else parts[-1]


def _cell_name(cell: dict) -> str:
    x = str(cell["x"]).replace("/", "_")
    return f"{cell['label']}-{x}-s{cell['seed']}".replace(" ", "_")


def _launcher(text: str) -> list[str]:
    """The command prefix of one cell; it runs in the current directory, so relative paths keep working."""
    module = ["-m", "sitskit.finetune.main_finetune"]
    if text == "python":
        return [sys.executable, *module]
    parts = shlex.split(text)
    if parts[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *parts[2:], *module]
    raise UserFacingError(f"--launcher {text!r}: use python or 'accelerate launch [its options]'")
