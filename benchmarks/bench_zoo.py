"""Forward and forward+backward time and peak memory of every zoo model at PASTIS size (docs/models.md).

    OMP_NUM_THREADS=2 python benchmarks/bench_zoo.py                 # CPU, B=2, T=30, C=10, 128x128, fp32
    python benchmarks/bench_zoo.py --quick                           # 32x32, T=4: smoke test
    python benchmarks/bench_zoo.py --only stenn --device cuda

Each (model, pass) runs in a fresh subprocess, so its peak memory is its own: on CPU the peak resident
set size (`resource.getrusage(...).ru_maxrss`, tracemalloc does not see torch's allocations) and its
increase over the RSS just before the timed call; on CUDA `torch.cuda.max_memory_allocated`. On CPU the
subprocess's address space is capped (`--mem-limit-gib`, default 12) so that a model too big for the
machine fails alone instead of waking the OOM killer on a shared machine. Forward = eval mode under
`torch.inference_mode`; forward+backward = train mode, loss = mean of the logits, `backward()`. One
warm-up call (skipped with `--no-warmup`), then the median of `--repeats` timed calls.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys

from bench_models import hardware, time_step

MODELS = ["utae", "utae_skip_mean", "utae_mean_attention", "utae_batchnorm", "utae_single_date", "stenn",
          "stenn grad_checkpointing", "fcn_lstm", "convlstm", "convgru", "uconvlstm", "ubiconvlstm", "unet3d",
          "fpn_convlstm", "stcln"]
# extra rows: label -> (registered name, build options)
VARIANTS = {"stenn grad_checkpointing": ("stenn", {"grad_checkpointing": True})}
SHAPE, QUICK_SHAPE = (2, 30, 10, 128, 128), (1, 4, 10, 32, 32)


def run_case(spec: dict) -> dict:
    """Executed in a fresh subprocess: build, time, measure memory, return a result dict."""
    if spec["device"] == "cpu" and spec["mem_limit_gib"]:
        limit = int(spec["mem_limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from sitskit.models import build

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    b, t, c, h, w = spec["shape"]
    model = build(spec["model"], in_channels=c, num_classes=20, **spec.get("kwargs", {})).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.randn(b, t, c, h, w, device=device)
    dates = torch.sort(torch.randint(0, 365, (b, t), device=device), dim=1).values
    pad_mask = torch.zeros(b, t, dtype=torch.bool, device=device)

    def step():
        if spec["pass"] == "fwd":
            with torch.inference_mode():
                model(x, dates, pad_mask)
        else:
            model(x, dates, pad_mask).mean().backward()
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train(spec["pass"] == "fwdbwd")
    return {**time_step(step, spec["warmup"], spec["repeats"], device), "params": n_params}


def run_in_subprocess(spec: dict, timeout_s: float) -> tuple[dict | None, str]:
    try:
        proc = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(spec)], capture_output=True,
                              text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"not finished in {timeout_s:.0f} s"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["killed"]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1])
        return None, f"failed: {reason[:160]} (exit {proc.returncode})"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help=f"shape {QUICK_SHAPE} instead of {SHAPE}")
    parser.add_argument("--only", default=None, help="comma-separated model names")
    parser.add_argument("--batch-size", type=int, default=None, help=f"instead of B={SHAPE[0]}")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--mem-limit-gib", type=float, default=12.0, help="CPU address-space cap per case (0: none)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per case")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_case(json.loads(args.run_one))))
        return 0

    import torch

    models = args.only.split(",") if args.only else MODELS
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.batch_size:
        shape = (args.batch_size, *shape[1:])
    rows = []
    for model in models:
        cells = {"params": ""}
        name, kwargs = VARIANTS.get(model, (model, {}))
        for pass_ in args.passes.split(","):
            spec = {"model": name, "kwargs": kwargs, "shape": shape, "pass": pass_, "device": args.device,
                    "repeats": args.repeats, "warmup": 0 if args.no_warmup else 1, "mem_limit_gib": args.mem_limit_gib}
            result, error = run_in_subprocess(spec, args.timeout_s)
            if result is None:
                cells[pass_] = (error, "")
            else:
                cells["params"] = f"{result['params']:,}"
                delta = f" (+{result['delta_mib']:.0f})" if "delta_mib" in result else ""
                cells[pass_] = (f"{result['time_s']:.2f}", f"{result['peak_mib']:.0f}{delta}")
            print(f"{model} {pass_}: {cells[pass_]}", file=sys.stderr, flush=True)
        options = "".join(f", {k}={v}" for k, v in kwargs.items())
        rows.append((f"`{name}`{options}", cells))

    passes = args.passes.split(",")
    mem = "peak MiB (+ during call)" if args.device == "cpu" else "peak allocated MiB"
    header = (f"Hardware: {hardware(args.device)}; torch {torch.__version__}, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; device {args.device}, fp32; "
              f"B×T×C×H×W = {'×'.join(map(str, shape))}; {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"load average {os.getloadavg()[0]:.2f} at the end\n\n")
    cols = "".join(f" {p} time (s) | {p} {mem} |" for p in passes)
    table = (f"| model | parameters |{cols}\n|---|---:|" + "---:|---:|" * len(passes) + "\n"
             + "".join(f"| {m} | {c['params']} |" + "".join(f" {c[p][0]} | {c[p][1]} |" for p in passes) + "\n"
                       for m, c in rows))
    print("\n" + header + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
