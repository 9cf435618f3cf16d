"""PanopticMeter on hand-made 8x8 / 8x12 cases; the expected values are worked out in the comments."""
import math

import pytest
import torch

from sitskit.finetune.panoptic import PanopticMeter, pair_iou, tune_min_confidence

VOID = 19


def canvas(h=8, w=12):
    return torch.zeros(h, w, dtype=torch.int64), torch.zeros(h, w, dtype=torch.int64)


def put(inst, sem, rows, cols, inst_id, cls):
    inst[rows, cols] = inst_id
    sem[rows, cols] = cls


def score(ip, sp, it, st, **kw):
    meter = PanopticMeter(**kw)
    meter.update(ip, sp, it, st)
    return meter.compute()


def test_perfect_prediction():
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, 1)
    put(it, st, slice(4, 8), slice(4, 10), 2, 2)
    r = score(it.clone(), st.clone(), it, st)
    assert r["SQ"] == r["RQ"] == r["PQ"] == 1.0
    assert r["per_class"]["1"] == {"SQ": 1.0, "RQ": 1.0, "PQ": 1.0, "TP": 1, "FP": 0, "FN": 0}
    assert r["table"][0] == [1, 0, 0, 1.0] and r["table"][1] == [1, 0, 0, 1.0]
    assert r["per_class"]["3"]["PQ"] is None  # absent class: left out of the means
    assert len(r["table"]) == 18 and r["table_classes"][0] == "1"


def test_shifted_by_one_column_is_tp_by_two_is_not():
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, 1)  # 16 px
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(1, 5), 7, 1)  # inter 12, union 20 -> IoU 0.6
    r = score(ip, sp, it, st)
    assert r["SQ"] == pytest.approx(0.6) and r["RQ"] == 1.0 and r["PQ"] == pytest.approx(0.6)
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(2, 6), 7, 1)  # inter 8, union 24 -> 1/3: FP 1, FN 1
    r = score(ip, sp, it, st)
    assert r["per_class"]["1"] == {"SQ": 0.0, "RQ": 0.0, "PQ": 0.0, "TP": 0, "FP": 1, "FN": 1}
    assert r["PQ"] == 0.0


def test_split_parcel():
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, 1)  # 16 px
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(0, 3), 1, 1)  # 12 px: IoU 0.75 -> TP
    put(ip, sp, slice(0, 4), slice(3, 4), 2, 1)  # 4 px: IoU 0.25 -> FP
    r = score(ip, sp, it, st)
    # SQ 0.75, RQ 1 / (1 + 0.5) = 2/3, PQ 0.5
    assert r["SQ"] == pytest.approx(0.75) and r["RQ"] == pytest.approx(2 / 3) and r["PQ"] == pytest.approx(0.5)
    # an even split: both halves at IoU exactly 0.5, which is not > 0.5 -> FP 2, FN 1
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(0, 2), 1, 1)
    put(ip, sp, slice(0, 4), slice(2, 4), 2, 1)
    assert score(ip, sp, it, st)["per_class"]["1"] == {"SQ": 0.0, "RQ": 0.0, "PQ": 0.0, "TP": 0, "FP": 2, "FN": 1}


def test_merged_parcels():
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 6), 1, 1)  # A: 24 px
    put(it, st, slice(0, 4), slice(6, 8), 2, 1)  # B: 8 px
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(0, 8), 5, 1)  # A u B: IoU A 24/32 = 0.75 (TP), B 8/32 (FN)
    r = score(ip, sp, it, st)
    assert r["per_class"]["1"]["TP"] == 1 and r["per_class"]["1"]["FP"] == 0 and r["per_class"]["1"]["FN"] == 1
    assert r["SQ"] == pytest.approx(0.75) and r["RQ"] == pytest.approx(2 / 3) and r["PQ"] == pytest.approx(0.5)


def test_wrong_class_is_fp_and_fn():
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, 1)
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(0, 4), 1, 2)
    r = score(ip, sp, it, st)
    assert r["per_class"]["1"]["FN"] == 1 and r["per_class"]["2"]["FP"] == 1 and r["PQ"] == 0.0


def test_void_overlapping_predictions():
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, VOID)  # void instance V1: 16 px
    put(it, st, slice(4, 8), slice(0, 4), 2, VOID)  # void instance V2: 16 px
    put(it, st, slice(0, 4), slice(8, 12), 3, 2)  # a class-2 parcel, predicted perfectly
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(0, 5), 1, 1)  # V1 + 4 px: IoU 16/20 = 0.8 > 0.5 -> deleted, not FP
    put(ip, sp, slice(4, 8), slice(2, 7), 2, 1)  # 8 px of V2 + 12 outside: IoU 8/28 -> kept minus void: FP
    put(ip, sp, slice(0, 4), slice(8, 12), 3, 2)
    r = score(ip, sp, it, st)
    assert r["per_class"]["1"] == {"SQ": 0.0, "RQ": 0.0, "PQ": 0.0, "TP": 0, "FP": 1, "FN": 0}
    assert r["per_class"]["2"]["PQ"] == 1.0
    assert r["PQ"] == pytest.approx(0.5) and r["SQ"] == pytest.approx(0.5) and r["RQ"] == pytest.approx(0.5)


def test_void_matched_per_instance_not_union():
    # the 2022 fix: a prediction equal to one void instance is deleted even though it covers only half of
    # the void pixels (against the union of void pixels its IoU would be 0.5 and it would count as FP)
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, VOID)
    put(it, st, slice(4, 8), slice(0, 4), 2, VOID)
    put(it, st, slice(0, 4), slice(8, 12), 3, 2)
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(0, 4), 1, 1)
    put(ip, sp, slice(0, 4), slice(8, 12), 3, 2)
    r = score(ip, sp, it, st)
    assert r["per_class"]["1"]["FP"] == 0 and r["PQ"] == 1.0


def test_void_pixels_removed_from_a_matching_prediction():
    # a prediction overlapping a void parcel by 4 px still matches its parcel: the void pixels are removed
    # first, so IoU = 16 / 16 instead of 16 / 20
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, 3)
    put(it, st, slice(0, 4), slice(4, 8), 2, VOID)
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(0, 5), 1, 3)
    assert score(ip, sp, it, st)["SQ"] == 1.0


def test_empty_prediction_and_empty_truth():
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, 1)
    put(it, st, slice(4, 8), slice(0, 4), 2, 4)
    ip, sp = canvas()
    r = score(ip, sp, it, st)
    assert r["SQ"] == r["RQ"] == r["PQ"] == 0.0
    assert r["per_class"]["4"] == {"SQ": 0.0, "RQ": 0.0, "PQ": 0.0, "TP": 0, "FP": 0, "FN": 1}
    r = score(it, st, ip, sp)  # prediction without truth: FP only
    assert r["PQ"] == 0.0 and r["per_class"]["1"]["FP"] == 1 and r["per_class"]["1"]["FN"] == 0
    r = score(ip, sp, ip.clone(), sp.clone())
    assert r["SQ"] is None and r["PQ"] is None and all(v["PQ"] is None for v in r["per_class"].values())


def test_background_class_and_uncovered_pixels_not_scored():
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, 1)
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(0, 4), 1, 1)
    put(ip, sp, slice(4, 8), slice(0, 4), 2, 0)  # an instance predicted as background: not a segment
    assert score(ip, sp, it, st)["PQ"] == 1.0


def test_accumulation_merge_and_inputs_untouched():
    it, st = canvas()
    put(it, st, slice(0, 4), slice(0, 4), 1, 1)
    put(it, st, slice(4, 8), slice(0, 4), 2, VOID)
    ip, sp = canvas()
    put(ip, sp, slice(0, 4), slice(1, 5), 1, 1)
    put(ip, sp, slice(4, 8), slice(0, 4), 2, 1)
    copies = [t.clone() for t in (ip, sp, it, st)]
    batch = PanopticMeter()
    batch.update(torch.stack([ip, it]), torch.stack([sp, st]), torch.stack([it, it]), torch.stack([st, st]))
    for t, c in zip((ip, sp, it, st), copies):
        assert torch.equal(t, c)
    a, b = PanopticMeter(), PanopticMeter()
    a.update(ip, sp, it, st)
    b.update(it, st, it, st)
    assert torch.equal(a.merge(b).table, batch.table)
    r = batch.compute()
    # class 1: image 1 TP (IoU 0.6), image 2 TP (1.0) -> SQ 0.8, RQ 1
    assert r["per_class"]["1"]["TP"] == 2 and r["SQ"] == pytest.approx(0.8) and r["PQ"] == pytest.approx(0.8)


def test_pair_iou():
    a = torch.tensor([[1, 1, 0, 2]])
    b = torch.tensor([[3, 0, 0, 3]])
    iou, a_ids, b_ids = pair_iou(a, b)
    assert a_ids.tolist() == [1, 2] and b_ids.tolist() == [3]
    assert iou[:, 0].tolist() == pytest.approx([1 / 3, 1 / 2])


def test_tune_min_confidence():
    conf = torch.tensor([0.9, 0.8, 0.3, 0.2])
    iou = torch.tensor([0.9, 0.7, 0.1, 0.6])
    # t in [0.3, 0.8): TP 2, FP 0, FN 2 -> 2/3; t in [0.2, 0.3): TP 2, FP 1, FN 2 -> 2/3.5;
    # t < 0.2: TP 3, FP 1, FN 1 -> 3/4 = 0.75 (best, first grid value 0.0)
    t, s = tune_min_confidence(conf, iou)
    assert t == 0.0 and s == pytest.approx(0.75)
    t, s = tune_min_confidence(conf, torch.tensor([0.9, 0.7, 0.1, 0.1]))
    assert 0.3 <= t < 0.8 and s == pytest.approx(2 / 3) and math.isfinite(s)
