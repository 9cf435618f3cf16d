"""Mean ± sd tables (over seeds) of the experiment sweeps in experiments/_work/ft, from each cell's
test/metrics.json (docs/experiments.md):

    python experiments/summarize_sweeps.py
"""
from __future__ import annotations

import json
from pathlib import Path

from sitskit.finetune.sweep import mean_sd

W = Path("experiments/_work/ft")
SWEEPS = [("labels", "STCLN encoder, label share"), ("labels_utae", "model, label share"),
          ("crossyear", "encoder"), ("early", "encoder, cut-off"), ("zoo", "model"), ("noise", "sigma")]


def table(folder: str, header: str) -> str:
    groups: dict[str, list[dict]] = {}
    for f in sorted((W / folder).glob("*/test/metrics.json")):
        groups.setdefault(f.parents[1].name.rsplit("-s", 1)[0], []).append(json.loads(f.read_text()))
    lines = [f"| {header} | seeds | OA | mIoU | mF1 | kappa |", "|---|---:|---:|---:|---:|---:|"]
    for key, rows in groups.items():
        cells = " | ".join(mean_sd([m[x] for m in rows]) for x in ("OA", "mIoU", "mF1", "kappa"))
        lines.append(f"| {key} | {len(rows)} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for folder, header in SWEEPS:
        if (W / folder).exists():
            print(f"### {folder}\n\n{table(folder, header)}\n")
