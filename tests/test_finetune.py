"""The fine-tuning stage end to end on the shared tiny simulated PASTIS (5 patches of 32x32, one per fold):
train on folds 1-3, validate on 4, test on 5, with a tiny STCLN; evaluate, predict, resume, lineage, errors."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sitskit.finetune.main_finetune import main

REPO = Path(__file__).resolve().parents[1]
TINY = "{widths: [8, 32], n_head: 2, d_ffn: 16, n_layers: 1}"
EPOCHS = 4  # 3 training patches x 2 crops of 16x16, batch 2 -> 3 steps per epoch

HELPER = textwrap.dedent("""
    import os, signal, sys
    import torch
    kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
    if kill_at:
        original, calls = torch.optim.AdamW.step, [0]
        def step(self, *a, **k):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *a, **k)
        torch.optim.AdamW.step = step
    from sitskit.finetune.main_finetune import main
    sys.exit(main(sys.argv[1:]))
""")


def train_args(h5, name, *extra):
    return ["--data.path", str(h5), "--data.folds", "[1,2,3]", "--data.val_folds", "[4]", "--data.test_folds", "[5]",
            "--data.crop", "16", "--data.crop_cells", "[[0,0],[1,1]]", "--data.num_dates", "8",
            "--data.batch_size", "2", "--model.name", "stcln", "--model.kwargs.encoder_kwargs", TINY,
            "--optim.lr", "3e-3", "--train.epochs", str(EPOCHS), "--run.log_every", "1", "--run.progress", "false",
            "--output.dir", "ckpt", "--output.name", name, "--output.save_every", "2", "--eval.figures", "2", *extra]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune_runs")
    (d / "helper.py").write_text(HELPER)
    return d


def launch(workdir, args, env_extra=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"),
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}", **(env_extra or {}))
    return subprocess.run([sys.executable, "helper.py", *args], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def encoder(pastis_h5, workdir):
    """A tiny pre-trained encoder (pretrain.py export) and its MLflow run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"),
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    out = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "--data.path", str(pastis_h5),
                          "--data.crop", "16", "--data.num_dates", "8", "--data.batch_size", "2",
                          "--data.holdout_patches", "1", "--model.kwargs.encoder_kwargs", TINY,
                          "--train.max_steps", "4", "--run.progress", "false", "--output.dir", "ckpt",
                          "--output.name", "pre"], cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir / "ckpt" / "pre" / "encoder"


@pytest.fixture(scope="module")
def run(pastis_h5, encoder, workdir):
    """An uninterrupted fine-tune from the pre-trained encoder, given as an MLflow runs:/ URI."""
    run_id = json.loads((encoder / "config.json").read_text())["mlflow_run_id"]
    out = launch(workdir, train_args(pastis_h5, "ref", "--model.pretrained", f"runs:/{run_id}/encoder"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test: OA" in out.stdout  # the metrics table is printed
    return workdir / "ckpt" / "ref"


def mlflow_client(workdir):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def test_run_folder_holds_best_model_metrics_and_figures(run):
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["stage"] == "finetune" and meta["class_names"][0] == "Background" and meta["num_classes"] == 20
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    for key in ("OA", "mIoU", "mF1", "kappa", "per_class", "confusion", "classes", "protocol", "n_patches",
                "n_pixels"):
        assert key in metrics
    assert metrics["n_patches"] == 1 and metrics["n_pixels"] > 0  # fold 5: one patch, every labelled pixel
    assert np.asarray(metrics["confusion"]).shape == (20, 20)
    assert {p.name for p in (run / "test").glob("*.png")} == {"confusion.png", "iou.png", "patches.png"}


def test_mlflow_records_lineage_validation_and_figures(run, encoder, workdir):
    client = mlflow_client(workdir)
    run_id = json.loads((run / "model" / "config.json").read_text())["mlflow_run_id"]
    r = client.get_run(run_id)
    pre_id = json.loads((encoder / "config.json").read_text())["mlflow_run_id"]
    assert r.data.tags["pretrained.run_id"] == pre_id
    assert len(r.data.tags["pretrained.sha256"]) == 64 and r.data.tags["pretrained.source"].startswith("runs:/")
    assert len(client.get_metric_history(run_id, "val/mIoU")) == EPOCHS
    assert client.get_metric_history(run_id, "test/OA")
    artifacts = {a.path for a in client.list_artifacts(run_id, "test")}
    assert "test/confusion.png" in artifacts and "test/metrics.json" in artifacts
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/config.json", "model/model.safetensors"}


def test_pretrained_weights_reach_the_model(run, encoder, pastis_h5, workdir):
    """Before training the fine-tuned encoder equals the export: check the first convolution moved from it
    but is far closer to it than to a fresh init (lr 3e-3, 12 steps)."""
    pre = load_file(str(encoder / "model.safetensors"))
    tuned = load_file(str(run / "model" / "model.safetensors"))
    key = "inc.double_conv.0.weight"
    fresh = torch.nn.init.kaiming_uniform_(torch.empty_like(pre[key]))
    assert (tuned["encoder." + key] - pre[key]).norm() < 0.5 * (fresh - pre[key]).norm()


def test_evaluate_covers_every_patch_once_and_predictions_reproduce_it(run, pastis_h5, workdir, capsys):
    from sitskit.finetune import commands

    assert commands.main(["evaluate", "--checkpoint", str(run), "--data", str(pastis_h5), "--all",
                          "--out", str(workdir / "eval_all")]) == 0
    by_ckpt = json.loads((workdir / "eval_all" / "metrics.json").read_text())
    assert by_ckpt["n_patches"] == 5
    pred = workdir / "pred.h5"
    # 3 patches per forward read by 2 DataLoader workers: scored below against the one-by-one evaluation
    assert commands.main(["predict", "--checkpoint", str(run), "--data", str(pastis_h5), "--all", "--out",
                          str(pred), "--probs", "--batch-size", "3", "--workers", "2"]) == 0
    with h5py.File(pred) as p, h5py.File(pastis_h5) as d:
        assert sorted(p["patches"]) == sorted(d["patches"])
        for key in d["patches"]:
            sem, probs = p[f"patches/{key}/semantic"], p[f"patches/{key}/probs"]
            assert sem.dtype == np.uint8 and sem.shape == d[f"patches/{key}/semantic"].shape
            assert probs.dtype == np.float16 and probs.shape == (20, *sem.shape)
            assert p[f"patches/{key}"].attrs["footprint"] == d[f"patches/{key}"].attrs["footprint"]
        assert list(p.attrs["class_names"]) == [c for c in d.attrs["class_names"]]
    assert commands.main(["evaluate", "--predictions", str(pred), "--data", str(pastis_h5),
                          "--out", str(workdir / "eval_pred")]) == 0
    by_pred = json.loads((workdir / "eval_pred" / "metrics.json").read_text())
    assert by_pred["confusion"] == by_ckpt["confusion"]
    assert by_pred["OA"] == pytest.approx(by_ckpt["OA"]) and by_pred["mIoU"] == pytest.approx(by_ckpt["mIoU"])


def test_sigkill_then_resume_gives_the_same_final_weights(run, pastis_h5, encoder, workdir):
    run_id = json.loads((encoder / "config.json").read_text())["mlflow_run_id"]
    args = train_args(pastis_h5, "killed", "--model.pretrained", f"runs:/{run_id}/encoder")
    out = launch(workdir, args, {"KILL_AT_STEP": "7"})
    assert out.returncode == -9
    resumed = launch(workdir, ["--resume", "ckpt/killed"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(run / "model" / "model.safetensors"))
    b = load_file(str(workdir / "ckpt" / "killed" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = lambda d: max((d / "state").glob("step_*"))
    assert last(run).name == last(workdir / "ckpt" / "killed").name


def test_early_season_cutoff_reaches_the_model(pastis_h5):
    """No date after the cut-off is read: the model only ever sees dates up to it."""
    from accelerate import Accelerator

    from sitskit.data import build_dataset
    from sitskit.finetune.engine_finetune import evaluate
    from sitskit.models import build

    cut_doy = 150
    ds = build_dataset(pastis_h5, task="semantic", max_doy=cut_doy)
    seen = []
    model = build("stcln", in_channels=10, num_classes=20, encoder_kwargs={"widths": [8, 32], "n_head": 2,
                                                                           "d_ffn": 16, "n_layers": 1})
    original = model.forward

    def forward(x, dates, pad_mask=None):
        seen.append(dates[~pad_mask] if pad_mask is not None else dates.flatten())
        return original(x, dates, pad_mask)

    model.forward = forward
    evaluate(model, ds, Accelerator(cpu=True), 20)
    full = build_dataset(pastis_h5, task="semantic")
    for i in range(len(full)):
        s = full[i]
        allowed = set(s["dates"][s["doy"] <= cut_doy].tolist())
        assert allowed and len(allowed) < len(s["dates"])
    days = set(torch.cat(seen).tolist())
    max_allowed = max(int(full[i]["dates"][full[i]["doy"] <= cut_doy].max()) for i in range(len(full)))
    assert days and max(days) <= max_allowed


def test_an_all_void_batch_gives_a_zero_loss_not_nan():
    from sitskit.finetune.engine_finetune import masked_cross_entropy

    logits = torch.randn(2, 20, 4, 4, requires_grad=True)
    ignore = torch.zeros(20, dtype=torch.bool)
    ignore[19] = True
    loss = masked_cross_entropy(logits, torch.full((2, 4, 4), 19), ignore)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and not logits.grad.any()
    target = torch.full((2, 4, 4), 19)
    target[0, 0, 0] = 3
    manual = torch.nn.functional.cross_entropy(logits[0, :, 0, 0][None], torch.tensor([3]))
    assert masked_cross_entropy(logits, target, ignore).item() == pytest.approx(manual.item())


def test_evaluation_splits_patches_over_processes_without_repeats(pastis_h5):
    """Each of 2 ranks scores its own patches; together every patch exactly once (no padded repeats)."""
    from sitskit.data import build_dataset
    from sitskit.finetune.engine_finetune import evaluate
    from sitskit.models import build

    class FakeAccelerator:  # rank r of 2, reduce = identity (each rank's own share)
        device = torch.device("cpu")
        is_main_process = True
        num_processes = 2

        def __init__(self, rank):
            self.process_index = rank

        def reduce(self, t, reduction="sum"):
            return t

        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

    ds = build_dataset(pastis_h5, task="semantic")
    model = build("utae", in_channels=10, num_classes=20)
    seen = {0: [], 1: []}
    totals = 0
    for rank in (0, 1):
        _conf, n = evaluate(model, ds, FakeAccelerator(rank), 20,
                           on_patch=lambda key, *a, r=rank: seen[r].append(key))
        totals += n
    assert sorted(seen[0] + seen[1]) == sorted(ds.ids) and not set(seen[0]) & set(seen[1]) and totals == 5


@pytest.mark.parametrize("name, window", [("utae", None), ("stcln", 16)])
def test_batched_evaluation_with_workers_equals_one_patch_at_a_time(pastis_h5, name, window):
    """3 patches per forward (padded to the longest series) read by 2 DataLoader workers: the same
    probabilities for every patch, in the same order, as one patch per forward read in this process."""
    from accelerate import Accelerator

    from sitskit.data import build_dataset
    from sitskit.finetune.engine_finetune import evaluate
    from sitskit.models import build

    ds = build_dataset(pastis_h5, task="semantic")
    torch.manual_seed(0)
    kwargs = {"encoder_kwargs": {"widths": [8, 32], "n_head": 2, "d_ffn": 16, "n_layers": 1}} if name == "stcln" else {}
    model = build(name, in_channels=10, num_classes=20, **kwargs)
    runs = {}
    for batch, workers in ((1, 0), (3, 2)):
        seen = []
        conf, n = evaluate(model, ds, Accelerator(cpu=True), 20, window=window, batch_size=batch,
                           num_workers=workers, on_patch=lambda key, image, truth, probs, seen=seen:
                           seen.append((key, probs)))
        runs[batch] = conf, n, seen
    (conf1, n1, one), (conf3, n3, batched) = runs[1], runs[3]
    assert n1 == n3 == len(ds) and [k for k, _ in one] == [k for k, _ in batched] == list(ds.ids)
    for (_, a), (_, b) in zip(one, batched):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(conf1, conf3)


@pytest.mark.parametrize("case", ["missing_checkpoint", "encoder_not_finetuned", "other_dataset", "other_classes",
                                  "unknown_split", "cutoff_before_first_date", "missing_pretrained"])
def test_bad_input_is_one_line_and_exit_2(case, run, encoder, pastis_h5, mtlcc_h5, tmp_path, capsys):
    from sitskit.finetune import commands

    if case == "missing_checkpoint":
        code, want = commands.main(["evaluate", "--checkpoint", str(tmp_path / "nope"), "--data", str(pastis_h5)]), \
            "no model/config.json"
    elif case == "encoder_not_finetuned":
        code, want = commands.main(["evaluate", "--checkpoint", str(encoder), "--data", str(pastis_h5)]), \
            "is not a fine-tuned model"
    elif case == "other_dataset":
        code, want = commands.main(["evaluate", "--checkpoint", str(run), "--data", str(mtlcc_h5)]), \
            "a mtlcc file; the checkpoint was trained on pastis"
    elif case == "other_classes":
        import shutil

        other = tmp_path / "p.h5"
        shutil.copy(pastis_h5, other)
        with h5py.File(other, "r+") as f:
            names = list(f.attrs["class_names"])
            f.attrs["class_names"] = names[:-1] + ["Something else"]
        code, want = commands.main(["evaluate", "--checkpoint", str(run), "--data", str(other)]), \
            "class names differ"
    elif case == "unknown_split":
        code, want = commands.main(["evaluate", "--checkpoint", str(run), "--data", str(pastis_h5),
                                    "--split", "holdout"]), "split"
    elif case == "cutoff_before_first_date":
        code = main(train_args(pastis_h5, "early", "--data.max_date", "2018-09-02", "--run.tracking", "false",
                               "--output.dir", str(tmp_path)))
        want = "early-season cut-off 2018-09-02 is before the first date"
    else:
        code = main(train_args(pastis_h5, "x", "--model.pretrained", str(tmp_path / "none"), "--run.tracking",
                               "false", "--output.dir", str(tmp_path)))
        want = "model.pretrained"
    err = capsys.readouterr().err
    assert code == 2, err
    assert want in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_region_predict_writes_a_stitched_geotiff_and_parcel_table(tmp_path, capsys):
    """simulate --format geotiff → data_prep geotiff → fine-tune → predict --geotiff --parcels."""
    rasterio = pytest.importorskip("rasterio")
    from sitskit.data_prep.cli import main as data_prep
    from sitskit.finetune import commands
    from sitskit.simulate.geotiff import simulate_geotiff

    sim = simulate_geotiff(tmp_path / "scene", size=64, seed=1, n_dates=6)
    h5 = tmp_path / "region.h5"
    assert data_prep(["geotiff", "--images", str(sim), "--labels", str(sim / "parcels.gpkg"), "--class-field", "CODE",
                      "--class-map", str(sim / "crop_codes.csv"), "--out", str(h5), "--patch-size", "32",
                      "--stride", "16"]) == 0
    assert main(["--data.path", str(h5), "--model.name", "utae", "--data.batch_size", "2", "--train.max_steps", "2",
                 "--run.tracking", "false", "--run.progress", "false", "--output.dir", str(tmp_path / "ckpt"),
                 "--output.name", "region"]) == 0
    tif, gpkg = tmp_path / "map.tif", tmp_path / "parcels.gpkg"
    assert commands.main(["predict", "--checkpoint", str(tmp_path / "ckpt" / "region"), "--data", str(h5),
                          "--geotiff", str(tif), "--parcels", str(gpkg)]) == 0
    first = min(sim.glob("S2_*.tif"))
    with rasterio.open(tif) as m, rasterio.open(first) as s:
        assert m.crs == s.crs and m.transform == s.transform and (m.width, m.height) == (s.width, s.height)
        assert m.dtypes[0] == "uint8"
    import geopandas

    table = geopandas.read_file(gpkg)
    assert len(table) > 0 and {"agree"} <= set(table.columns)


def test_two_cpu_processes_train_validate_and_score_each_patch_once(pastis_h5, workdir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), ACCELERATE_USE_CPU="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "helper.py",
           *train_args(pastis_h5, "ddp", "--train.epochs", "1", "--data.val_folds", "[3,4]", "--data.test_folds",
                       "[1,2,5]")]
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((workdir / "ckpt" / "ddp" / "test" / "metrics.json").read_text())
    with h5py.File(pastis_h5) as f:
        labelled = sum(int((f[f"patches/{k}/semantic"][()] != 19).sum()) for k in ("10000", "10001", "40000"))
    assert metrics["n_patches"] == 3 and metrics["n_pixels"] == labelled  # 3 patches over 2 ranks, none twice


def test_sweep_runs_nested_cells_and_writes_the_table_and_plot(pastis_h5, workdir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"),
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    preset = workdir / "sweep.yaml"
    preset.write_text(textwrap.dedent(f"""
        data: {{folds: [1, 2, 3], test_folds: [5], num_dates: 6, batch_size: 2}}
        model: {{name: stcln, kwargs: {{encoder_kwargs: {TINY}}}}}
        train: {{max_steps: 1}}
        run: {{progress: false}}
    """))
    cmd = [sys.executable, str(REPO / "finetune.py"), "sweep", "labels", "--config", str(preset), "--data",
           str(pastis_h5), "--seeds", "0", "1", "--fractions", "1.0", "--out", "sweep", "--jobs", "2"]
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = workdir / "sweep"
    rows = (sweep / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("label,x,seed,run,parameters,train_seconds,patches_per_s")
    metrics = json.loads((sweep / "scratch-1.0-s0" / "test" / "metrics.json").read_text())
    assert metrics["parameters"] > 0 and metrics["train_seconds"] > 0 and metrics["test_patches_per_s"] > 0
    assert metrics["hardware"]["torch_threads"] == 1 and metrics["hardware"]["cpu_count"] >= 1
    assert f"| {metrics['parameters']:,} |" in (sweep / "results.md").read_text()
    assert "scratch" in (sweep / "results.md").read_text() and (sweep / "labels.png").stat().st_size > 0
    client = mlflow_client(workdir)
    child_ids = [json.loads((sweep / f"scratch-1.0-s{s}" / "model" / "config.json").read_text())["mlflow_run_id"]
                 for s in (0, 1)]
    parents = {client.get_run(r).data.tags.get("mlflow.parentRunId") for r in child_ids}
    assert len(parents) == 1 and None not in parents
    assert client.get_run(parents.pop()).data.tags["sweep.kind"] == "labels"
    again = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0 and "[1/2] $" not in again.stdout  # finished cells are not run again


def test_frozen_encoder_and_encoder_learning_rate(encoder):
    from sitskit.finetune.model_setup import build_finetune_model, parameter_groups

    cfg = {"name": "stcln", "kwargs": {}, "freeze_encoder": True, "encoder_lr": None}
    probe = build_finetune_model(cfg, 10, 20, encoder)
    assert not any(p.requires_grad for p in probe.encoder.parameters())
    groups = parameter_groups(probe, 1e-3, 0.01, None)
    head = {id(p) for p in probe.head.parameters()}
    assert {id(p) for g in groups for p in g["params"]} == head  # only the head learns (linear probe)
    cfg.update(freeze_encoder=False, encoder_lr=1e-5)
    model = build_finetune_model(cfg, 10, 20, encoder)
    groups = parameter_groups(model, 1e-3, 0.01, 1e-5)
    enc = {id(p) for p in model.encoder.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= enc or not ids & enc
        assert g["lr"] == (1e-5 if ids <= enc else 1e-3)
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"]) else 0.01)
    assert groups[-1]["lr"] == 1e-3


def test_class_weights_inverse_frequency_ignore_void():
    from sitskit.finetune.model_setup import class_weights

    counts = torch.tensor([100.0, 300.0, 0.0, 50.0])
    ignore = torch.tensor([False, False, False, True])
    w = class_weights("inverse_frequency", counts, ignore)
    assert w[2] == 0 and w[3] == 0  # absent class and void
    assert w[0] / w[1] == pytest.approx(3.0) and w[w > 0].mean() == pytest.approx(1.0)
    with pytest.raises(Exception, match="3 weights for 4 classes"):
        class_weights([1.0, 2.0, 3.0], counts, ignore)


def test_same_seeded_run_with_noise_twice_gives_identical_metrics_and_weights(pastis_h5, workdir):
    """The noise study's hardware question, on one machine: the same seeded CPU run (noise augmentation on)
    repeated gives the same confusion matrix and bit-identical weights."""
    from safetensors.torch import load_file

    results = []
    for name in ("noise-a", "noise-b"):
        out = launch(workdir, train_args(pastis_h5, name, "--data.noise_sigma", "0.05", "--data.noise_prob", "0.5",
                                         "--train.epochs", "1", "--run.deterministic", "true", "--run.seed", "3"))
        assert out.returncode == 0, out.stderr[-3000:]
        metrics = json.loads((workdir / "ckpt" / name / "test" / "metrics.json").read_text())
        results.append((metrics, load_file(workdir / "ckpt" / name / "model" / "model.safetensors")))
    (m1, w1), (m2, w2) = results
    assert m1["confusion"] == m2["confusion"] and m1["mIoU"] == m2["mIoU"]
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_sigterm_stops_a_sweep_and_its_running_cells(pastis_h5, workdir):
    """SIGTERM to the sweep (a batch scheduler's stop): the running cells are stopped too (they save their
    state), nothing is left running, and the sweep exits 143."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    preset = workdir / "sweep_term.yaml"
    preset.write_text(textwrap.dedent(f"""
        data: {{folds: [1, 2, 3], test_folds: [5], num_dates: 6, batch_size: 2}}
        model: {{name: stcln, kwargs: {{encoder_kwargs: {TINY}}}}}
        train: {{max_steps: 100000}}
        output: {{save_every: 2}}
        run: {{progress: false}}
    """))
    out_dir = workdir / "sweep_term"
    cmd = [sys.executable, str(REPO / "finetune.py"), "sweep", "labels", "--config", str(preset), "--data",
           str(pastis_h5), "--seeds", "0", "1", "--fractions", "1.0", "--out", str(out_dir), "--jobs", "2"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out_dir.glob("*/state/step_*")):  # the cells are training
        time.sleep(0.5)
    assert list(out_dir.glob("*/state/step_*")), "the cells never saved a state"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM" in err
    left = subprocess.run(["pgrep", "-f", str(out_dir)], capture_output=True, text=True, check=False).stdout.split()
    assert left == []  # no cell keeps running
