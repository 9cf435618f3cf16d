"""Mean ± sd tables (over seeds) of the experiment sweeps in experiments/_work/ft, from each cell's
test/metrics.json (docs/experiments.md), with parameters, training seconds and test patches/s. The same
table as a sweep's results.md, but over every cell in the folder (a sweep's results.md shows the cells of
its last invocation only):

    python experiments/summarize_sweeps.py [FOLDER ...]      # default: every sweep folder present
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sitskit.finetune.sweep import METRICS, summary_table

W = Path("experiments/_work/ft")
KINDS = {"labels": "labels", "labels_utae": "labels", "crossyear": "cross-year", "early": "early-season",
         "zoo": "models", "zoo_stcln_small": "models", "noise": "noise"}  # folder -> sweep kind


def cells(folder: str) -> list[dict]:
    """Every finished cell of a sweep folder, as a sweep results row: {"label", "x", "seed", "run",
    "parameters", "train_seconds", "patches_per_s", "hardware", *METRICS}. Cell folders are
    `<label>-<x>-s<seed>` (the label holds no '-')."""
    out = []
    for f in sorted((W / folder).glob("*/test/metrics.json")):
        run = f.parents[1].name
        key, _, seed = run.rpartition("-s")
        label, _, x = key.partition("-")
        m = json.loads(f.read_text())
        out.append({"label": label, "x": x, "seed": int(seed), "run": run, "parameters": m.get("parameters"),
                    "train_seconds": m.get("train_seconds"), "patches_per_s": m.get("test_patches_per_s"),
                    "hardware": (m.get("hardware") or {}).get("cpu"), **{k: m.get(k) for k in METRICS}})
    return out


if __name__ == "__main__":
    for folder in sys.argv[1:] or list(KINDS):
        if (W / folder).exists():
            print(f"### {folder}\n\n{summary_table(cells(folder), KINDS.get(folder, 'models'))}")
