"""The own-region path end to end on a simulated scene, and the figure of docs/own_region.md.

    python -m sitskit.geo.demo --work /tmp/own_region --figure docs/figures/own_region_map.png

simulate (256x256 px at 10 m, EPSG:32631) -> `data_prep.py geotiff` -> a trivial per-pixel classifier
(nearest class centroid of the normalised time series, fitted on the train split; a stand-in for
`finetune.py predict`) -> stitched GeoTIFF + probability GeoTIFF + parcel table -> figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

from sitskit.data_prep.cli import main as data_prep
from sitskit.errors import UserFacingError

from . import maps, require


def pixel_features(f: h5py.File, key: str, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalised series of every pixel of a patch: [H*W, T*C] float32."""
    x = f[f"patches/{key}/S2/data"][()].astype(np.float32)  # [T, C, H, W]
    x = (x - mean[None, :, None, None]) / std[None, :, None, None]
    t, c, h, w = x.shape
    return x.reshape(t * c, h * w).T


def nearest_centroid_probs(h5_path, temperature: float = 0.2) -> dict[str, np.ndarray]:
    """Fit class centroids on the train patches (void pixels left out), then probs [K, H, W] per patch:
    softmax of -squared distance / (temperature * median squared distance)."""
    with h5py.File(h5_path, "r") as f:
        k, void = int(f.attrs["num_classes"]), int(f.attrs["ignore_index"])
        mean, std = f["norm/S2/mean"][0].astype(np.float32), f["norm/S2/std"][0].astype(np.float32)
        keys = sorted(f["patches"])
        sums, counts = None, np.zeros(k)
        for key in keys:
            if f[f"patches/{key}"].attrs["split"] != "train":
                continue
            feats, sem = pixel_features(f, key, mean, std), f[f"patches/{key}/semantic"][()].ravel()
            sums = np.zeros((k, feats.shape[1])) if sums is None else sums
            keep = sem != void
            np.add.at(sums, sem[keep], feats[keep])
            counts += np.bincount(sem[keep], minlength=k)
        if sums is None:
            raise UserFacingError(f"{h5_path}: no train patch to fit the classifier on")
        seen = counts > 0
        centroids = (sums[seen] / counts[seen, None]).astype(np.float32)
        out = {}
        for key in keys:
            feats = pixel_features(f, key, mean, std)
            h, w = f[f"patches/{key}/semantic"].shape
            d2 = ((feats ** 2).sum(1)[:, None] - 2 * feats @ centroids.T
                  + (centroids ** 2).sum(1)[None])  # [P, K_seen] squared distances
            logits = -d2 / (temperature * np.median(d2) + 1e-6)
            logits -= logits.max(1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(1, keepdims=True)
            probs = np.zeros((k, h * w), np.float32)
            probs[seen] = p.T
            out[key] = probs.reshape(k, h, w)
    return out


def figure(map_tif, parcels_gpkg, scene_tif, out_png, note: str) -> Path:
    """Left: the stitched class map with parcel outlines; right: true colour with parcels outlined by
    agreement (green) / disagreement (red) of predicted and declared class."""
    rasterio = require("rasterio")
    gpd = require("geopandas")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = maps.map_class_names(map_tif)
    with rasterio.open(map_tif) as src:
        cls, cmap = src.read(1), src.colormap(1)
        b = src.bounds
    with rasterio.open(scene_tif) as src:
        rgb = np.stack([src.read(i) for i in (3, 2, 1)], -1).astype(np.float32)  # B4 B3 B2
    rgb = np.clip(rgb / np.percentile(rgb, 98), 0, 1)
    colours = np.zeros((*cls.shape, 3), np.uint8)
    for i in np.unique(cls):
        colours[cls == i] = (200, 200, 200) if i == maps.NODATA else cmap[int(i)][:3]
    table = gpd.read_file(parcels_gpkg)
    extent = (b.left, b.right, b.bottom, b.top)
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), dpi=100)
    axes[0].imshow(colours, extent=extent, interpolation="nearest")
    table.boundary.plot(ax=axes[0], color="white", linewidth=0.7)
    axes[0].set_title("stitched crop map (GeoTIFF) + parcel outlines", fontsize=10)
    present = [int(i) for i in np.unique(cls) if i != maps.NODATA]
    axes[0].legend(handles=[Patch(color=np.array(cmap[i][:3]) / 255, label=names[i]) for i in present],
                   loc="upper left", bbox_to_anchor=(-0.62, 1.0), fontsize=7, frameon=False)
    axes[1].imshow(rgb, extent=extent, interpolation="nearest")
    agree = table["agree"].astype(bool)
    table[agree].boundary.plot(ax=axes[1], color="lime", linewidth=1.0)
    table[~agree].boundary.plot(ax=axes[1], color="red", linewidth=1.4)
    axes[1].set_title(f"parcel table: predicted = declared in {agree.mean():.0%} of {len(table)} parcels "
                      f"(green) / not (red)", fontsize=10)
    for ax in axes:
        ax.ticklabel_format(style="plain", useOffset=False)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("x (m, EPSG:32631)", fontsize=8)
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def run(work, figure_png=None, size: int = 256, seed: int = 0) -> dict:
    from sitskit.simulate.geotiff import simulate_geotiff
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    scene = work / "scene"
    if not scene.exists():
        simulate_geotiff(scene, size=size, seed=seed)
    h5 = work / "region.h5"
    if not h5.exists():
        code = data_prep(["geotiff", "--images", str(scene), "--labels", str(scene / "parcels.gpkg"),
                          "--class-field", "CODE", "--class-map", str(scene / "crop_codes.csv"),
                          "--cloud-masks", str(scene / "clouds"), "--out", str(h5), "--patch-size", "128",
                          "--stride", "96", "--split-block", "128", "--seed", str(seed)])
        if code:
            raise UserFacingError(f"conversion of {scene} failed")
    probs = nearest_centroid_probs(h5)
    got = maps.export_maps(h5, work / "map.tif", probs=probs, parcels_out=work / "parcels_pred.gpkg")
    if figure_png:
        summer = sorted(scene.glob("S2_????07*.tif")) or sorted(scene.glob("S2_*.tif"))
        got["figure"] = figure(got["map"], got["parcels"], summer[len(summer) // 2], figure_png,
                               "simulated scene (sitskit simulator), classifier: nearest class centroid of the "
                               "per-pixel series fitted on the train blocks (not a trained network)")
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working folder (scene, region.h5, map.tif, parcels_pred.gpkg)")
    p.add_argument("--figure", help="PNG to write")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        got = run(args.work, args.figure, args.size, args.seed)
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, v in got.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
