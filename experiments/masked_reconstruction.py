#!/usr/bin/env python
"""Experiment: does masked pre-training reconstruct hidden pixel-dates better than trivial baselines?

For each masking strategy (time-space, time, space), pre-train with `pretrain.py` on the training folds,
then on held-out patches hide pixel-dates with the same strategy (ratio, vegetation gating) and compare the
MSE on the hidden entries (standardised units) of:
  - the pre-trained model (encoder + reconstruction head, mask token in the hidden entries);
  - temporal interpolation: per pixel, linear in time between its visible dates (nearest at the ends);
  - neighbour mean: per date, the mean of the visible pixels in the 3x3 neighbourhood (what a CNN can copy
    when only single pixel-dates are hidden), else the crop's mean;
  - spatial mean: per date, the mean of the crop's visible pixels.
A model that only matches interpolation has learned nothing beyond it. Results: docs/experiments.md.

    python experiments/masked_reconstruction.py --h5 data/pastis.h5 --out experiments/_work --steps 200
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from sitskit.data import build_dataset, pad_collate
from sitskit.models import build
from sitskit.pretrain.baselines import neighbour_mean, spatial_mean, temporal_interpolation
from sitskit.pretrain.masking import MaskGenerator

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("time-space", "time", "space")


def pretrain(h5: Path, out: Path, strategy: str, steps: int, train_folds: list[int]) -> Path:
    run_dir = out / strategy
    if not (run_dir / "encoder" / "model.safetensors").exists():
        cmd = [sys.executable, "pretrain.py", "--config", "configs/pretrain_demo.yaml", "--data.path", str(h5),
               "--data.folds", json.dumps(train_folds), "--mask.strategy", strategy,
               "--train.max_steps", str(steps), "--train.epochs", "1000", "--output.dir", str(out),
               "--output.name", strategy, "--output.save_every", str(steps), "--run.experiment",
               "sitskit-exp-masked-reconstruction", "--run.progress", "false"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    return run_dir


def load_model(run_dir: Path) -> torch.nn.Module:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = build(cfg["model"]["name"], in_channels=10, **cfg["model"]["kwargs"])
    state = max((run_dir / "state").glob("step_*")) / "model.safetensors"
    model.load_state_dict(load_file(state))
    return model.eval()


@torch.no_grad()
def evaluate(run_dir: Path, h5: Path, strategy: str, test_fold: int, num_dates: int, seed: int) -> dict:
    model = load_model(run_dir)
    ds = build_dataset(h5, task="pretrain", folds=[test_fold], crop=32, crop_mode="grid", num_dates=num_dates,
                       seed=seed)
    masker = MaskGenerator(0.4, strategy, band_names=ds.band_names, norm_mean=ds.norm_mean, norm_std=ds.norm_std)
    gen = torch.Generator().manual_seed(seed)
    sums = {"model": 0.0, "temporal interpolation": 0.0, "neighbour mean": 0.0, "spatial mean": 0.0}
    n = 0
    for k in range(len(ds)):
        batch = pad_collate([ds[k]])
        x, dates = batch["image"], batch["dates"]
        mask, _ = masker(x, batch["pad_mask"], gen)
        if not mask.any():
            continue
        pred = model(x, dates, batch["pad_mask"], mask)
        m = mask[:, :, None].expand_as(x)
        sums["model"] += float(((pred - x) ** 2)[m].sum())
        xi, hid, days = x[0].numpy(), mask[0].numpy(), dates[0].numpy().astype(float)
        for name, est in (("temporal interpolation", temporal_interpolation(xi, hid, days)),
                          ("neighbour mean", neighbour_mean(xi, hid)), ("spatial mean", spatial_mean(xi, hid))):
            sums[name] += float(((est - xi) ** 2)[np.broadcast_to(hid[:, None], xi.shape)].sum())
        n += int(m.sum())
    return {name: s / max(n, 1) for name, s in sums.items()} | {"hidden entries": n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5", type=Path, required=True)
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "_work")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--train-folds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--test-fold", type=int, default=5)
    p.add_argument("--num-dates", type=int, default=16, help="dates per sample, as the demo preset trains")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = p.parse_args()
    rows = []
    for strategy in args.strategies:
        run_dir = pretrain(args.h5.resolve(), args.out.resolve(), strategy, args.steps, args.train_folds)
        res = evaluate(run_dir, args.h5, strategy, args.test_fold, args.num_dates, args.seed)
        rows.append((strategy, res))
        print(strategy, json.dumps(res), flush=True)
    print("\n| strategy | model | temporal interpolation | 3x3 neighbour mean | crop spatial mean | hidden entries |")
    print("|---|---:|---:|---:|---:|---:|")
    for s, r in rows:
        print(f"| {s} | {r['model']:.4f} | {r['temporal interpolation']:.4f} | {r['neighbour mean']:.4f} "
              f"| {r['spatial mean']:.4f} | {r['hidden entries']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
