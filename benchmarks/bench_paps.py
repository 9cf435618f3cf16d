"""U-TAE+PaPs inference speed on CPU: an untrained head vs a "trained-like" head (few confident centres).

    OMP_NUM_THREADS=2 python benchmarks/bench_paps.py              # default: B=1, T=30, 128x128, 3 repeats
    python benchmarks/bench_paps.py --dates 8 --repeats 1          # quicker
    python benchmarks/bench_paps.py --device cuda

The cost of PaPs after the encoder grows with the number of centres. An untrained heatmap (BatchNorm at its
initial statistics, values around 0.5) has thousands of local maxima above its mean; a trained one has about
one per parcel. "Trained-like" = the default U-TAE+PaPs whose heatmap logits are replaced by -10 everywhere
plus +10 at `--peaks` random pixels (one per "parcel"), whose size head outputs 12 x 12 boxes and whose
masks are confident, so the masks, the mask CNN and the pseudo-NMS work on realistic boxes. Reported: full forward (encoder + PaPs) and
PaPs alone (on precomputed decoder maps), median over `--repeats` after one warm-up call, eval mode under
`torch.inference_mode`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time

import torch
from torch import nn

from sitskit.models import build


class PeakedHeatmapLogits(nn.Module):
    """Replaces the heatmap logits by -10 everywhere and +10 at fixed pixels (trained-like centres)."""

    def __init__(self, h: int, w: int, peaks: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        logits = torch.full((1, 1, h, w), -10.0)
        flat = torch.randperm(h * w, generator=g)[:peaks]
        logits.view(-1)[flat] = 10.0
        self.register_buffer("logits", logits)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(out.shape[0], -1, -1, -1)


def make_trained_like(model: nn.Module, h: int, w: int, peaks: int | None) -> nn.Module:
    """peaks=None keeps the untrained heatmap (thousands of centres) but gives it the confident 12x12 masks."""
    if peaks is not None:
        model.heatmap_conv[0] = PeakedHeatmapLogits(h, w, peaks)
    last = model.size_mlp[6]
    nn.init.zeros_(last.weight)
    nn.init.constant_(last.bias, 12.0)  # softplus(12) ~ 12 px boxes
    # confident masks (sigmoid factors near 1), so the pseudo-NMS pastes and resolves overlapping boxes
    nn.init.constant_(model.saliency_conv.conv[4].bias, 5.0)
    nn.init.constant_(model.shape_mlp[3].bias, 5.0)
    nn.init.constant_(model.mask_cnn[5].bias, 5.0)
    return model


def median_time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(args) -> list[dict]:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.dates, 10, args.size, args.size, device=device)
    dates = (torch.arange(args.dates, device=device) * 10)[None].repeat(args.batch, 1)
    cases = [("untrained, max_centres=512 (default)", {"max_centres": 512}, False),
             ("untrained, no cap", {"max_centres": None}, False),
             (f"trained-like ({args.peaks} centres/patch)", {}, True),
             ("worst case: untrained heatmap, no cap, confident 12x12 masks", {"max_centres": None}, "masks")]
    rows = []
    for name, kwargs, trained in cases:
        model = build("utae_paps", **kwargs)
        if trained:
            make_trained_like(model, args.size, args.size, None if trained == "masks" else args.peaks)
        model = model.to(device).eval()
        with torch.inference_mode():
            out, maps = model.features(x, dates, None)
            heads = {}

            def run_heads(model=model, out=out, maps=maps, heads=heads):
                heat_logits = model.heatmap_conv[0](out)
                res = {"heatmap": model.heatmap_conv[1](heat_logits), "saliency": model.saliency_conv(out)}
                det = model.predict_centres(maps, res, model.detect_centres(res["heatmap"][:, 0]))
                heads["n"] = det["centres"].shape[0]
                heads["pano"] = model.combine(det, x.shape[0], *x.shape[-2:])

            t_heads = median_time(run_heads, args.repeats, sync)
            t_full = median_time(lambda model=model: model(x, dates), args.repeats, sync)
        n_inst = sum(int(s.numel()) for s in heads["pano"]["instance_score"])
        rows.append({"case": name, "centres": heads["n"] / args.batch, "instances": n_inst / args.batch,
                     "full_s": t_full, "heads_s": t_heads, "patches_per_s": args.batch / t_full})
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], args) -> str:
    header = (f"B={args.batch}, T={args.dates}, {args.size}x{args.size}, device {args.device}, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
              f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    lines = [header, "",
             "| case | centres / patch | instances / patch | forward s / batch | PaPs only s / batch | patches/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['centres']:.0f} | {r['instances']:.0f} | {r['full_s']:.2f} | "
                     f"{r['heads_s']:.3f} | {r['patches_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dates", type=int, default=30)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--peaks", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(markdown(bench(args), args))


if __name__ == "__main__":
    main()
