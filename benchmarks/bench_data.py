"""Data benchmark: size on disk and read rate, raw PASTIS npy folder vs the sitskit HDF5 file.

    python benchmarks/bench_data.py [--patches 40] [--size 128] [--work /tmp/sitskit_bench_data]
                                    [--out FILE.md]

(a) "raw npy": the reference loader's way (utae-paps PASTIS_Dataset.__getitem__): np.load of the whole
    S2 file, cast to float32, (x - mean) / std with fold statistics, the date vector and TARGET[0].
(b) our HDF5 Dataset (`build_dataset(..., task="semantic")`), same outputs.
(c) a random 32x32 crop from each: raw = load the whole file then slice; ours reads only the crop.
Each is read through a torch DataLoader (batch 4, pad_collate) with 0 and 2 worker processes, with the
files in the page cache (warm) and evicted from it before each epoch (cold, read from disk); samples/s is
the best of `--repeats` epochs after one untimed epoch.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sitskit.data import build_dataset, pad_collate
from sitskit.data_prep import convert_pastis
from sitskit.simulate import simulate_pastis


class RawPastis(Dataset):
    """The reference loader's reading pattern over the original npy folder (S2, semantic target)."""

    def __init__(self, root: Path, folds=None, crop: int | None = None, seed: int = 0):
        self.root, self.crop, self.seed = root, crop, seed
        meta = json.loads((root / "metadata.geojson").read_text())["features"]
        props = sorted((f["properties"] for f in meta), key=lambda p: p["ID_PATCH"])
        self.props = [p for p in props if folds is None or p["Fold"] in folds]
        norm = json.loads((root / "NORM_S2_patch.json").read_text())
        use = folds or [1, 2, 3, 4, 5]
        self.mean = np.mean([norm[f"Fold_{k}"]["mean"] for k in use], 0).astype(np.float32)
        self.std = np.mean([norm[f"Fold_{k}"]["std"] for k in use], 0).astype(np.float32)
        ref = dt.date(2018, 9, 1)
        self.dates = []
        for p in self.props:
            raw = p["dates-S2"]
            raw = json.loads(raw) if isinstance(raw, str) else raw
            self.dates.append(np.array([(dt.datetime.strptime(str(v), "%Y%m%d").date() - ref).days
                                        for v in raw.values()], dtype=np.int64))

    def __len__(self):
        return len(self.props)

    def __getitem__(self, i):
        pid = self.props[i]["ID_PATCH"]
        x = np.load(self.root / "DATA_S2" / f"S2_{pid}.npy").astype(np.float32)
        x = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        y = np.load(self.root / "ANNOTATIONS" / f"TARGET_{pid}.npy")[0].astype(np.int64)
        if self.crop:
            rng = np.random.default_rng([self.seed, i])
            r, c = rng.integers(x.shape[-2] - self.crop + 1), rng.integers(x.shape[-1] - self.crop + 1)
            x, y = x[..., r:r + self.crop, c:c + self.crop], y[r:r + self.crop, c:c + self.crop]
        return {"image": torch.from_numpy(np.ascontiguousarray(x)), "dates": torch.from_numpy(self.dates[i]),
                "semantic": torch.from_numpy(np.ascontiguousarray(y)), "id": str(pid)}


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the OS page cache (a cold read from disk), touching nothing else."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rate(ds, workers: int, repeats: int, cold_files: list[Path] | None = None) -> float:
    """Best samples/s over `repeats` epochs; worker start-up is excluded (persistent workers, one
    untimed epoch first) so that the rate is the steady state of a long training run. With
    `cold_files`, their pages are evicted from the page cache before every timed epoch."""
    loader = DataLoader(ds, batch_size=4, collate_fn=pad_collate, num_workers=workers,
                        persistent_workers=workers > 0)
    best = 0.0
    for epoch in range(repeats + 1):
        if cold_files:
            evict(cold_files)
        t0 = time.perf_counter()
        n = sum(len(b["id"]) for b in loader)
        if epoch:
            best = max(best, n / (time.perf_counter() - t0))
    return best


def du(paths) -> int:
    return sum(p.stat().st_size for root in paths for p in ([root] if root.is_file() else root.rglob("*"))
               if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=40)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sitskit_bench_data"))
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown tables to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = args.work / f"pastis_{args.patches}x{args.size}"
    if not root.exists():
        simulate_pastis(root, n_patches=args.patches, size=args.size, seed=0)
    h5s, convert_s = {}, {}
    for comp in ("zstd", "gzip"):
        h5s[comp] = args.work / f"pastis_{args.patches}x{args.size}_{comp}.h5"
        for workers in (0, 2):
            t0 = time.perf_counter()
            convert_pastis(root, h5s[comp], compression=comp, workers=workers, force=True)
            convert_s[comp, workers] = time.perf_counter() - t0
            print(f"convert ({comp}, {workers} workers): {convert_s[comp, workers]:.1f} s")

    raw_size = du([root / "DATA_S2", root / "ANNOTATIONS", root / "INSTANCE_ANNOTATIONS",
                   root / "metadata.geojson", root / "NORM_S2_patch.json"])
    sizes = {c: h5s[c].stat().st_size for c in h5s}
    # warm the page cache for every reader
    for p in root.rglob("*.npy"):
        p.read_bytes()
    for p in h5s.values():
        p.read_bytes()

    readers = {
        "(a) raw npy, full patch": lambda: RawPastis(root),
        "(b) HDF5 zstd, full patch": lambda: build_dataset(h5s["zstd"], task="semantic"),
        "(b') HDF5 gzip, full patch": lambda: build_dataset(h5s["gzip"], task="semantic"),
        "(c) raw npy, 32x32 crop": lambda: RawPastis(root, crop=32),
        "(c) HDF5 zstd, 32x32 crop": lambda: build_dataset(h5s["zstd"], task="semantic", crop=32),
    }
    raw_files = sorted(root.rglob("*.npy"))
    rows = []
    for name, make in readers.items():
        ds = make()
        files = raw_files if "raw" in name else [Path(ds.path)]
        rates = [rate(ds, 0, args.repeats), rate(ds, 2, args.repeats),
                 rate(ds, 0, args.repeats, files), rate(ds, 2, args.repeats, files)]
        rows.append((name, *rates))
        print(f"{name:<28s} warm {rates[0]:6.1f} / {rates[1]:6.1f}  cold {rates[2]:6.1f} / {rates[3]:6.1f} "
              "samples/s (0 / 2 workers)")

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line),
                 platform.processor())
    base = {r[0].split(",")[1].strip(): r for r in rows if r[0].startswith("(a)") or r[0].startswith("(c) raw")}
    lines = [
        "## Data: raw PASTIS npy folder vs sitskit HDF5",
        "",
        (f"{args.patches} simulated PASTIS patches {args.size}x{args.size} (S2 + annotations); "
         f"{os.cpu_count()}-core CPU ({model}), shared with other jobs; {dt.date.today().isoformat()}; "
         "`python benchmarks/bench_data.py`. DataLoader batch 4, best of "
         f"{args.repeats} epochs after one untimed epoch; load average during the run "
         f"{os.getloadavg()[0]:.1f} (other jobs share these cores, so rates vary between runs)."),
        "",
        "| storage | size on disk | vs raw | conversion, 0 / 2 workers |",
        "|---|---:|---:|---:|",
        (f"| raw npy folder (DATA_S2, ANNOTATIONS, INSTANCE_ANNOTATIONS, metadata) | {raw_size / 2**20:.1f} "
         "MiB | 1.00 | – |"),
    ]
    for comp, size in sizes.items():
        lines.append(f"| HDF5, shuffle + {comp} | {size / 2**20:.1f} MiB | {size / raw_size:.3f} | "
                     f"{convert_s[comp, 0]:.1f} s / {convert_s[comp, 2]:.1f} s |")
    lines += ["", ("Samples/s (higher is better). Warm: files in the page cache. Cold: the files' pages are "
                   "evicted (`posix_fadvise(DONTNEED)`) before each epoch, i.e. read from disk."), "",
              ("| reader | warm, 0 workers | warm, 2 workers | cold, 0 workers | cold, 2 workers "
               "| vs raw, warm 2 w | vs raw, cold 2 w |"),
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, *r in rows:
        ref = base["32x32 crop" if "crop" in name else "full patch"]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in r)
                     + f" | {r[1] / ref[2]:.2f} | {r[3] / ref[4]:.2f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
