"""Panoptic fine-tuning (finetune.py --task panoptic): training, evaluate / predict round trip, refusals, the
whole-set threshold tuning, instance prediction files and the overlay figure (docs/panoptic.md, "Fine-tuning")."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from sitskit.errors import UserFacingError
from sitskit.finetune.main_finetune import main

TINY = '{"encoder_widths": [8, 8, 8, 16], "decoder_widths": [8, 8, 8, 16], "d_model": 32, "n_head": 4, ' \
       '"d_k": 4, "max_centres": 64}'


def train_args(data, out, name, *extra):
    return ["--config", "demo_paps", "--data.path", str(data), "--data.folds", "[1, 2]", "--data.val_folds", "[3]",
            "--data.test_folds", "[4, 5]", "--data.crop", "null", "--data.num_dates", "6", "--data.eval_batch_size", "1",
            "--model.kwargs", TINY, "--output.dir", str(out), "--output.name", name, "--run.tracking", "false",
            "--run.progress", "false", "--train.epochs", "2", "--eval.every", "1", "--eval.figures", "1", *extra]


@pytest.fixture(scope="module")
def trained(pastis_h5, tmp_path_factory):
    """A 2-epoch U-TAE+PaPs run at batch size 1 (training and evaluation) on the shared simulated PASTIS."""
    out = tmp_path_factory.mktemp("panoptic_runs")
    assert main(train_args(pastis_h5, out, "run", "--data.batch_size", "1")) == 0
    return out / "run"


def test_training_exports_tuned_threshold_and_panoptic_test_metrics(trained):
    from safetensors.torch import load_file

    meta = json.loads((trained / "model" / "config.json").read_text())
    assert meta["task"] == "panoptic" and meta["name"] == "utae_paps" and meta["val_metric"] == "PQ"
    weights = load_file(str(trained / "model" / "model.safetensors"))
    assert float(weights["min_confidence"]) == pytest.approx(meta["min_confidence"])
    assert meta["min_confidence"] in [round(0.01 * i, 2) for i in range(100)]  # the tuning grid
    m = json.loads((trained / "test" / "metrics.json").read_text())
    assert m["n_patches"] == 2 and m["min_confidence"] == pytest.approx(meta["min_confidence"])
    names = m["table_classes"]
    assert len(names) == 18 and "Background" not in names and "Void label" not in names  # classes 1..18
    table = np.array(m["table"])
    assert table.shape == (18, 4) and m["table_columns"] == ["TP", "FP", "FN", "sum_IoU"]
    # FN + TP = the true non-void parcels of the two test patches
    assert set(m["per_class"]) == set(names)
    assert all(set(r) == {"SQ", "RQ", "PQ", "TP", "FP", "FN"} for r in m["per_class"].values())
    assert [m["per_class"][n]["TP"] + m["per_class"][n]["FN"] for n in names] == (table[:, 0] + table[:, 2]).tolist()
    for k in ("PQ", "SQ", "RQ", "OA", "mIoU"):
        assert m[k] is None or 0.0 <= m[k] <= 1.0
    assert m["semantic"]["OA"] == m["OA"] and len(m["semantic"]["confusion"]) == 20
    for f in ("panoptic.png", "pq.png", "confusion.png", "iou.png"):
        assert (trained / "test" / f).stat().st_size > 1000


def true_parcels(h5_path, keys) -> int:
    with h5py.File(h5_path, "r") as f:
        n = 0
        for k in keys:
            inst, sem = f[f"patches/{k}/instances"][()], f[f"patches/{k}/semantic"][()]
            n += sum(1 for i in np.unique(inst[inst > 0]) if 1 <= np.bincount(sem[inst == i]).argmax() <= 18)
    return n


def test_test_counts_every_true_parcel(trained, pastis_h5):
    m = json.loads((trained / "test" / "metrics.json").read_text())
    table = np.array(m["table"])
    assert int(table[:, 0].sum() + table[:, 2].sum()) == true_parcels(pastis_h5, ["30000", "40000"])


def test_evaluate_and_predict_round_trip(trained, pastis_h5, tmp_path, capsys):
    from sitskit.finetune.commands import main as commands_main

    assert commands_main(["evaluate", "--checkpoint", str(trained), "--data", str(pastis_h5), "--cpu",
                          "--out", str(tmp_path / "ev"), "--figures", "1"]) == 0
    by_checkpoint = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    test = json.loads((trained / "test" / "metrics.json").read_text())
    assert by_checkpoint["table"] == test["table"] and by_checkpoint["PQ"] == test["PQ"]
    assert (tmp_path / "ev" / "panoptic.png").exists()
    pred = tmp_path / "pred.h5"
    assert commands_main(["predict", "--checkpoint", str(trained), "--data", str(pastis_h5), "--cpu",
                          "--out", str(pred), "--probs"]) == 0
    with h5py.File(pred, "r") as f:
        assert int(f.attrs["has_instances"]) == 1 and sorted(f["patches"]) == ["30000", "40000"]
        g = f["patches/30000"]
        inst, cls, score = g["instances"][()], g["instance_class"][()], g["instance_score"][()]
        assert inst.dtype == np.int32 and inst.shape == (32, 32) and len(cls) == len(score)
        assert inst.max() <= len(cls) and g["probs"].shape == (20, 32, 32)
        # the semantic map is each instance's class, background where no instance
        sem = g["semantic"][()]
        assert np.array_equal(sem[inst == 0], np.zeros((inst == 0).sum()))
        for i, c in enumerate(cls, 1):
            assert np.all(sem[inst == i] == c)
        assert np.all(np.diff(score) <= 0)  # ids by decreasing confidence
    assert commands_main(["evaluate", "--predictions", str(pred), "--data", str(pastis_h5),
                          "--out", str(tmp_path / "ep")]) == 0
    by_file = json.loads((tmp_path / "ep" / "metrics.json").read_text())
    assert by_file["table"] == by_checkpoint["table"] and by_file["PQ"] == by_checkpoint["PQ"]
    assert by_file["semantic"]["confusion"] == by_checkpoint["semantic"]["confusion"]
    assert by_file["OA"] == by_checkpoint["OA"]


def _one_error_line(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:")
    return err[0]


def test_mtlcc_and_files_without_instances_are_refused(pastis_h5, mtlcc_h5, tmp_path, capsys):
    rc = main(train_args(mtlcc_h5, tmp_path, "m", "--data.folds", "[]", "--data.val_folds", "[]",
                         "--data.test_folds", "[]", "--data.split", "train"))
    assert "MTLCC has no instance annotations" in _one_error_line(capsys, rc)
    plain = tmp_path / "plain.h5"
    shutil.copy(pastis_h5, plain)
    with h5py.File(plain, "r+") as f:
        f.attrs["has_instances"] = 0
    rc = main(train_args(plain, tmp_path, "p"))
    line = _one_error_line(capsys, rc)
    assert str(plain) in line and "without instance annotations" in line
    rc = main(train_args(pastis_h5, tmp_path, "s", "--model.name", "utae", "--model.kwargs", "{}"))
    assert "not a panoptic model" in _one_error_line(capsys, rc)


def tiny_model():
    from sitskit.models import build

    return build("utae_paps", **json.loads(TINY))


def test_finite_loss_and_a_step_on_patches_without_parcels(pastis_h5):
    from accelerate import Accelerator

    from sitskit.data import build_dataset, pad_collate
    from sitskit.finetune.engine_panoptic import train_one_epoch
    from sitskit.models.paps_loss import PaPsLoss
    from sitskit.stage.state import TrainState

    ds = build_dataset(pastis_h5, task="panoptic", folds=[1], num_dates=5)
    batch = pad_collate([ds[0], ds[0]])
    for k in ("instances", "zones", "object_class"):
        batch[k] = torch.zeros_like(batch[k])
    batch["heatmap"] = torch.zeros_like(batch["heatmap"])
    batch["size"] = torch.zeros_like(batch["size"])
    batch["semantic"] = torch.zeros_like(batch["semantic"])
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class NoSchedule:
        def step_update(self, step):
            pass

    cfg = {"run": {"seed": 0, "log_every": 1}, "optim": {"grad_accum": 1, "clip_grad": 1.0}}
    logged, state = [], TrainState()
    stop = train_one_epoch(model, [batch], opt, NoSchedule(), Accelerator(cpu=True), state, cfg, PaPsLoss(),
                           total_steps=1, on_step=logged.append)
    assert stop and state.step == 1 and len(logged) == 1
    assert np.isfinite(logged[0]["loss"]) and logged[0]["loss_size"] == 0.0 and logged[0]["loss_shape"] == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the centre term trains


def test_tuning_uses_the_whole_selection_and_recombined_maps_equal_a_fresh_forward(pastis_h5):
    from accelerate import Accelerator

    from sitskit.data import build_dataset, pad_collate
    from sitskit.finetune.engine_panoptic import evaluate_panoptic
    from sitskit.finetune.panoptic import PanopticMeter, tune_min_confidence
    from sitskit.models.paps_loss import PaPsLoss

    torch.manual_seed(0)
    model = tiny_model().eval()
    ds = build_dataset(pastis_h5, task="panoptic", folds=[1, 2, 3], num_dates=5)
    acc = Accelerator(cpu=True)
    loss = PaPsLoss()
    conf, iou = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            b = pad_collate([ds[i]])
            out = model(b["image"], b["dates"], b["pad_mask"], zones=b["zones"])
            r = loss(out, b)
            conf.append(r["mask_confidence"])
            iou.append(r["mask_iou"])
    expected, _ = tune_min_confidence(torch.cat(conf), torch.cat(iou))
    model.min_confidence.fill_(0.99)
    result = evaluate_panoptic(model, ds, acc, 20, loss, tune=True)
    assert result["min_confidence"] == expected == pytest.approx(float(model.min_confidence))
    assert result["tune_centres"] == sum(len(c) for c in conf) and result["n_patches"] == 3
    meter = PanopticMeter()
    with torch.no_grad():
        for i in range(len(ds)):
            b = pad_collate([ds[i]])
            out = model(b["image"], b["dates"], b["pad_mask"])
            meter.update(out["pano_instance"], out["pano_class"], b["instances"], b["semantic"])
    assert torch.equal(result["table"], meter.table)


def test_prediction_writer_checks_instances(pastis_h5, tmp_path):
    from sitskit.finetune.predictions import PredictionWriter, read_instances

    sem = np.zeros((32, 32), np.uint8)
    inst = np.zeros((32, 32), np.int32)
    inst[:4, :4], inst[10:, 10:] = 1, 2
    with PredictionWriter(tmp_path / "a.h5", pastis_h5, model="utae_paps", checkpoint="c", instances=True) as w:
        with pytest.raises(UserFacingError, match="needs instances"):
            w.write("10000", sem)
        with pytest.raises(UserFacingError, match=r"ids must lie in 0\.\.1"):
            w.write("10000", sem, instances=inst, instance_class=[3], instance_score=[0.9])
        with pytest.raises(UserFacingError, match="2 instance classes but 1 scores"):
            w.write("10000", sem, instances=inst, instance_class=[3, 4], instance_score=[0.9])
        with pytest.raises(UserFacingError, match=r"instances \(4, 4\)"):
            w.write("10000", sem, instances=inst[:4, :4], instance_class=[3], instance_score=[0.9])
        w.write("10000", sem, instances=inst, instance_class=[3, 4], instance_score=[0.9, 0.5])
    attrs, items = read_instances(tmp_path / "a.h5", pastis_h5)
    assert attrs["has_instances"] == 1
    (key, s, i, c, p), = list(items)
    assert np.array_equal(s, sem)
    assert key == "10000" and np.array_equal(i, inst) and c.tolist() == [3, 4] and p.dtype == np.float32
    with PredictionWriter(tmp_path / "b.h5", pastis_h5, model="utae", checkpoint="c") as w:
        with pytest.raises(UserFacingError, match="without instances=True"):
            w.write("10000", sem, instances=inst, instance_class=[3, 4], instance_score=[0.9, 0.5])
        w.write("10000", sem)
    with pytest.raises(UserFacingError, match="has no instance maps"):
        read_instances(tmp_path / "b.h5", pastis_h5)


def test_instance_outlines_and_heatmap_only_epochs():
    from sitskit.finetune.panoptic_stage import heatmap_only_epochs, instance_outlines

    inst = np.zeros((5, 6), np.int64)
    inst[1:4, 1:4] = 1  # a 3x3 parcel: its 8 border pixels are outline, its centre is not
    inst[:, 4:] = 2     # a parcel along the image's right edge: every pixel touches 0, 2 or the border
    edge = instance_outlines(inst)
    assert edge[1:4, 1:4].sum() == 8 and not edge[2, 2]
    assert edge[:, 4:].all() and not edge[inst == 0].any()
    assert [heatmap_only_epochs(e) for e in (2, 19, 20, 30, 100, 400)] == [0, 0, 1, 1, 5, 5]
