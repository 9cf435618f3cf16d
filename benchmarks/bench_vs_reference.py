"""sitskit vs same-run transcriptions of the reference code (benchmarks/reference_utae.py, reference_stcln.py).

    OMP_NUM_THREADS=2 python benchmarks/bench_vs_reference.py                 # all cases, CPU fp32
    python benchmarks/bench_vs_reference.py --only utae-train --repeats 5
    python benchmarks/bench_vs_reference.py --device cuda [--bf16] [--compile]
    python benchmarks/bench_vs_reference.py --memory                          # peak RSS per case, subprocesses

Same weights and inputs for both. Times are interleaved in one process (reference and sitskit
alternately, the order flipped every repetition) and the ratio is the median of the per-repetition
ratios, so that a machine shared with other jobs slows both alike. The load average is printed beside
every number. Before timing, each case checks that the outputs agree (eval mode, max |Δ|). Importing sitskit
turns on torch's transparent huge pages for this process (THP_MEM_ALLOC_ENABLE=1, src/sitskit/__init__.py),
so both implementations run with them; `THP_MEM_ALLOC_ENABLE=0 python benchmarks/bench_vs_reference.py`
measures both without.

Cases (sizes can be changed with --utae-size / --stcln-size / --dates / --batch):
- utae-train:     U-TAE train step (forward, cross-entropy, backward, Adam), B x T x 10 x S x S
- utae-eval:      U-TAE forward under inference_mode
- stcln-pretrain: STCLN pre-training step (mask draw with vegetation gating, forward, masked MSE,
                  backward, clip 5, Adam), 32 x 32 crops; the last sample has 10 % padded dates
- stcln-eval:     STCLN classifier (encoder + STA head) forward on one S x S patch
sitskit's U-TAE runs in mode="reference" (NHWC on AVX-512 CPUs, its default; --nchw / --nhwc force one) and its STCLN with
positions="index", the numerics of the reference, so that outputs can be compared; the clean modes cost
the same.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_stcln import ReferenceSTCLNClassifier, ReferenceSTCLNPretrain, copy_weights
from reference_utae import ReferenceUTAE

from sitskit.constants import PASTIS_BANDS
from sitskit.models import build
from sitskit.pretrain.engine_pretrain import forward_loss
from sitskit.pretrain.masking import MaskGenerator, step_generator

CASES = ("utae-train", "utae-eval", "stcln-pretrain", "stcln-eval")


def series(b, t, c, s, device, pad_last=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, s, s, generator=g)
    x[:, :, 6] += 1.5  # vegetated NIR: gating keeps most dates eligible
    dates = torch.sort(torch.randint(0, 365, (b, t), generator=g), dim=1).values
    pad = torch.zeros(b, t, dtype=torch.bool)
    if pad_last:
        pad[-1, t - int(t * pad_last):] = True
    x[pad] = 0
    dates[pad] = 0
    return x.to(device), dates.to(device), pad.to(device)


def make_case(name: str, args, device):
    """-> (ref_step, our_step, check) closures; check() returns max |Δ| of the outputs in eval mode."""
    torch.manual_seed(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    if name.startswith("utae"):
        layout = False if args.nchw else True if getattr(args, "nhwc", False) else None
        ours = build("utae", mode="reference", channels_last=layout).to(device)
        ref = ReferenceUTAE().to(device)
        ref.load_state_dict(ours.state_dict(), strict=True)
        x, dates, pad = series(args.batch, args.dates, 10, args.utae_size, device, pad_last=0.1)
        run = torch.compile(ours) if args.compile else ours

        def check():
            ours.eval(), ref.eval()
            with torch.inference_mode():
                return (run(x, dates, pad) - ref(x, dates.float())).abs().max().item()

        if name == "utae-eval":
            def fwd(model, *inputs):
                def step():
                    model.eval()
                    with torch.inference_mode(), amp:
                        model(*inputs)
                return step
            return fwd(ref, x, dates.float()), fwd(run, x, dates, pad), check
        target = torch.randint(0, 20, (x.shape[0], *x.shape[-2:]), device=device)

        def train(model, params, *inputs):
            opt = torch.optim.Adam(params, lr=1e-3)

            def step():
                model.train()
                with amp:
                    loss = F.cross_entropy(model(*inputs).float(), target)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        return (train(ref, ref.parameters(), x, dates.float()), train(run, ours.parameters(), x, dates, pad),
                check)

    kw = {"widths": [32, 256], "n_layers": 3, "d_ffn": 1024}
    if name == "stcln-pretrain":
        ours = build("stcln_pretrain", positions="index", encoder_kwargs=kw).to(device)
        ref = ReferenceSTCLNPretrain(widths=(32, 256), n_layers=3, d_ffn=1024).to(device)
        copy_weights(ours, ref)
        x, dates, pad = series(args.batch * 2, args.dates, 10, 32, device, pad_last=0.1)
        masker = MaskGenerator(0.4, "time-space", gating=True, ndvi_on="input", band_names=PASTIS_BANDS)
        run = torch.compile(ours) if args.compile else ours

        def check():
            ours.eval(), ref.eval()
            xs, ds = x[:-1], dates[:-1]  # the reference has no padding mask: compare unpadded samples
            mask, _ = masker(xs, None, step_generator(0, 0, 0))
            with torch.inference_mode():
                return (run(xs, ds, None, mask) - ref(xs, (~mask).float())).abs().max().item()

        def ref_step_factory():
            opt = torch.optim.Adam(ref.parameters(), lr=1e-4)

            def step():
                ref.train()
                m = ref.draw_mask(x)
                with amp:
                    pred = ref(x, m)
                loss = ref.loss(pred.float(), x, m)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 5.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        def our_step_factory():
            opt = torch.optim.Adam(ours.parameters(), lr=1e-4)
            counter = iter(range(10**9))

            def step():
                ours.train()
                mask, _ = masker(x, pad, step_generator(0, next(counter), 0))
                with amp:  # masked_only: the pre-training default (model.masked_only), same loss and gradients
                    loss, _ = forward_loss(run, x, dates, pad, mask, masked_only=not args.full_output)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ours.parameters(), 5.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        return ref_step_factory(), our_step_factory(), check

    # stcln-eval
    ours = build("stcln", positions="index", encoder_kwargs=kw).to(device)
    with torch.no_grad():
        ours.head.gate.fill_(0.5)  # a trained-like gate: the attention term counts
    ref = ReferenceSTCLNClassifier(widths=(32, 256), n_layers=3, d_ffn=1024).to(device)
    copy_weights(ours, ref)
    x, dates, _ = series(1, args.dates, 10, args.stcln_size, device)
    run = torch.compile(ours) if args.compile else ours

    def fwd(model, *inputs):
        def step():
            model.eval()
            with torch.inference_mode(), amp:
                return model(*inputs)
        return step
    ref_fwd, our_fwd = fwd(ref, x), fwd(run, x, dates)
    return ref_fwd, our_fwd, lambda: (our_fwd() - ref_fwd()).abs().max().item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device) -> float:
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def run_interleaved(name, args, device) -> dict:
    ref_step, our_step, check = make_case(name, args, device)
    t0 = time.perf_counter()
    delta = check()
    first_s = time.perf_counter() - t0  # includes torch.compile's compile time when --compile
    print(f"{name}: outputs max |Δ| = {delta:.2e} (check {first_s:.1f} s)", flush=True)
    for _ in range(args.warmup):
        ref_step(), our_step()
    ref_t, our_t, ratios, loads = [], [], [], []
    for r in range(args.repeats):
        order = ((ref_t, ref_step), (our_t, our_step)) if r % 2 == 0 else ((our_t, our_step), (ref_t, ref_step))
        for times, step in order:
            times.append(timed(step, device))
        ratios.append(ref_t[-1] / our_t[-1])
        loads.append(os.getloadavg()[0])
        print(f"  rep {r}: reference {ref_t[-1]:.2f} s, sitskit {our_t[-1]:.2f} s, ratio {ratios[-1]:.2f}, "
              f"load {loads[-1]:.1f}", flush=True)
    return {"case": name, "delta": delta, "ref_s": statistics.median(ref_t), "ours_s": statistics.median(our_t),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "load": (min(loads), max(loads)), "first_call_s": first_s}


def peak_rss(name, impl, args) -> float:
    """Peak RSS increase (MiB) of one warm-up + one timed step of `impl` in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--memory-one", json.dumps({"case": name, "impl": impl, **vars(args)})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def memory_one(spec: dict) -> None:
    args = argparse.Namespace(**spec)
    device = torch.device(args.device)
    ref_step, our_step, _ = make_case(spec["case"], args, device)
    step = ref_step if spec["impl"] == "reference" else our_step
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    step()
    step()
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child started by the (large) timing
    # process would report the parent's peak
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(peak - before)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=CASES, default=list(CASES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=2, help="U-TAE batch; STCLN pre-training uses 2x this")
    p.add_argument("--dates", type=int, default=30)
    p.add_argument("--utae-size", type=int, default=128)
    p.add_argument("--stcln-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both")
    p.add_argument("--compile", action="store_true", help="torch.compile sitskit's model")
    p.add_argument("--nchw", action="store_true",
                   help="sitskit's U-TAE with channels_last=False (default: NHWC on AVX-512 CPUs)")
    p.add_argument("--nhwc", action="store_true", help="sitskit's U-TAE with channels_last=True on any CPU")
    p.add_argument("--full-output", action="store_true",
                   help="STCLN pre-training computes every output (model.masked_only false), as the reference")
    p.add_argument("--memory", action="store_true", help="also measure the peak RSS increase per case")
    p.add_argument("--memory-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_one:
        memory_one(json.loads(args.memory_one))
        return
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"bf16={args.bf16}, compile={args.compile}, nchw={args.nchw}, nhwc={args.nhwc}, "
          f"full_output={args.full_output}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')} "
          f"(both implementations), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    for name in args.only:
        res = run_interleaved(name, args, device)
        if args.memory and device.type == "cpu":
            spec = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "memory_one"})
            res["mem_ref"], res["mem_ours"] = peak_rss(name, "reference", spec), peak_rss(name, "ours", spec)
        rows.append(res)
    print("\n| case | reference s | sitskit s | ratio (median, min–max) | max abs Δ | load | peak RSS +MiB ref / ours |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = f"{r['mem_ref']:.0f} / {r['mem_ours']:.0f}" if "mem_ref" in r else "–"
        print(f"| {r['case']} | {r['ref_s']:.2f} | {r['ours_s']:.2f} | **{r['ratio']:.2f}** "
              f"({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {r['delta']:.1e} | "
              f"{r['load'][0]:.1f}–{r['load'][1]:.1f} | {mem} |")


if __name__ == "__main__":
    main()
