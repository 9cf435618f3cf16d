"""fp32 CPU matrix products of the STCLN Transformer: torch's default kernel (MKL) vs oneDNN.

    OMP_NUM_THREADS=1 python benchmarks/bench_matmul.py [--rows 30720] [--repeats 7]

`SITSKIT_CPU_MATMUL=auto` sends these products to oneDNN on AMD AVX-512 CPUs only (src/sitskit/models/
cpu_matmul.py; docs/models.md, "Performance"). This script measures both kernels on this CPU for the
Transformer's shapes (d_model 256, FFN 1024, fused q/k/v 768), forward product and input gradient, each
timed alternately (median of the repeats), and prints a Markdown table of GFLOP/s. `--rows` is the number
of pixel-dates (tokens) in one product: 30,720 = one 32² crop × 30 dates.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import sitskit  # noqa: F401  (huge pages, as every sitskit process)
from sitskit.tracking import cpu_model

# (name, K, N): y[M, N] = x[M, K] @ W[N, K]^T
SHAPES = (
    ("q/k/v in-projection", 256, 768),
    ("attention out-projection", 256, 256),
    ("FFN 256 -> 1024", 256, 1024),
    ("FFN 1024 -> 256", 1024, 256),
)


def _onednn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _time(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=30_720)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{cpu_model()}, torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, M = {args.rows} rows, median of {args.repeats}\n")
    print("| product | shape | MKL (F.linear) GFLOP/s | oneDNN GFLOP/s | oneDNN / MKL | max rel Δ |")
    print("|---|---|---:|---:|---:|---:|")
    for name, k, n in SHAPES:
        for what, (a, b) in (("forward", (torch.randn(args.rows, k), torch.randn(n, k))),
                             ("input gradient", (torch.randn(args.rows, n), torch.randn(n, k).t()))):
            # input gradient: grad_x[M, K] = grad_y[M, N] @ W[N, K] = grad_y @ (W^T)^T, W^T a transposed view
            ref, ours = F.linear(a, b), _onednn(a, b)
            rel = ((ref - ours).abs().max() / ref.abs().max()).item()
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[0]
            t_mkl, t_dnn = [], []
            for rep in range(args.repeats + 1):
                pair = ((t_mkl, F.linear), (t_dnn, _onednn)) if rep % 2 else ((t_dnn, _onednn), (t_mkl, F.linear))
                for times, fn in pair:
                    dt = _time(fn, a, b)
                    if rep:  # the first round warms both kernels up
                        times.append(dt)
            g_mkl = flops / statistics.median(t_mkl) / 1e9
            g_dnn = flops / statistics.median(t_dnn) / 1e9
            print(f"| {name}, {what} | {a.shape[0]}×{a.shape[1]} · {b.shape[1]}×{b.shape[0]} | {g_mkl:.0f} | "
                  f"{g_dnn:.0f} | {g_dnn / g_mkl:.2f} | {rel:.1e} |")


if __name__ == "__main__":
    main()
