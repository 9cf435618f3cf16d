"""Evaluation figures (matplotlib, Agg; each function returns a Figure for the caller to log to MLflow):
normalised confusion matrix, per-class IoU bars, RGB / truth / prediction / error maps of a few patches,
and sweep plots (mean ± sd over seeds)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from sitskit.constants import PASTIS_CLASSES, PASTIS_COLORS, REFLECTANCE_SCALE
from sitskit.viz import true_color

ERROR_COLORS = [(0.75, 0.75, 0.75), (0.2, 0.65, 0.3), (0.85, 0.15, 0.15)]  # not scored, correct, wrong


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def class_colors(class_names: Sequence[str], colors=None) -> np.ndarray:
    """[K, 3] float RGB in [0, 1]: `colors` (e.g. a data file's `class_colors`, uint8 [K, 3]), else the
    PASTIS colours for the PASTIS classes, else matplotlib's tab20."""
    if colors is not None:
        c = np.asarray(colors, np.float32)
        return c / 255.0 if c.max() > 1 else c
    if list(class_names) == PASTIS_CLASSES:
        return np.asarray(PASTIS_COLORS, np.float32) / 255.0
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return np.array([cmap(i % 20)[:3] for i in range(len(class_names))], np.float32)


def confusion_figure(metrics: dict, title: str | None = None):
    """Row-normalised confusion (share of each true class) of a compute_metrics dict. Rows: the scored
    classes with support; columns: the scored classes plus any other class they were predicted as (e.g.
    void under the sitskit protocol). Cells show percentages."""
    plt = _plt()
    names = metrics["classes"]
    conf = np.asarray(metrics["confusion"], np.float64)
    scored = [names.index(c) for c in metrics["scored_classes"]]
    rows = [i for i in scored if conf[i].sum() > 0] or scored
    cols = scored + [j for j in range(len(names)) if j not in scored and conf[rows, j].sum() > 0]
    sub = conf[np.ix_(rows, cols)]
    norm = sub / np.maximum(sub.sum(1, keepdims=True), 1)
    size = max(5.0, 0.42 * len(cols) + 3)
    fig, ax = plt.subplots(figsize=(size + 1, size * len(rows) / len(cols) + 1.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), [names[j] for j in cols], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [names[i] for i in rows], fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    for r in range(len(rows)):
        for c in range(len(cols)):
            if norm[r, c] >= 0.005:
                ax.text(c, r, f"{100 * norm[r, c]:.0f}", ha="center", va="center", fontsize=6.5,
                        color="white" if norm[r, c] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title or f"confusion (row-normalised, %), protocol {metrics['protocol']}")
    fig.tight_layout()
    return fig


def class_bars_figure(names, values, colors, labels, mean, mean_name: str, title: str, xmax: float = 1.1):
    """Horizontal bars, one per class (top to bottom), with a text label beside each and a dashed mean line.
    values: floats or None (drawn as 0), colors: [len(names), 3], labels: the text beside each bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.32 * max(len(names), 1) + 1.4))
    y = np.arange(len(names))
    ax.barh(y, [v or 0.0 for v in values], color=colors, edgecolor="0.3", linewidth=0.5)
    for yi, v, text in zip(y, values, labels):
        ax.text((v or 0.0) + 0.01, yi, text, va="center", fontsize=7)
    if mean is not None:
        ax.axvline(mean, color="k", ls="--", lw=1, label=f"{mean_name} {mean:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, xmax)
    ax.set_xlabel(mean_name.removeprefix("m"))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def iou_bars_figure(metrics: dict, class_colors_rgb=None, title: str | None = None):
    """Horizontal per-class IoU bars of a compute_metrics dict, in class colours, with the mIoU line;
    undefined classes (absent) are labelled n/a."""
    names = metrics["scored_classes"]
    colors = class_colors(metrics["classes"], class_colors_rgb)
    idx = [metrics["classes"].index(n) for n in names]
    iou = [metrics["per_class"][n]["IoU"] for n in names]
    return class_bars_figure(names, iou, colors[idx], ["n/a" if v is None else f"{v:.2f}" for v in iou],
                             metrics["mIoU"], "mIoU", title or f"per-class IoU, protocol {metrics['protocol']}")


def patch_rgb(image, band_names: Sequence[str], date_index: int | None = None,
              scale: float = REFLECTANCE_SCALE) -> np.ndarray:
    """True-colour [H, W, 3] of one date of a raw (not normalised) [T, C, H, W] series with bands B4 B3 B2;
    default date: the middle one."""
    image = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    t = image.shape[0] // 2 if date_index is None else date_index
    b = [list(band_names).index(n) for n in ("B4", "B3", "B2")]
    return true_color(image[t, b[0]], image[t, b[1]], image[t, b[2]], scale=scale)


def patch_maps_figure(patches: Sequence[dict], class_names: Sequence[str], class_colors_rgb=None,
                      ignore: Sequence[int] = ()):
    """One row per patch: RGB | truth | prediction | errors.

    patches: dicts with `truth`, `pred` ([H, W] class indices), optional `rgb` ([H, W, 3] in [0, 1], e.g.
    patch_rgb(...)) and `title`. Errors: green = correct, red = wrong, grey = not scored (truth in `ignore`).
    The legend lists the classes that appear in the shown maps.
    """
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = class_colors(class_names, class_colors_rgb)
    cmap = ListedColormap(colors)
    k = len(class_names)
    fig, axes = plt.subplots(len(patches), 4, figsize=(12.5, 3.1 * len(patches) + 0.4), squeeze=False)
    present: set[int] = set()
    for row, p in zip(axes, patches):
        truth, pred = np.asarray(p["truth"]), np.asarray(p["pred"])
        present |= set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())
        rgb = p.get("rgb")
        row[0].imshow(rgb if rgb is not None else np.full((*truth.shape, 3), 0.5))
        row[1].imshow(truth, cmap=cmap, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
        row[2].imshow(pred, cmap=cmap, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
        err = np.where(truth == pred, 1, 2)
        err[np.isin(truth, list(ignore))] = 0
        row[3].imshow(err, cmap=ListedColormap(ERROR_COLORS),
                      vmin=-0.5, vmax=2.5, interpolation="nearest")
        scored = err > 0
        acc = float((err[scored] == 1).mean()) if scored.any() else float("nan")
        name = p.get("title", "")
        titles = [f"{name} RGB" if rgb is not None else f"{name} (no RGB)", "truth", "prediction",
                  f"errors (accuracy {acc:.1%})"]
        for ax, t in zip(row, titles):
            ax.set_title(t, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(facecolor=colors[c], edgecolor="0.3", label=class_names[c])
               for c in sorted(present) if c < k]
    handles += [Patch(facecolor=col, label=label) for col, label in
                ((ERROR_COLORS[1], "correct"), (ERROR_COLORS[2], "wrong"), (ERROR_COLORS[0], "not scored"))]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.80, 1))
    return fig


def sweep_plot(rows: Sequence[dict], x: str, y: str, hue: str | None = None, title: str | None = None,
               logx: bool | None = None):
    """Mean ± sd of `y` over the rows sharing (`hue`, `x`) (i.e. over seeds), one line per hue value.

    rows: e.g. [{"method": "scratch", "label_share": 0.02, "seed": 0, "mIoU": 0.31}, ...]. Numeric x is
    plotted as numbers (log scale when it spans more than a factor 20, unless `logx` says otherwise), other
    x values as ordered categories (first-seen order), e.g. cut-off dates.
    """
    plt = _plt()
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(y) is not None:
            groups[r.get(hue) if hue else y][r[x]].append(float(r[y]))
    xs_all = list(dict.fromkeys(r[x] for r in rows))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, by_x in groups.items():
        xs = sorted(by_x) if numeric else [v for v in xs_all if v in by_x]
        pos = np.array(xs, np.float64) if numeric else np.array([xs_all.index(v) for v in xs], np.float64)
        mean = np.array([np.mean(by_x[v]) for v in xs])
        sd = np.array([np.std(by_x[v], ddof=1) if len(by_x[v]) > 1 else 0.0 for v in xs])
        n = max(len(by_x[v]) for v in xs)
        line, = ax.plot(pos, mean, "-o", ms=4, label=f"{label} (n={n})" if hue else label)
        if len(pos) > 1:
            ax.fill_between(pos, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
        else:  # a single point (e.g. one model per hue): an error bar, since a band would be invisible
            ax.errorbar(pos, mean, yerr=sd, color=line.get_color(), capsize=4, lw=1.2)
    if numeric:
        finite = [v for v in xs_all if v > 0]
        if logx if logx is not None else (finite and max(finite) / min(finite) > 20):
            ax.set_xscale("log")
            ax.set_xticks(sorted(finite), [f"{v:g}" for v in sorted(finite)])
            ax.minorticks_off()
    else:
        ax.set_xticks(range(len(xs_all)), [str(v) for v in xs_all], rotation=30, ha="right")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{y} (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    if groups and len(groups) > 8 or (groups and all(len(g) == 1 for g in groups.values()) and len(groups) > 1):
        # one point per hue (x names it already) or many hues: the legend goes beside the axes, off the data
        ax.legend(title=hue, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.set_size_inches(9.0, 4.2)
    elif groups:
        ax.legend(title=hue, fontsize=8)
    ax.set_title(title or f"{y} vs {x}")
    fig.tight_layout()
    return fig
