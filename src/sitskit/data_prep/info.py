"""`python data_prep.py info FILE.h5`: a human summary of a converted dataset."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from sitskit.errors import UserFacingError

from .h5schema import missing_parts, open_sits


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def summarize(path: str | os.PathLike) -> str:
    """Patches per fold/split/year, classes with pixel counts, series lengths, bands, size on disk."""
    path = Path(path)
    with open_sits(path) as f:
        sats = [_s(s) for s in f.attrs["sats"]]
        missing = missing_parts(f, ("format_version", "class_names", "ignore_index",
                                    *[f"bands_{s}" for s in sats]),
                                ("height", "width", "class_pixels",
                                 *[f"n_dates_{s}" for s in sats]))
        if missing:
            raise UserFacingError(f"{path}: damaged sitskit file: missing {missing}")
        a = dict(f.attrs)
        idx = {k: f["index"][k][()] for k in f["index"]}
    lines = [(f"{path}  ({a['dataset']}, sitskit format v{a['format_version']}, "
              f"{path.stat().st_size / 2**20:.1f} MiB on disk)"),
             (f"source: {a.get('source_path', '?')}  converted {a.get('created_utc', '?')} "
              f"with sitskit {a.get('tool_version', '?')}"),
             f"patches: {len(idx['key'])}  size: "
             + ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(Counter(zip(idx['height'], idx['width'])).items()))]
    for field in ("fold", "split", "year"):
        if field not in idx:
            continue
        values = [_s(v) for v in idx[field]]
        if field == "fold" and a["dataset"] == "mtlcc" or field == "split" and a["dataset"] == "pastis":
            continue
        counts = Counter(values)
        lines.append(f"per {field}: " + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())))
    for sat in sats:
        t = idx[f"n_dates_{sat}"]
        bands = [_s(b) for b in a[f"bands_{sat}"]]
        lines.append(f"{sat}: {len(bands)} bands {' '.join(bands)}; dates per series min {t.min()} / "
                     f"median {int(np.median(t))} / max {t.max()}")
    pixels = idx["class_pixels"].sum(0)
    total = max(1, int(pixels.sum()))
    names = [_s(n) for n in a["class_names"]]
    extra = f" (original ids {a['class_original_ids'].tolist()})" if "class_original_ids" in a else ""
    lines.append(f"classes: {len(names)}, ignore index {a['ignore_index']}{extra}")
    for i, (name, n) in enumerate(zip(names, pixels)):
        lines.append(f"  {i:3d} {name:<30s} {int(n):>12,d} px  {100 * n / total:6.2f}%")
    return "\n".join(lines)
