"""Accuracy and speed effect of bfloat16 autocast (CPU AVX-512-BF16/AMX, or CUDA) on simulated PASTIS patches.

    python benchmarks/bench_bf16.py [--h5 FILE.h5] [--train-steps 40] [--device cpu|cuda]

A U-TAE is first fitted briefly in fp32 (Adam, --train-steps steps on 32x32 crops) so that its predictions
are not constant, then every patch of the file is predicted in fp32 and under
`torch.autocast(device, dtype=torch.bfloat16)`: argmax agreement, max |Δ logit|, overall accuracy and
mIoU (classes present in the labels, void 19 ignored) against the simulated labels for both, and the
time of each forward (interleaved). The STCLN classifier is compared the same way with untrained weights
(gate 0.5), which is a harsher test: its logits are not separated by training.
Without --h5 a 12-patch file is simulated under /tmp/sitskit_bench_bf16.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sitskit.data import build_dataset, pad_collate
from sitskit.data_prep import convert_pastis
from sitskit.models import build
from sitskit.simulate import simulate_pastis


def miou_oa(pred: torch.Tensor, target: torch.Tensor, k: int = 20, void: int = 19) -> tuple[float, float]:
    keep = target != void
    p, t = pred[keep], target[keep]
    ious = []
    for c in torch.unique(t).tolist():
        inter = ((p == c) & (t == c)).sum().item()
        union = ((p == c) | (t == c)).sum().item()
        ious.append(inter / union)
    return sum(ious) / len(ious), (p == t).float().mean().item()


def centre(batch: dict, size: int) -> dict:
    h = batch["image"].shape[-1]
    a = (h - size) // 2
    batch["image"] = batch["image"][..., a:a + size, a:a + size].contiguous()
    batch["semantic"] = batch["semantic"][..., a:a + size, a:a + size].contiguous()
    return batch


def compare(model, batches, device, label: str) -> None:
    model.eval()
    agree = n = 0
    max_delta = 0.0
    preds = {"fp32": [], "bf16": []}
    times = {"fp32": [], "bf16": []}
    targets = []
    for batch in batches:
        x, dates, pad = batch["image"].to(device), batch["dates"].to(device), batch["pad_mask"].to(device)
        out = {}
        for name in ("fp32", "bf16") if len(times["fp32"]) % 2 == 0 else ("bf16", "fp32"):
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
                out[name] = model(x, dates, pad).float()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
        max_delta = max(max_delta, (out["fp32"] - out["bf16"]).abs().max().item())
        a, b = out["fp32"].argmax(1), out["bf16"].argmax(1)
        agree += (a == b).sum().item()
        n += a.numel()
        preds["fp32"].append(a.cpu()), preds["bf16"].append(b.cpu()), targets.append(batch["semantic"])
    target = torch.cat(targets)
    m32, oa32 = miou_oa(torch.cat(preds["fp32"]), target)
    m16, oa16 = miou_oa(torch.cat(preds["bf16"]), target)
    speed = statistics.median(times["fp32"]) / statistics.median(times["bf16"])
    print(f"| {label} | {100 * agree / n:.2f} % | {max_delta:.3f} | {100 * oa32:.2f} / {100 * oa16:.2f} | "
          f"{100 * m32:.2f} / {100 * m16:.2f} ({100 * (m16 - m32):+.2f}) | {speed:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--h5", type=Path, default=None)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--size", type=int, default=64, help="centre crop of each patch used for the comparison")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-stcln", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    h5 = args.h5
    if h5 is None:
        work = Path("/tmp/sitskit_bench_bf16")
        h5 = work / "pastis12.h5"
        if not h5.exists():
            workers = min(8, os.cpu_count() or 1)
            simulate_pastis(work / "raw", n_patches=12, size=128, seed=1, workers=workers)
            convert_pastis(work / "raw", h5, workers=workers)
    torch.manual_seed(0)
    train = build_dataset(h5, task="semantic", crop=32, seed=0)
    test = build_dataset(h5, task="semantic")
    batches = [centre(pad_collate([test[i], test[i + 1]]), args.size) for i in range(0, len(test) - 1, 2)]
    model = build("utae").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(args.train_steps):
        b = pad_collate([train[(2 * step + j) % len(train)] for j in range(2)])
        loss = F.cross_entropy(model(b["image"].to(device), b["dates"].to(device), b["pad_mask"].to(device)),
                               b["semantic"].to(device), ignore_index=19)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, load {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; U-TAE fitted {args.train_steps} steps "
          f"(last loss {loss.item():.3f}); {len(test)} patches, centre {args.size}x{args.size}\n")
    print("| model | argmax agreement | max abs Δ logit | OA fp32 / bf16 | mIoU fp32 / bf16 (Δ) | fp32 time / bf16 time |")
    print("|---|---:|---:|---:|---:|---:|")
    compare(model, batches, device, f"U-TAE, fitted {args.train_steps} steps")
    if not args.skip_stcln:
        stcln = build("stcln").to(device)
        with torch.no_grad():
            stcln.head.gate.fill_(0.5)
        compare(stcln, batches, device, "STCLN classifier, untrained (gate 0.5)")


if __name__ == "__main__":
    main()
