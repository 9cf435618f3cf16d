"""sitskit.finetune.predictions: write -> read round trip (arrays, attributes copied), atomic writing,
refusals (not a prediction file, other class set, unknown or missing keys, other data file), scoring."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from sitskit.errors import UserFacingError
from sitskit.finetune.metrics import compute_metrics, protocol_options
from sitskit.finetune.predictions import (
    KIND,
    PredictionWriter,
    data_index_sha,
    read_predictions,
    score_predictions,
    write_predictions,
)


def truth_maps(data_path) -> dict[str, np.ndarray]:
    with h5py.File(data_path) as f:
        return {k: f["patches"][k]["semantic"][()] for k in f["patches"]}


def perturbed(truth: dict, seed=0, k=20) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for key, t in truth.items():
        p = t.copy()
        flip = rng.random(t.shape) < 0.3
        p[flip] = rng.integers(0, k, flip.sum())
        out[key] = p
    return out


def test_round_trip_copies_arrays_and_attributes(pastis_h5, tmp_path):
    truth = truth_maps(pastis_h5)
    rng = np.random.default_rng(0)
    probs = {k: rng.random((20, *t.shape)).astype(np.float32) for k, t in truth.items()}
    keys = sorted(truth)
    items = [(k, torch.from_numpy(truth[k].astype(np.int64)), probs[k] if i % 2 == 0 else None)
             for i, k in enumerate(keys)]
    out = write_predictions(tmp_path / "pred.h5", pastis_h5, items, model="stcln", checkpoint="ckpt/run")
    assert out == tmp_path / "pred.h5" and not (tmp_path / "pred.h5.partial").exists()

    attrs, it = read_predictions(out, pastis_h5)
    assert attrs["kind"] == KIND and attrs["format_version"] == 1
    assert attrs["model"] == "stcln" and attrs["checkpoint"] == "ckpt/run"
    assert attrs["data_file"] == str(pastis_h5) and attrs["data_sha"] == data_index_sha(pastis_h5)
    assert attrs["num_classes"] == 20 and attrs["ignore_index"] == 19 and len(attrs["class_names"]) == 20
    assert attrs["created"].endswith("+00:00") and attrs["sitskit_version"]
    got = list(it)
    assert [k for k, _, _ in got] == keys
    for i, (key, semantic, p) in enumerate(got):
        assert semantic.dtype == np.uint8 and np.array_equal(semantic, truth[key])
        if i % 2 == 0:
            assert p.dtype == np.float16 and p.shape == (20, 32, 32)
            np.testing.assert_allclose(p, probs[key], atol=1e-3)
        else:
            assert p is None
    with h5py.File(out) as f, h5py.File(pastis_h5) as d:
        for key in keys:
            g, src = f["patches"][key], d["patches"][key]
            for name in ("id", "fold", "tile", "crs", "footprint"):
                assert g.attrs[name] == src.attrs[name]
            # same compression filter as the data file
            assert g["semantic"]._filters.keys() == src["semantic"]._filters.keys()
    # a subset, in the requested order, without probs
    _, it = read_predictions(out, keys=[keys[2], keys[0]], with_probs=False)
    assert [(k, p) for k, _, p in it] == [(keys[2], None), (keys[0], None)]


def test_mtlcc_geotransform_is_copied(mtlcc_h5, tmp_path):
    truth = truth_maps(mtlcc_h5)
    key = min(truth)
    out = write_predictions(tmp_path / "m.h5", mtlcc_h5, [(key, truth[key], None)], model="m", checkpoint="c")
    with h5py.File(out) as f, h5py.File(mtlcc_h5) as d:
        np.testing.assert_array_equal(f["patches"][key].attrs["geotransform"],
                                      d["patches"][key].attrs["geotransform"])
        assert f["patches"][key].attrs["crs"] == d["patches"][key].attrs["crs"]


def test_existing_output_is_refused_unless_overwrite(pastis_h5, tmp_path):
    truth = truth_maps(pastis_h5)
    key = min(truth)
    out = tmp_path / "pred.h5"
    write_predictions(out, pastis_h5, [(key, truth[key], None)], model="a", checkpoint="c")
    with pytest.raises(UserFacingError, match="exists"):
        write_predictions(out, pastis_h5, [(key, truth[key], None)], model="b", checkpoint="c")
    write_predictions(out, pastis_h5, [(key, truth[key], None)], model="b", checkpoint="c", overwrite=True)
    assert read_predictions(out)[0]["model"] == "b"


def test_failed_write_leaves_nothing(pastis_h5, tmp_path):
    truth = truth_maps(pastis_h5)
    key = min(truth)
    out = tmp_path / "pred.h5"
    with (pytest.raises(UserFacingError, match="no patch 'nope'"),
          PredictionWriter(out, pastis_h5, model="a", checkpoint="c") as w):
        w.write(key, truth[key])
        w.write("nope", truth[key])
    assert not out.exists() and not (tmp_path / "pred.h5.partial").exists()
    with PredictionWriter(out, pastis_h5, model="a", checkpoint="c") as w:
        with pytest.raises(UserFacingError, match="prediction"):
            w.write(key, truth[key][:8])
        with pytest.raises(UserFacingError, match="class index"):
            w.write(key, np.full_like(truth[key], 20))
        with pytest.raises(UserFacingError, match="probs"):
            w.write(key, truth[key], np.zeros((19, 32, 32)))


def test_reader_refusals(pastis_h5, mtlcc_h5, tmp_path):
    truth = truth_maps(pastis_h5)
    out = write_predictions(tmp_path / "pred.h5", pastis_h5, [(k, v, None) for k, v in truth.items()],
                            model="a", checkpoint="c")
    with pytest.raises(UserFacingError, match="not a sitskit prediction file"):
        read_predictions(pastis_h5)
    with pytest.raises(UserFacingError, match="no such file"):
        read_predictions(tmp_path / "missing.h5")
    with pytest.raises(UserFacingError, match="class names .* do not match"):
        read_predictions(out, mtlcc_h5)
    with pytest.raises(UserFacingError, match="no prediction for patch 'zzz'"):
        read_predictions(out, keys=["zzz"])
    fewer = shutil.copy(pastis_h5, tmp_path / "fewer.h5")
    with h5py.File(fewer, "r+") as f:
        del f["patches"][max(truth)]
    with pytest.raises(UserFacingError, match=f"not in {fewer}"):
        read_predictions(out, fewer)
    other = shutil.copy(pastis_h5, tmp_path / "other.h5")
    with h5py.File(other, "r+") as f:
        f["index"]["fold"][0] = 9
    with pytest.raises(UserFacingError, match="another data file"):
        read_predictions(out, other)
    read_predictions(out, other, check_sha=False)  # explicitly accepted


def test_scoring_truth_gives_oa_1(pastis_h5, tmp_path):
    truth = truth_maps(pastis_h5)
    out = write_predictions(tmp_path / "pred.h5", pastis_h5, [(k, v, None) for k, v in truth.items()],
                            model="a", checkpoint="c")
    for protocol in ("sitskit", "utae", "stcln"):
        m = score_predictions(out, pastis_h5, protocol)
        assert m["OA"] == 1.0 and m["mIoU"] == 1.0 and m["n_patches"] == len(truth)
        assert m["protocol"] == protocol


def test_scoring_equals_the_meter_on_the_same_maps(pastis_h5, tmp_path):
    truth = truth_maps(pastis_h5)
    pred = perturbed(truth)
    out = write_predictions(tmp_path / "pred.h5", pastis_h5, [(k, v, None) for k, v in pred.items()],
                            model="a", checkpoint="c")
    keys = sorted(truth)[:3]
    conf = np.zeros((20, 20), np.int64)
    for k in keys:
        np.add.at(conf, (truth[k].ravel(), pred[k].ravel()), 1)
    with h5py.File(pastis_h5) as f:
        names, options = list(f.attrs["class_names"]), protocol_options(f.attrs)
    for protocol in ("sitskit", "utae", "stcln"):
        m = score_predictions(out, pastis_h5, protocol, keys=keys)
        expected = compute_metrics(conf, names, protocol, **options)
        assert m["n_patches"] == 3 and m["OA"] == pytest.approx(expected["OA"]) and m["OA"] < 1
        assert m["mIoU"] == pytest.approx(expected["mIoU"]) and m["confusion"] == expected["confusion"]
