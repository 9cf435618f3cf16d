"""`data_prep.py show DIR --patch ID --out F.png`: one figure of a PASTIS patch or an MTLCC tile.

Top row: true-colour RGB at four dates spread over the series. Bottom row: NDVI curves of a few parcels
(one per class, the largest), the semantic labels with class colours, and the instances (PASTIS) or
connected label regions (MTLCC, which has no instance annotation). Reads the files as written on disk,
so it works on the real datasets too.
"""
from __future__ import annotations

import configparser
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from scipy import ndimage

from sitskit.constants import MTLCC_CLASSES, MTLCC_ORIGINAL_IDS, PASTIS_BANDS, PASTIS_CLASSES, PASTIS_COLORS
from sitskit.errors import UserFacingError
from sitskit.viz import true_color


@dataclass
class View:
    """What the figure needs, in a format-independent form."""

    title: str
    dates: list[dt.date]
    rgb: np.ndarray        # [T, H, W, 3] float 0..1
    ndvi: np.ndarray       # [T, H, W]
    labels: np.ndarray     # [H, W] contiguous class index into names/colours
    names: list[str]
    colors: np.ndarray     # [K, 3] 0..1
    instances: np.ndarray  # [H, W] int, 0 = none
    instance_title: str
    ignore: set[int]       # label indices not used for NDVI curves (background, void, unknown)


def _ndvi(nir, red) -> np.ndarray:
    nir, red = nir.astype(np.float32), red.astype(np.float32)
    return (nir - red) / np.maximum(nir + red, 1.0)


def _npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as exc:
        raise UserFacingError(f"{path}: cannot read it as a .npy array ({exc})") from None


def _load_pastis(root: Path, patch: int | str) -> View:
    meta = json.loads((root / "metadata.geojson").read_text())
    feats = {int(f["properties"]["ID_PATCH"]): f["properties"] for f in meta["features"]}
    if patch == "first" and feats:
        patch = min(feats)
    if patch not in feats:
        some = ", ".join(str(i) for i in sorted(feats)[:8])
        raise UserFacingError(f"--patch {patch}: not in {root / 'metadata.geojson'} (ids: {some}, …)")
    props = feats[patch]
    dates = props["dates-S2"]
    dates = json.loads(dates) if isinstance(dates, str) else dates
    dates = [dt.datetime.strptime(str(dates[k]), "%Y%m%d").date() for k in sorted(dates, key=int)]
    s2 = _npy(root / "DATA_S2" / f"S2_{patch}.npy", mmap=True)
    b = {name: i for i, name in enumerate(PASTIS_BANDS)}
    x = np.asarray(s2)
    target = _npy(root / "ANNOTATIONS" / f"TARGET_{patch}.npy")
    inst_path = root / "INSTANCE_ANNOTATIONS" / f"INSTANCES_{patch}.npy"
    inst = _npy(inst_path) if inst_path.exists() else np.zeros(target.shape[1:], np.int64)
    return View(title=f"PASTIS patch {patch} ({props.get('TILE', '?')}, fold {props.get('Fold', '?')}), "
                      f"{len(dates)} dates",
                dates=dates, rgb=true_color(x[:, b["B4"]], x[:, b["B3"]], x[:, b["B2"]]),
                ndvi=_ndvi(x[:, b["B8"]], x[:, b["B4"]]), labels=target[0].astype(np.int64),
                names=PASTIS_CLASSES, colors=np.array(PASTIS_COLORS) / 255.0, instances=inst,
                instance_title="instances (INSTANCES)", ignore={0, 19})


def _mtlcc_folder(root: Path) -> Path:
    if (root / "dataset.ini").exists():
        return root
    for name in ("480", "240"):
        if (root / name / "dataset.ini").exists():
            return root / name
    raise UserFacingError(f"{root}: neither a PASTIS directory (metadata.geojson) nor an MTLCC one "
                          f"(dataset.ini in {root}, {root / '480'} or {root / '240'})")


def _load_mtlcc(root: Path, tile: int | str, year: int | None) -> View:
    from sitskit.formats.mtlcc_record import decode_mtlcc_example
    from sitskit.formats.tfrecord import TFRecordError, read_tfrecord

    folder = _mtlcc_folder(root)
    ini = configparser.ConfigParser()
    ini.read(folder / "dataset.ini")
    years = [int(s) for s in ini.sections()]
    year = years[0] if year is None and years else year
    if year not in years:
        raise UserFacingError(f"--year {year}: {folder / 'dataset.ini'} has years {years}")
    datadir = folder / ini[str(year)].get("datadir", f"data{year % 100:02d}")
    if tile == "first":
        stems = sorted(int(p.name.split(".")[0]) for p in datadir.glob("*.tfrecord.gz")
                       if p.name.split(".")[0].isdigit())
        if not stems:
            raise UserFacingError(f"{datadir}: no <tileid>.tfrecord.gz files")
        tile = stems[0]
    path = datadir / f"{tile}.tfrecord.gz"
    if not path.exists():
        raise UserFacingError(f"--patch {tile}: no tile file {path}")
    try:
        ex = decode_mtlcc_example(next(iter(read_tfrecord(path))), where=str(path))
    except (TFRecordError, StopIteration) as exc:
        raise UserFacingError(f"{path}: cannot read the tile ({exc or 'empty file'})") from None
    valid = ex["doy"] > 0
    x10 = ex["x10"][valid]  # [T, H, W, 4] = B4, B3, B2, B8
    dates = [dt.date(year, 1, 1) + dt.timedelta(days=int(d) - 1) for d in ex["doy"][valid]]
    lut = np.zeros(max(MTLCC_ORIGINAL_IDS) + 1, np.int64)
    lut[MTLCC_ORIGINAL_IDS] = np.arange(len(MTLCC_ORIGINAL_IDS))
    labels = lut[np.clip(ex["labels"][0], 0, len(lut) - 1)]
    # No instance annotation in MTLCC: connected regions of equal label stand in for fields.
    regions = np.zeros_like(labels)
    offset = 0
    for k in np.unique(labels[labels > 0]):
        lab, n = ndimage.label(labels == k)
        regions[lab > 0] = lab[lab > 0] + offset
        offset += n
    cmap = plt.get_cmap("tab20")
    colors = np.array([(0.0, 0.0, 0.0)] + [cmap(i % 20)[:3] for i in range(len(MTLCC_ORIGINAL_IDS) - 1)])
    return View(title=f"MTLCC tile {tile}, {year} ({len(dates)} observations, L1C TOA)", dates=dates,
                rgb=true_color(x10[..., 0], x10[..., 1], x10[..., 2]), ndvi=_ndvi(x10[..., 3], x10[..., 0]),
                labels=labels, names=[MTLCC_CLASSES[i] for i in MTLCC_ORIGINAL_IDS], colors=colors,
                instances=regions, instance_title="fields (connected label regions)", ignore={0})


def _figure(v: View, out: Path) -> None:
    fig = plt.figure(figsize=(15, 7.6), dpi=80, constrained_layout=True)
    gs = fig.add_gridspec(2, 4)
    t = len(v.dates)
    picks = np.unique(np.linspace(0, t - 1, 4).round().astype(int)) if t else []
    for col, k in enumerate(picks):
        ax = fig.add_subplot(gs[0, col])
        ax.imshow(v.rgb[k], interpolation="nearest")
        ax.set_title(f"RGB {v.dates[k].isoformat()}")
        ax.axis("off")
    # NDVI curves: the largest instance of each of up to 6 classes
    ax = fig.add_subplot(gs[1, :2])
    ids, counts = np.unique(v.instances[v.instances > 0], return_counts=True)
    shown: set[int] = set()
    for i in ids[np.argsort(-counts)]:
        mask = v.instances == i
        cls = int(np.bincount(v.labels[mask]).argmax())
        if cls in shown or cls in v.ignore:
            continue
        shown.add(cls)
        ax.plot(v.dates, v.ndvi[:, mask].mean(1), "o-", ms=3, color=v.colors[cls], label=v.names[cls])
        if len(shown) == 6:
            break
    ax.set_ylabel("mean NDVI of the parcel")
    ax.set_ylim(-0.2, 1.0)
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title("NDVI of the largest parcel of a few classes (clouds included)")
    ax = fig.add_subplot(gs[1, 2])
    ax.imshow(v.labels, cmap=ListedColormap(v.colors), vmin=0, vmax=len(v.colors) - 1, interpolation="nearest")
    ax.set_title("semantic labels")
    ax.axis("off")
    present = [int(c) for c in np.unique(v.labels)]
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=v.colors[c], edgecolor="0.5") for c in present]
    fig.legend(handles, [v.names[c] for c in present], fontsize=8, loc="outside lower center",
               ncol=min(len(present), 7), frameon=False)
    ax = fig.add_subplot(gs[1, 3])
    rng = np.random.default_rng(0)
    palette = np.concatenate([[[0, 0, 0]], rng.uniform(0.25, 1, (int(v.instances.max()) + 1, 3))])
    ax.imshow(palette[v.instances], interpolation="nearest")
    ax.set_title(v.instance_title)
    ax.axis("off")
    fig.suptitle(v.title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def show(root, patch: int | str, out, year: int | None = None) -> Path:
    """Write the figure of patch/tile `patch` (an id, or "first") of the dataset at `root` to `out` (PNG).

    Returns `out`. `year` picks the MTLCC series (default: the first section of dataset.ini).
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise UserFacingError(f"{root}: no such directory")
    patch = patch if patch == "first" else int(patch)
    blocking = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise UserFacingError(f"--out {out}: {blocking} is a file, not a folder")
    if out.is_dir():
        raise UserFacingError(f"--out {out}: is a directory; give a .png file name")
    try:
        if (root / "metadata.geojson").exists():
            view = _load_pastis(root, patch)
        else:
            view = _load_mtlcc(root, patch, year)
    except (OSError, ValueError, KeyError, IndexError) as exc:  # missing/corrupt file or field
        raise UserFacingError(f"{root}: cannot read patch {patch} ({type(exc).__name__}: {exc})") from None
    try:
        _figure(view, out)  # creates missing parent folders
    except OSError as exc:
        raise UserFacingError(f"--out {out}: cannot write the figure ({exc.strerror or exc})") from None
    return out
