"""Mean ± sd tables (over seeds) of the experiment sweeps in experiments/_work/ft, from each cell's
test/metrics.json (docs/experiments.md), with parameters, training seconds and test patches/s. The same
table as a sweep's results.md, but over every cell in the folder (a sweep's results.md shows the cells of
its last invocation only):

    python experiments/summarize_sweeps.py [FOLDER ...]      # default: every sweep folder present
"""
from __future__ import annotations

import sys
from pathlib import Path

from sitskit.finetune.sweep import result_row, summary_table

W = Path("experiments/_work/ft")
KINDS = {"labels": "labels", "labels_utae": "labels", "crossyear": "cross-year", "early": "early-season",
         "zoo": "models", "zoo_stcln_small": "models", "noise": "noise"}  # folder -> sweep kind


def cells(folder: str) -> list[dict]:
    """Every finished cell of a sweep folder, as the sweep's results rows (`sweep.result_row`). Cell folders
    are `<label>-<x>-s<seed>` (the label holds no '-')."""
    out = []
    for f in sorted((W / folder).glob("*/test/metrics.json")):
        key, _, seed = f.parents[1].name.rpartition("-s")
        label, _, x = key.partition("-")
        out.append(result_row(W / folder, {"label": label, "x": x, "seed": int(seed)}))
    return out


if __name__ == "__main__":
    for folder in sys.argv[1:] or list(KINDS):
        if (W / folder).exists():
            print(f"### {folder}\n\n{summary_table(cells(folder), KINDS.get(folder, 'models'))}")
