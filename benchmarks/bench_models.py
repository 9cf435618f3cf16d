"""Speed and peak memory of the models at the paper's sizes.

    python benchmarks/bench_models.py                      # CPU, all cases (~5-10 min on 2 cores)
    python benchmarks/bench_models.py --quick              # tiny sizes, smoke test
    python benchmarks/bench_models.py --device cuda --bf16 --channels-last --compile
    python benchmarks/bench_models.py --only utae --out results.md

Every case runs in its own subprocess so that its peak memory is its own: on CPU the peak resident set
size (`ru_maxrss`) and its increase over the RSS measured just before the timed calls (model and
inputs already allocated); on CUDA `torch.cuda.max_memory_allocated`. Times are medians over
`repeats` calls after `warmup` calls. Forward = eval mode under `torch.inference_mode`; forward+backward
= train mode, loss = mean of the output, `backward()`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

CASES = [
    # name, model, build kwargs, (B, T, C, H, W), pass, repeats, warmup. Big cases run once: a full CPU
    # run must stay around 10 minutes on 2 cores.
    ("utae fwd 128²", "utae", {}, (2, 30, 10, 128, 128), "fwd", 2, 1),
    ("utae fwd+bwd 128²", "utae", {}, (2, 30, 10, 128, 128), "fwdbwd", 1, 1),
    ("utae reference-mode fwd 128²", "utae", {"mode": "reference"}, (2, 30, 10, 128, 128), "fwd", 1, 0),
    ("stcln_pretrain fwd+bwd 32² (pre-training crop)", "stcln_pretrain", {}, (4, 30, 10, 32, 32), "fwdbwd", 1, 0),
    ("stcln_pretrain fwd+bwd 32², grad_checkpointing", "stcln_pretrain",
     {"encoder_kwargs": {"grad_checkpointing": True}}, (4, 30, 10, 32, 32), "fwdbwd", 1, 0),
    ("stcln_pretrain fwd+bwd 32², 20 % padded dates", "stcln_pretrain", {}, (4, 30, 10, 32, 32), "fwdbwd", 1, 0),
    ("stcln fwd+bwd 32² (fine-tuning crop)", "stcln", {}, (2, 30, 10, 32, 32), "fwdbwd", 1, 0),
    ("stcln fwd 128² (test patch)", "stcln", {}, (1, 30, 10, 128, 128), "fwd", 1, 0),
    ("STA head chunked 128² T=4", "sta_head", {"chunk_size": 1024}, (1, 4, 256, 128, 128), "fwd", 1, 0),
    ("STA head naive N×N 128² T=4", "sta_head", {"chunk_size": 1 << 30}, (1, 4, 256, 128, 128), "fwd", 1, 0),
]
# padded dates at the end of sample i: i * step (0, 4, 8, 12 of 30 at B = 4), like a pad_collate batch
PAD_STEP = {"stcln_pretrain fwd+bwd 32², 20 % padded dates": 4}
QUICK_SHAPES = {"utae": (1, 4, 10, 32, 32), "stcln_pretrain": (1, 4, 10, 8, 8), "stcln": (1, 4, 10, 8, 8),
                "sta_head": (1, 2, 256, 16, 16)}


def rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(spec: dict) -> dict:
    """Executed in a fresh subprocess: build, time, measure memory, return a result dict."""
    import torch

    from sitskit.models import build
    from sitskit.models.sta_head import STAHead

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    b, t, c, h, w = spec["shape"]
    if spec["model"] == "sta_head":
        model = STAHead(256, 20, spec["kwargs"]["chunk_size"])
    else:
        kwargs = dict(spec["kwargs"], in_channels=c)
        model = build(spec["model"], **kwargs)
    model.to(device)
    if spec["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if spec["compile"]:
        model = torch.compile(model)
    x = torch.randn(b, t, c, h, w, device=device)
    dates = torch.sort(torch.randint(0, 365, (b, t), device=device), dim=1).values
    pad_mask = torch.zeros(b, t, dtype=torch.bool, device=device)
    for i in range(b):
        pad_mask[i, t - min(i * spec.get("pad_step", 0), t - 1):] = True

    if spec["model"] == "sta_head":
        inputs = (x, torch.randn_like(x), pad_mask)
    elif spec["model"] == "stcln_pretrain":
        inputs = (x, dates, pad_mask, torch.rand(b, t, h, w, device=device) < 0.4)
    else:
        inputs = (x, dates, pad_mask)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])

    def step():
        if spec["pass"] == "fwd":
            with torch.inference_mode(), autocast:
                out = model(*inputs)
        else:
            with autocast:
                out = model(*inputs)
            out = out[0] if isinstance(out, tuple) else out
            out.float().mean().backward()
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train(spec["pass"] == "fwdbwd")
    return time_step(step, spec["warmup"], spec["repeats"], device)


def time_step(step, warmup: int, repeats: int, device) -> dict:
    """Run `step` warmup times, then time `repeats` runs: {time_s (median), times, peak_mib, delta_mib (CPU:
    peak RSS increase over the RSS after the warm-up)}. Called in a fresh subprocess per case."""
    import torch

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_now_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"time_s": statistics.median(times), "times": times}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["peak_mib"], result["delta_mib"] = peak, peak - rss_before
    return result


def hardware(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    import os

    return f"{model}, {os.cpu_count()} logical CPUs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke test)")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this text")
    parser.add_argument("--out", default=None, help="write the markdown table to this file")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_case(json.loads(args.run_one))))
        return 0

    import torch
    from tqdm import tqdm

    cases = [case for case in CASES if args.only is None or args.only in case[0]]
    rows = []
    for name, model, kwargs, shape, pass_, repeats, warmup in tqdm(cases, desc="bench_models", unit="case"):
        spec = {"model": model, "kwargs": kwargs, "shape": QUICK_SHAPES[model] if args.quick else shape,
                "pad_step": PAD_STEP.get(name, 0), "pass": pass_, "repeats": 1 if args.quick else repeats,
                "warmup": 0 if args.quick else warmup,
                "device": args.device, "bf16": args.bf16, "channels_last": args.channels_last, "compile": args.compile}
        proc = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(spec)], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
            rows.append((name, spec, None, f"failed: {tail} (exit {proc.returncode})"))
        else:
            rows.append((name, spec, json.loads(proc.stdout.strip().splitlines()[-1]), ""))
        tqdm.write(_format_row(*rows[-1]))

    header = (f"Hardware: {hardware(args.device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"device {args.device}{', bf16 autocast' if args.bf16 else ''}"
              f"{', channels_last' if args.channels_last else ''}{', torch.compile' if args.compile else ''}; "
              f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC{' (--quick)' if args.quick else ''}\n\n")
    table = ("| case | B×T×C×H×W | pass | median time (s) | repeats | peak memory (MiB) | increase during calls (MiB) |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(_format_row(*row) for row in rows) + "\n")
    print("\n" + header + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + table)
    return 0


def _format_row(name, spec, result, error) -> str:
    shape = "×".join(map(str, spec["shape"]))
    if result is None:
        return f"| {name} | {shape} | {spec['pass']} | {error} | | | |"
    delta = f"{result['delta_mib']:.0f}" if "delta_mib" in result else "—"
    return (f"| {name} | {shape} | {spec['pass']} | {result['time_s']:.2f} | {spec['repeats']} | "
            f"{result['peak_mib']:.0f} | {delta} |")


if __name__ == "__main__":
    sys.exit(main())
