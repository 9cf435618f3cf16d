#!/usr/bin/env python
"""Fine-tuning throughput: training samples/s and evaluation patches/s of STCLN + STA and U-TAE, and
`finetune.py predict --geotiff` area throughput (km²/min) on a simulated region.

    python benchmarks/bench_finetune.py [--device cpu|cuda] [--bf16] [--repeats 3] [--region]

Training: one optimiser step (forward, masked CE, backward, AdamW) on a batch of B 32x32 crops with T dates.
Evaluation: full 128x128 patches with every date, natively (U-TAE) and with a 32-px sliding window (STCLN,
trained on 32x32 crops), as `finetune.py evaluate` runs them. Prints markdown tables for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sitskit.finetune.engine_finetune import masked_cross_entropy
from sitskit.finetune.inference import predict_patch
from sitskit.models import build

MODELS = {
    "stcln (paper size, 3.0 M)": ("stcln", {}),
    "stcln (demo size)": ("stcln", {"encoder_kwargs": {"widths": [16, 32], "n_head": 4, "d_ffn": 64, "n_layers": 2}}),
    "utae (1.1 M)": ("utae", {}),
}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_models(device: str, bf16: bool, repeats: int, batch: int, dates: int, only=None) -> list[str]:
    rows = [f"| model | train samples/s (B={batch}, T={dates}, 32²) | eval patches/s (128², T={dates}) | eval mode |",
            "|---|---:|---:|---|"]
    print("\n".join(rows), flush=True)
    for label, (name, kwargs) in MODELS.items():
        if only and not any(o in label for o in only):
            continue
        rows.append(bench_one(label, name, kwargs, device, bf16, repeats, batch, dates))
        print(rows[-1], flush=True)
    return rows


def bench_one(label, name, kwargs, device, bf16, repeats, batch, dates) -> str:
    ignore = torch.zeros(20, dtype=torch.bool)
    ignore[19] = True
    amp = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    torch.manual_seed(0)
    model = build(name, in_channels=10, num_classes=20, **kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, dates, 10, 32, 32, device=device)
    d = torch.arange(dates, device=device).repeat(batch, 1) * 5
    y = torch.randint(0, 20, (batch, 32, 32), device=device)

    def step():
        with amp():
            logits = model(x, d, None)
        masked_cross_entropy(logits, y, ignore.to(device)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    train_s = timed(step, repeats)
    model.eval()
    full = torch.randn(1, dates, 10, 128, 128, device=device)
    fd = torch.arange(dates, device=device)[None] * 5
    window = 32 if name == "stcln" else None

    def fwd(a, b, c):
        with amp():
            return model(a, b, c).float()

    with torch.no_grad():
        eval_s = timed(lambda: predict_patch(fwd, full, fd, None, window=window, overlap=0.25), max(1, repeats - 1))
    mode = "sliding window 32, overlap 0.25" if window else "native"
    return f"| {label} | {batch / train_s:.2f} | {1 / eval_s:.3f} | {mode} |"


def bench_region(size: int) -> list[str]:
    """Whole path on a simulated scene: data_prep geotiff, a 2-step fine-tune, then timed predict --geotiff."""
    py, repo = sys.executable, Path(__file__).resolve().parents[1]
    rows = ["| model | area | predict --geotiff wall s | km²/min |", "|---|---:|---:|---:|"]
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        run = lambda *a: subprocess.run([py, *a], cwd=repo, check=True, capture_output=True)
        run("data_prep.py", "simulate", "--format", "geotiff", "--out", str(t / "scene"), "--size", str(size))
        run("data_prep.py", "geotiff", "--images", str(t / "scene"), "--labels", str(t / "scene" / "parcels.gpkg"),
            "--class-field", "CODE", "--class-map", str(t / "scene" / "crop_codes.csv"), "--out", str(t / "region.h5"))
        km2 = (size * 10 / 1000) ** 2
        for name, extra in (("utae", ["--model.name", "utae", "--model.kwargs", "{}", "--eval.window", "null"]),
                            ("stcln (demo size)", [])):
            ck = t / name.split()[0]
            run("finetune.py", "--config", "demo_region", "--data.path", str(t / "region.h5"), "--data.split", "null",
                "--data.val_split", "null", "--data.test_split", "null", "--train.max_steps", "2", "--run.tracking",
                "false", "--run.progress", "false", "--output.dir", str(t), "--output.name", ck.name, *extra)
            t0 = time.perf_counter()
            run("finetune.py", "predict", "--checkpoint", str(ck), "--data", str(t / "region.h5"),
                "--geotiff", str(t / f"{ck.name}.tif"))
            wall = time.perf_counter() - t0
            rows.append(f"| {name} | {km2:.2f} km² ({size}² px) | {wall:.1f} | {km2 / wall * 60:.2f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dates", type=int, default=30)
    p.add_argument("--models", nargs="+", help="substrings of the model labels to run (default all), e.g. demo utae")
    p.add_argument("--region", action="store_true", help="also time predict --geotiff on a simulated scene")
    p.add_argument("--region-size", type=int, default=256)
    args = p.parse_args()
    load = os.getloadavg()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, device {args.device}{' bf16' if args.bf16 else ''}, load {load[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    bench_models(args.device, args.bf16, args.repeats, args.batch, args.dates, args.models)
    if args.region:
        bench_region(args.region_size)
    print(f"# load after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
