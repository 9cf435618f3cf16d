"""Read rate through a DataLoader: raw PASTIS npy (the reference loader's way, private-memory collate)
vs the sitskit HDF5 file with `pad_collate` (which writes the batch straight into shared memory in a
worker) and with the previous private-memory collate, full patches and 32x32 crops, interleaved.

    python benchmarks/bench_collate.py [--patches 24] [--workers 2] [--repeats 3] [--work /tmp/sitskit_bench_collate]

Files are in the page cache (warm). Each reader keeps persistent workers; every repetition times one
epoch of each full-patch reader and four of each crop reader in turn, and the ratios are medians over
repetitions of per-repetition ratios. The HDF5 file is converted once into --work: delete it after a change
to the writer.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import RawPastis

from sitskit.data import build_dataset, pad_collate
from sitskit.data_prep import convert_pastis
from sitskit.simulate import simulate_pastis


def private_pad_collate(samples: list[dict]) -> dict:
    """The collate before the shared-memory change (and the reference's): batch built in private memory,
    which the DataLoader then copies into shared memory to send it to the main process."""
    lengths = [len(s["dates"]) for s in samples]
    t_max = max(lengths)
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], str):
            batch[key] = values
        elif key in ("image", "dates", "doy"):
            padded = values[0].new_zeros((len(values), t_max, *values[0].shape[1:]))
            for i, v in enumerate(values):
                padded[i, : v.shape[0]] = v
            batch[key] = padded
        else:
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
    batch["pad_mask"] = torch.arange(t_max)[None, :] >= torch.tensor(lengths)[:, None]
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sitskit_bench_collate"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = args.work / f"pastis_{args.patches}"
    if not root.exists():
        simulate_pastis(root, n_patches=args.patches, size=128, seed=0)
    h5 = args.work / f"pastis_{args.patches}.h5"
    if not h5.exists():
        convert_pastis(root, h5, workers=0)
    for p in [*root.rglob("*.npy"), h5]:
        p.read_bytes()  # warm the page cache

    def loader(ds, collate):
        return DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=args.workers,
                          persistent_workers=args.workers > 0)

    readers = {
        "raw npy, full patch": loader(RawPastis(root), private_pad_collate),
        "HDF5, full patch, private collate": loader(build_dataset(h5, task="semantic"), private_pad_collate),
        "HDF5, full patch, pad_collate (shared)": loader(build_dataset(h5, task="semantic"), pad_collate),
        "raw npy, 32x32 crop": loader(RawPastis(root, crop=32), private_pad_collate),
        "HDF5, 32x32 crop, private collate": loader(build_dataset(h5, task="semantic", crop=32), private_pad_collate),
        "HDF5, 32x32 crop, pad_collate (shared)": loader(build_dataset(h5, task="semantic", crop=32), pad_collate),
    }
    rates: dict[str, list[float]] = {name: [] for name in readers}
    loads = []
    for rep in range(args.repeats + 1):  # the first epoch starts the workers: untimed
        for name, dl in readers.items():
            t0 = time.perf_counter()
            # a crop epoch takes ~0.2 s: time 4 of them, so that the timing is not the loader's start-up
            n = sum(len(b["id"]) for _ in range(4 if "crop" in name else 1) for b in dl)
            if rep:
                rates[name].append(n / (time.perf_counter() - t0))
        if rep:
            loads.append(os.getloadavg()[0])
    print(f"{args.patches} patches 128x128, batch 4, {args.workers} workers, warm, {args.repeats} repetitions, "
          f"load {min(loads):.1f}–{max(loads):.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| reader | samples/s (median) | vs raw npy (median of per-repetition ratios) |\n|---|---:|---:|")
    for name, r in rates.items():
        base = rates["raw npy, " + ("32x32 crop" if "crop" in name else "full patch")]
        ratio = statistics.median(a / b for a, b in zip(r, base))
        print(f"| {name} | {statistics.median(r):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
