"""Simulator speed: seconds per PASTIS patch / MTLCC tile-year, in memory and written to disk.

`python benchmarks/bench_simulator.py [--repeats 5]` prints a Markdown table (and writes it to
`--out FILE.md` if given). CPU seconds (process time) are reported beside wall-clock seconds
because the benchmark machine is shared.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from sitskit.simulate import simulate_mtlcc, simulate_mtlcc_tile, simulate_pastis, simulate_pastis_patch


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
    except Exception:  # noqa: BLE001 - informative only
        return platform.processor() or "unknown CPU"


def _time(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of `fn(k)` over `repeats` calls with different k."""
    walls, cpus, out = [], [], None
    for k in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn(k)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = ap.parse_args()
    rows = []
    simulate_pastis_patch(10000, size=32)  # warm-up (imports, FFT plans)
    for size, s1 in ((128, False), (128, True), (64, False)):
        wall, cpu, p = _time(lambda k, size=size, s1=s1: simulate_pastis_patch(10001 + k, size=size, with_s1=s1),
                             args.repeats)
        dates = f"{len(p.dates)}" + (f" + S1 {len(p.s1['S1A'][0])}/{len(p.s1['S1D'][0])}" if s1 else "")
        rows.append((f"PASTIS patch{' + S1' if s1 else ''}, in memory", f"{size}×{size}", dates, wall, cpu))
    with tempfile.TemporaryDirectory() as tmp:
        n = args.repeats
        wall, cpu, _ = _time(lambda k: simulate_pastis(Path(tmp) / f"p{k}", n_patches=4, size=128), 1)
        rows.append(("PASTIS writer (npy + json), per patch", "128×128", "38–61", wall / 4, cpu / 4))
        for size in (48, 24):
            wall, cpu, t = _time(lambda k, size=size: simulate_mtlcc_tile(k, 2017, size=size), n)
            rows.append(("MTLCC tile-year, in memory", f"{size}×{size}", f"{t.n_obs} (padded to {len(t.doy)})",
                         wall, cpu))
        wall, cpu, _ = _time(lambda k: simulate_mtlcc(Path(tmp) / f"m{k}", n_tiles=4, size=48), 1)
        rows.append(("MTLCC writer (gzip TFRecord), per tile-year", "48×48", "46 (padded)", wall / 8, cpu / 8))
    lines = [
        "## Simulator speed",
        "",
        (f"{_cpu_name()}, 2 cores shared with other jobs, single-threaded numpy (OMP_NUM_THREADS=1); "
         f"{dt.date.today().isoformat()}; `python benchmarks/bench_simulator.py` (median of {args.repeats})."),
        "",
        "| what | size (px) | dates | wall s | CPU s |",
        "|---|---|---|---:|---:|",
    ] + [f"| {a} | {b} | {c} | {w:.3f} | {u:.3f} |" for a, b, c, w, u in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
