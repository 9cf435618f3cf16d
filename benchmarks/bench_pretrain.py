"""Throughput and peak memory of one STCLN pre-training step (mask + forward + masked MSE + backward +
clip + AdamW), at the paper's configuration by default: batch 4, 32x32 crops, T = 50 dates, full STCLN
encoder (CNN 32->256, 3 Transformer layers of width 256), mask ratio 0.4 with vegetation gating.

    python benchmarks/bench_pretrain.py                       # CPU, fp32
    python benchmarks/bench_pretrain.py --device cuda --mixed-precision bf16 [--compile]
    python benchmarks/bench_pretrain.py --markdown   # a table row for benchmarks/RESULTS.md

Inputs are synthetic standardised series (throughput does not depend on the values); padding is
exercised by giving the last sample 10 % fewer dates.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from sitskit.constants import PASTIS_BANDS
from sitskit.models import build
from sitskit.pretrain.engine_pretrain import forward_loss
from sitskit.pretrain.masking import MaskGenerator, step_generator
from sitskit.tracking import cpu_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--dates", type=int, default=50)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--widths", type=int, nargs=2, default=(32, 256))
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--full-output", action="store_true",
                   help="compute every output (model.masked_only false) instead of the masked entries only")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is in the warm-up)")
    p.add_argument("--markdown", action="store_true", help="print one markdown table row")
    return p.parse_args(argv)


def synthetic_batch(b: int, t: int, c: int, size: int, device):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(b, t, c, size, size, generator=g)
    image[:, :, 6] += 1.5  # a vegetated NIR so that gating keeps most dates eligible
    dates = torch.sort(torch.randint(0, 365, (b, t), generator=g), dim=1).values
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[-1, int(t * 0.9):] = True
    image[pad] = 0
    return image.to(device), dates.to(device), pad.to(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    c = len(PASTIS_BANDS)
    model = build("stcln_pretrain", in_channels=c, encoder_kwargs={
        "widths": list(args.widths), "n_layers": args.layers, "d_ffn": 4 * args.widths[1]}).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    run = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    masker = MaskGenerator(0.4, "time-space", gating=True, ndvi_on="input", band_names=PASTIS_BANDS)
    image, dates, pad = synthetic_batch(args.batch_size, args.dates, c, args.crop, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")

    def step(i: int) -> None:
        mask, _ = masker(image, pad, step_generator(0, i, 0))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = forward_loss(run, image, dates, pad, mask, masked_only=not args.full_output)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    for i in range(args.warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(args.warmup + i)
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        hardware = torch.cuda.get_device_name(device)
    else:  # process peak RSS (Linux reports KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        hardware = f"{cpu_model()}, {torch.get_num_threads()} threads"
    precision = args.mixed_precision + (" + compile" if args.compile else "")
    result = {"hardware": hardware, "precision": precision, "batch": args.batch_size,
              "crop": args.crop, "dates": args.dates, "params_M": n_params / 1e6, "step_s": median,
              "samples_per_s": args.batch_size / median, "peak_MiB": peak,
              "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")}
    if args.markdown:
        print(f"| {hardware} | {precision} | {args.batch_size} | {args.crop}x{args.crop} | "
              f"{args.dates} | {n_params / 1e6:.2f} M | {median:.2f} | {result['samples_per_s']:.2f} | "
              f"{peak:.0f} | {result['load']:.1f} |")
    else:
        print(f"STCLN pre-training step on {hardware} ({precision}): batch {args.batch_size}, "
              f"{args.crop}x{args.crop}, T={args.dates}, {n_params / 1e6:.2f} M params\n"
              f"  median step {median:.3f} s over {args.steps} ({', '.join(f'{t:.2f}' for t in times)})\n"
              f"  {result['samples_per_s']:.2f} samples/s, peak memory {peak:.0f} MiB"
              f" ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'}), load avg {result['load']:.1f}")
    return result


if __name__ == "__main__":
    main()
