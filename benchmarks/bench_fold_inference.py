#!/usr/bin/env python
"""Inference over a whole PASTIS fold as `finetune.py evaluate` runs it: HDF5 -> DataLoader workers ->
model -> argmax -> confusion matrix, end to end, in patches/s.

    python benchmarks/bench_fold_inference.py --simulate 490 --device cuda --configs fp32 bf16 bf16+compile
    python benchmarks/bench_fold_inference.py --h5 pastis.h5 --folds 1 --workers 8 --batch-size 4
    python benchmarks/bench_fold_inference.py --simulate 20 --configs fp32 --model stcln --window 32   # CPU

--simulate N writes N simulated 128x128 patches (a PASTIS fold holds ~490 of the 2,433), converts them
with data_prep and scores all of them; --h5 uses an existing file (--folds to pick a fold). Weights are
random (speed does not depend on them). Each configuration first runs an untimed pass over
`--warmup-patches` patches (cuDNN autotuning, `torch.compile`'s compile time, reported separately), then
one timed pass over every patch. "model s" is the time inside the forwards (synchronised), the rest of
the wall time is reading, collating and copying to the device.

Configurations: fp32 | bf16 (autocast) with optional "+compile" (torch.compile of the model) and
"+nchw" (U-TAE in NCHW instead of its default layout).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from sitskit.data import build_dataset
from sitskit.finetune.engine_finetune import evaluate
from sitskit.models import build


class _Device:
    """The part of an Accelerator that `evaluate` uses, for one process without Accelerate's launcher."""
    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: torch.device, bf16: bool):
        self.device, self.bf16 = device, bf16

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def reduce(self, t, reduction="sum"):
        return t


def simulated_file(n: int, workers: int, root: Path) -> Path:
    from sitskit.data_prep import convert_pastis
    from sitskit.simulate import simulate_pastis

    t0 = time.perf_counter()
    raw = simulate_pastis(root / "PASTIS", n_patches=n, size=128, seed=0, workers=workers)
    t1 = time.perf_counter()
    h5 = convert_pastis(raw, root / "pastis.h5", workers=workers)
    print(f"simulated {n} patches in {t1 - t0:.1f} s, converted in {time.perf_counter() - t1:.1f} s "
          f"({workers} workers)", flush=True)
    return h5


def make_model(name: str, nchw: bool, device: torch.device):
    torch.manual_seed(0)
    kwargs = {"channels_last": False} if (nchw and name == "utae") else {}
    model = build(name, in_channels=10, num_classes=20, **kwargs).eval().to(device)
    if name == "stcln":
        with torch.no_grad():
            model.head.gate.fill_(0.5)  # a trained-like gate: the attention term counts
    return model


class _Timed(torch.nn.Module):
    """Wraps a model; adds the synchronised time of each forward to `seconds`."""

    def __init__(self, model, device):
        super().__init__()
        self.model, self.device, self.seconds = model, device, 0.0

    def forward(self, *args):
        t0 = time.perf_counter()
        out = self.model(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return out


def run_config(config: str, ds, args, device) -> dict:
    parts = config.split("+")
    bf16, compiled, nchw = parts[0] == "bf16", "compile" in parts, "nchw" in parts
    model = make_model(args.model, nchw, device)
    timed = _Timed(torch.compile(model) if compiled else model, device)
    acc = _Device(device, bf16)
    kw = {"window": args.window, "batch_size": args.batch_size, "num_workers": args.workers}
    warm = torch.utils.data.Subset(ds, range(min(args.warmup_patches, len(ds))))
    t0 = time.perf_counter()
    evaluate(timed, warm, acc, 20, **kw)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed.seconds = 0.0
    t0 = time.perf_counter()
    confusion, n = evaluate(timed, ds, acc, 20, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"config": config, "patches": n, "wall_s": wall, "patches_per_s": n / wall, "model_s": timed.seconds,
            "warmup_s": warmup_s, "peak_gpu_mib": peak, "pixels": int(confusion.sum())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--h5", type=Path, help="sitskit HDF5 file (data_prep.py pastis)")
    src.add_argument("--simulate", type=int, metavar="N", help="simulate N 128x128 patches and convert them")
    p.add_argument("--folds", type=int, nargs="+", help="with --h5: PASTIS folds (default: every patch)")
    p.add_argument("--model", default="utae", choices=("utae", "stcln"))
    p.add_argument("--window", type=int, default=None, help="sliding window (STCLN fine-tuned on crops: 32)")
    p.add_argument("--configs", nargs="+", default=["fp32"], help="fp32 | bf16, with +compile / +nchw")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--warmup-patches", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="sitskit_fold_") as tmp:
        path = args.h5 or simulated_file(args.simulate, args.workers, Path(tmp))
        ds = build_dataset(path, task="semantic", folds=args.folds)
        hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"{args.model} inference, {len(ds)} patches of {path.name}, batch {args.batch_size}, "
              f"{args.workers} workers, window {args.window}, on {hardware}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
        rows = []
        for config in args.configs:
            rows.append(run_config(config, ds, args, device))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| model | config | patches | wall s | patches/s | model s | warm-up s ({args.warmup_patches} patches) "
          "| peak GPU MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {args.model} | {r['config']} | {r['patches']} | {r['wall_s']:.1f} | {r['patches_per_s']:.1f} | "
              f"{r['model_s']:.1f} | {r['warmup_s']:.1f} | {r['peak_gpu_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware, "model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
