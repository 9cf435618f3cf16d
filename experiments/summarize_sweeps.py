"""Mean ± sd tables (over seeds) of the experiment sweeps in experiments/_work/ft, from each cell's
test/metrics.json (docs/experiments.md), with parameters, training seconds and test patches/s:

    python experiments/summarize_sweeps.py [FOLDER ...]      # default: every sweep folder present
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sitskit.finetune.sweep import mean_sd

W = Path("experiments/_work/ft")
SWEEPS = {"labels": "STCLN encoder, label share", "labels_utae": "model, label share", "crossyear": "encoder",
          "early": "encoder, cut-off", "zoo": "model", "noise": "sigma"}


def table(folder: str, header: str) -> str:
    groups: dict[str, list[dict]] = {}
    for f in sorted((W / folder).glob("*/test/metrics.json")):
        key = f.parents[1].name.rsplit("-s", 1)[0]
        label, _, x = key.partition("-")
        groups.setdefault(label if x == label else key, []).append(json.loads(f.read_text()))  # models: "utae-utae"
    lines = [f"| {header} | seeds | parameters | OA | mIoU | mF1 | kappa | train s | test patches/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, rows in groups.items():
        cells = " | ".join(_mean_sd([m[x] for m in rows]) for x in ("OA", "mIoU", "mF1", "kappa"))
        params = rows[0].get("parameters")
        lines.append(f"| {key} | {len(rows)} | {f'{params:,}' if params else 'n/a'} | {cells} | "
                     f"{_mean(rows, 'train_seconds', '.0f')} | {_mean(rows, 'test_patches_per_s', '.1f')} |")
    return "\n".join(lines)


def _mean_sd(values: list) -> str:
    return mean_sd(values) if len(values) > 1 else f"{values[0]:.3f}"  # one seed: no sd to show


def _mean(rows: list[dict], key: str, fmt: str) -> str:
    v = [m[key] for m in rows if m.get(key) is not None]
    return format(sum(v) / len(v), fmt) if v else "n/a"


def cells(folder: str) -> list[dict]:
    """Every finished cell of a sweep folder: {"cell", "seed", **metrics}."""
    out = []
    for f in sorted((W / folder).glob("*/test/metrics.json")):
        key, _, seed = f.parents[1].name.rpartition("-s")
        label, _, x = key.partition("-")
        out.append({"cell": label if x == label else key, "seed": int(seed), **json.loads(f.read_text())})
    return out


if __name__ == "__main__":
    for folder in sys.argv[1:] or list(SWEEPS):
        if (W / folder).exists():
            print(f"### {folder}\n\n{table(folder, SWEEPS.get(folder, folder))}\n")
