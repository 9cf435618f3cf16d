"""sitskit.finetune.figures: each figure builds on small inputs, with the expected axes, labels, colours."""
from __future__ import annotations

import numpy as np
import pytest

from sitskit.constants import PASTIS_CLASSES, PASTIS_COLORS
from sitskit.finetune.figures import (
    class_colors,
    confusion_figure,
    iou_bars_figure,
    patch_maps_figure,
    patch_rgb,
    sweep_plot,
)
from sitskit.finetune.metrics import compute_metrics

NAMES = ["bg", "a", "b", "void"]
CONF = np.array([[9, 1, 1, 1],
                 [1, 4, 1, 2],
                 [2, 0, 3, 1],
                 [1, 1, 1, 9]])


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


def test_confusion_figure_rows_are_scored_classes_columns_add_predicted_void():
    m = compute_metrics(CONF, NAMES, "sitskit", ignore=[3], background=0)
    fig = confusion_figure(m)
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # matrix + colour bar
    assert [t.get_text() for t in ax.get_yticklabels()] == ["bg", "a", "b"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bg", "a", "b", "void"]
    image = ax.get_images()[0].get_array()
    np.testing.assert_allclose(image.sum(1), 1.0)  # row-normalised
    assert image[1, 3] == pytest.approx(2 / 8)  # a predicted void


def test_iou_bars_with_an_undefined_class():
    conf = np.diag([3, 0, 4, 1])
    m = compute_metrics(conf, NAMES, "utae", ignore=[3])
    fig = iou_bars_figure(m)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.patches) == 3
    assert [t.get_text() for t in ax.texts] == ["1.00", "n/a", "1.00"]
    assert ax.get_legend().get_texts()[0].get_text() == "mIoU 1.000"


def test_patch_maps_use_the_class_colours_and_list_present_classes():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (8, 8))
    pred = truth.copy()
    pred[0, :] = 1
    image = rng.integers(0, 3000, (3, 10, 8, 8))
    bands = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
    rgb = patch_rgb(image, bands)
    assert rgb.shape == (8, 8, 3) and 0 <= rgb.min() and rgb.max() <= 1
    fig = patch_maps_figure([{"truth": truth, "pred": pred, "rgb": rgb, "title": "p1"},
                             {"truth": truth, "pred": truth}],
                            PASTIS_CLASSES, ignore=[3])
    assert len(fig.axes) == 8
    cmap = fig.axes[1].get_images()[0].get_cmap()
    assert np.allclose(cmap(2)[:3], np.array(PASTIS_COLORS[2]) / 255)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == PASTIS_CLASSES[:4] + ["correct", "wrong", "not scored"]
    assert fig.axes[3].get_title().startswith("errors (accuracy")
    assert fig.axes[4].get_title() == " (no RGB)"


def test_class_colors_fallbacks():
    np.testing.assert_allclose(class_colors(PASTIS_CLASSES), np.array(PASTIS_COLORS) / 255)
    assert class_colors(["x", "y", "z"]).shape == (3, 3)
    np.testing.assert_allclose(class_colors(["x"], [[255, 0, 0]]), [[1, 0, 0]])


def test_sweep_plot_mean_and_sd_over_seeds():
    rows = [{"method": m, "share": s, "seed": seed, "mIoU": base + s + 0.01 * seed}
            for m, base in (("scratch", 0.1), ("pretrained", 0.2))
            for s in (0.01, 0.1, 1.0) for seed in range(3)]
    rows.append({"method": "scratch", "share": 1.0, "seed": 9, "mIoU": None})  # failed run: skipped
    fig = sweep_plot(rows, "share", "mIoU", "method")
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.lines) == 2 and ax.get_xscale() == "log"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.1 + s + 0.01 for s in (0.01, 0.1, 1.0)])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["scratch (n=3)", "pretrained (n=3)"]
    # categorical x (cut-off dates) keeps the given order
    cuts = ["2017-04-01", "2017-06-01", "2017-05-01"]
    rows = [{"cut": c, "seed": s, "OA": i + s} for i, c in enumerate(cuts) for s in range(2)]
    ax = sweep_plot(rows, "cut", "OA").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2017-04-01", "2017-06-01", "2017-05-01"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.5, 1.5, 2.5])


def test_sweep_plot_one_point_per_hue_gets_error_bars():
    """sweep models: each model is its own hue with a single x; the sd must still show (an error bar)."""
    rows = [{"label": m, "model": m, "seed": s, "mIoU": base + 0.02 * s}
            for m, base in (("utae", 0.17), ("convlstm", 0.13)) for s in range(3)]
    ax = sweep_plot(rows, "model", "mIoU", "label").axes[0]
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 2
    segments = bars[0].lines[2][0].get_segments()[0]  # the vertical bar of utae: mean ± sd
    np.testing.assert_allclose([segments[0][1], segments[1][1]], [0.19 - 0.02, 0.19 + 0.02])
