"""sitskit.finetune.metrics: ConfusionMeter accumulation and the three protocols against hand-computed values
(3x3 and 4x4 confusions), excluded classes, absent classes and empty input; sklearn cross-check of stcln."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sitskit.errors import UserFacingError
from sitskit.finetune.metrics import ConfusionMeter, cohen_kappa, compute_metrics, protocol_options

# PASTIS-like 3 classes: 0 background, 1 crop, 2 void. Rows = truth, columns = prediction.
NAMES3 = ["bg", "crop", "void"]
C3 = np.array([[5, 1, 1],
               [2, 6, 2],
               [1, 1, 3]])
# PASTIS-like 4 classes: 0 background, 1 a, 2 b, 3 void.
NAMES4 = ["bg", "a", "b", "void"]
C4 = np.array([[9, 1, 1, 1],
               [1, 4, 1, 2],
               [2, 0, 3, 1],
               [1, 1, 1, 9]])
# MTLCC-like: 0 unknown, 1 x, 2 y.
NAMES_M = ["unknown", "x", "y"]
CM = np.array([[4, 1, 1],
               [2, 5, 1],
               [1, 2, 6]])


def test_sitskit_counts_predictions_into_void_as_errors():
    m = compute_metrics(C3, NAMES3, "sitskit", ignore=[2], background=0)
    # kept rows 0, 1 (17 px); class 0: TP 5 FN 2 FP 2; class 1: TP 6 FN 4 (2 of them predicted void) FP 1
    assert m["n_pixels"] == 17 and m["OA"] == pytest.approx(11 / 17)
    assert m["per_class"]["bg"]["IoU"] == pytest.approx(5 / 9)
    assert m["per_class"]["crop"]["IoU"] == pytest.approx(6 / 11)
    assert m["per_class"]["crop"]["precision"] == pytest.approx(6 / 7)
    assert m["per_class"]["crop"]["recall"] == pytest.approx(6 / 10)
    assert m["per_class"]["crop"]["F1"] == pytest.approx(12 / 17)
    assert m["per_class"]["crop"]["support"] == 10
    assert m["mIoU"] == pytest.approx((5 / 9 + 6 / 11) / 2)
    assert m["mF1"] == pytest.approx((5 / 7 + 12 / 17) / 2)
    assert m["kappa"] == pytest.approx(0.4)  # po 11/17, pe 119/289
    assert set(m["per_class"]) == {"bg", "crop"} and m["scored_classes"] == ["bg", "crop"]
    assert m["confusion"] == [[5, 1, 1], [2, 6, 2], [0, 0, 0]] and m["classes"] == NAMES3
    assert m["protocol"] == "sitskit"


def test_sitskit_exclude_background():
    m = compute_metrics(C3, NAMES3, "sitskit", ignore=[2], background=0, exclude_background=True)
    assert m["n_pixels"] == 10 and m["OA"] == pytest.approx(0.6)
    assert m["per_class"]["crop"] == {"IoU": pytest.approx(0.6), "F1": pytest.approx(0.75),
                                      "precision": pytest.approx(1.0), "recall": pytest.approx(0.6),
                                      "support": 10}
    assert list(m["per_class"]) == ["crop"] and m["mIoU"] == pytest.approx(0.6)
    assert m["kappa"] == pytest.approx(0.0)  # po = pe = 0.6


def test_utae_drops_void_as_truth_and_as_prediction():
    m = compute_metrics(C3, NAMES3, "utae", ignore=[2], background=0)
    # masked [[5,1],[2,6]]: class 0 TP 5 FN 1 FP 2, class 1 TP 6 FN 2 FP 1
    assert m["n_pixels"] == 14 and m["OA"] == pytest.approx(11 / 14)
    assert m["per_class"]["bg"]["IoU"] == pytest.approx(5 / 8)
    assert m["per_class"]["crop"]["IoU"] == pytest.approx(2 / 3)
    assert m["mIoU"] == pytest.approx((5 / 8 + 2 / 3) / 2)  # background included
    assert m["per_class"]["bg"]["F1"] == pytest.approx(10 / 13)
    assert m["mF1"] == pytest.approx((10 / 13 + 0.8) / 2)
    assert m["kappa"] == pytest.approx(4 / 7)
    assert "void" not in m["per_class"]


def test_stcln_pastis_restricted_iou_and_sklearn_macro_f1():
    m = compute_metrics(C4, NAMES4, "stcln", ignore=[3], background=0, dataset="pastis")
    # kept: truth rows a, b (14 px), every prediction; OA 7/14
    assert m["n_pixels"] == 14 and m["OA"] == pytest.approx(0.5)
    # IoU over the labels present in truth {a, b}: restricted [[4,1],[0,3]]
    assert m["per_class"]["a"]["IoU"] == pytest.approx(4 / 5)
    assert m["per_class"]["b"]["IoU"] == pytest.approx(3 / 4)
    assert m["mIoU"] == pytest.approx(0.775)
    # macro F1 over the union {bg, a, b, void} of truth and prediction labels: 0, 2/3, 0.6, 0
    assert m["per_class"]["bg"]["F1"] == 0.0 and m["per_class"]["void"]["F1"] == 0.0
    assert m["per_class"]["a"]["F1"] == pytest.approx(2 / 3)
    assert m["mF1"] == pytest.approx((2 / 3 + 0.6) / 4)
    assert m["per_class"]["bg"]["IoU"] is None  # not a truth label
    assert m["kappa"] == pytest.approx(0.3)  # po 1/2, pe 2/7


def test_stcln_mtlcc_drops_pixels_predicted_unknown():
    m = compute_metrics(CM, NAMES_M, "stcln", ignore=[0], dataset="mtlcc")
    assert m["n_pixels"] == 14 and m["OA"] == pytest.approx(11 / 14)
    assert m["per_class"]["x"]["IoU"] == pytest.approx(5 / 8)
    assert m["per_class"]["y"]["IoU"] == pytest.approx(6 / 9)
    assert m["mF1"] == pytest.approx((10 / 13 + 0.8) / 2)
    assert m["kappa"] == pytest.approx(4 / 7)
    # the clean protocol scores the 3 pixels predicted unknown as errors instead
    clean = compute_metrics(CM, NAMES_M, "sitskit", ignore=[0])
    assert clean["n_pixels"] == 17 and clean["OA"] == pytest.approx(11 / 17)


def test_stcln_needs_the_dataset():
    with pytest.raises(UserFacingError, match="dataset"):
        compute_metrics(CM, NAMES_M, "stcln", ignore=[0])
    with pytest.raises(UserFacingError, match="protocol"):
        compute_metrics(CM, NAMES_M, "paps")


def test_stcln_equals_sklearn_on_random_matrices():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for dataset, ignore, bg in (("pastis", [4], 0), ("mtlcc", [0], None)):
        for _ in range(5):
            conf = rng.integers(0, 6, (5, 5)) * (rng.random((5, 5)) < 0.6)
            conf[1, 1] += 1  # at least one scored pixel
            y_true, y_pred = np.nonzero(conf)
            counts = conf[y_true, y_pred]
            y_true, y_pred = np.repeat(y_true, counts), np.repeat(y_pred, counts)
            keep = ~np.isin(y_true, ignore + ([bg] if bg is not None else []))
            if dataset == "mtlcc":
                keep &= y_pred != 0
            t, p = y_true[keep], y_pred[keep]
            m = compute_metrics(conf, list("abcde"), "stcln", ignore=ignore, background=bg, dataset=dataset)
            assert m["OA"] == pytest.approx(sk.accuracy_score(t, p))
            assert m["kappa"] == pytest.approx(sk.cohen_kappa_score(t, p))
            assert m["mF1"] == pytest.approx(sk.f1_score(t, p, average="macro", zero_division=0))
            r = sk.confusion_matrix(t, p, labels=np.unique(t))
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = np.diag(r) / (r.sum(0) + r.sum(1) - np.diag(r))
            assert m["mIoU"] == pytest.approx(np.nanmean(iou))


def test_absent_class_is_undefined_and_left_out_of_the_means():
    conf = np.zeros((4, 4), int)
    conf[1, 1], conf[1, 2], conf[2, 2] = 3, 1, 4  # class 0 never true nor predicted; 3 is void
    m = compute_metrics(conf, NAMES4, "sitskit", ignore=[3], background=0)
    assert m["per_class"]["bg"] == {"IoU": None, "F1": None, "precision": None, "recall": None, "support": 0}
    assert m["mIoU"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    u = compute_metrics(conf, NAMES4, "utae", ignore=[3])
    assert u["per_class"]["bg"]["IoU"] is None and u["mIoU"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    # predicted but never true: IoU 0, which counts
    conf[1, 0] = 1
    m = compute_metrics(conf, NAMES4, "sitskit", ignore=[3], background=0)
    assert m["per_class"]["bg"]["IoU"] == 0.0 and m["per_class"]["bg"]["recall"] is None
    assert m["mIoU"] == pytest.approx((0 + 3 / 5 + 4 / 5) / 3)


@pytest.mark.parametrize("protocol", ["sitskit", "utae", "stcln"])
def test_empty_input_gives_defined_metrics(protocol):
    meter = ConfusionMeter(4)
    meter.update(torch.full((2, 3, 3), 3), torch.full((2, 3, 3), 3))  # only void pixels
    m = meter.compute(NAMES4, protocol, ignore=[3], background=0, dataset="pastis")
    assert m["n_pixels"] == 0
    assert m["OA"] is None and m["mIoU"] is None and m["mF1"] is None and m["kappa"] is None
    assert all(v["support"] == 0 for v in m["per_class"].values())


def test_meter_accumulates_masks_and_merges():
    target = torch.tensor([[[0, 1], [2, 255]]])
    pred = torch.tensor([[[0, 2], [2, 1]]])
    a = ConfusionMeter(3)
    a.update(pred, target)  # 255 is skipped
    assert a.confusion.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    a.update(pred.flatten(), target.flatten(), valid_mask=torch.tensor([True, False, False, True]))
    assert a.confusion.tolist() == [[2, 0, 0], [0, 0, 1], [0, 0, 1]]
    b = ConfusionMeter(3)
    b.update(torch.tensor([1, 1]), torch.tensor([1, 0]))
    merged = a.confusion + b.confusion  # what accelerator.reduce(..., "sum") does across processes
    both = ConfusionMeter(3)
    both.update(pred, target)
    both.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    assert merged.tolist() == both.confusion.tolist()
    with pytest.raises(ValueError, match="predictions"):
        a.update(torch.tensor([3]), torch.tensor([0]))
    a.reset()
    assert int(a.confusion.sum()) == 0


def test_kappa_reference_values():
    assert cohen_kappa(np.array([[10, 0], [0, 10]])) == pytest.approx(1.0)
    assert cohen_kappa(np.array([[5, 5], [5, 5]])) == pytest.approx(0.0)
    assert np.isnan(cohen_kappa(np.array([[7, 0], [0, 0]])))  # chance agreement 1: undefined


def test_protocol_options_from_data_file_attributes(pastis_h5, mtlcc_h5):
    import h5py
    with h5py.File(pastis_h5) as f:
        assert protocol_options(f.attrs) == {"ignore": [19], "background": 0, "dataset": "pastis"}
    with h5py.File(mtlcc_h5) as f:
        assert protocol_options(f.attrs) == {"ignore": [0], "background": None, "dataset": "mtlcc"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_meter_on_cuda_equals_cpu():
    rng = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 4, (2, 16, 16), generator=rng), torch.randint(0, 4, (2, 16, 16), generator=rng)
    cpu, gpu = ConfusionMeter(4), ConfusionMeter(4, device="cuda")
    cpu.update(pred, target)
    gpu.update(pred.cuda(), target.cuda())
    assert gpu.confusion.device.type == "cuda" and gpu.confusion.cpu().tolist() == cpu.confusion.tolist()
