"""End-to-end pre-training on a tiny simulated PASTIS: loss, MLflow, export, exact resume, 2 CPU ranks.

Runs go through subprocesses (as `accelerate launch` would) with a tiny model: 5 patches of 32x32,
8 dates per sample, a 1-layer encoder of width 32.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from sitskit.pretrain.main_pretrain import main

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "{widths: [8, 32], n_head: 4, d_ffn: 32, n_layers: 1}"
STEPS = 24

# Wraps main() for fault injection and inspection without touching the production code:
#   KILL_AT_STEP=k   SIGKILL (or SIGINT with KILL_SIGNAL=INT) this process at the k-th optimiser step
#   DUMP_DIR=dir     record "<epoch> <id>" of every sample read per rank, and each rank's final weights
HELPER = textwrap.dedent("""
    import os, signal, sys
    import torch
    import sitskit.data
    import sitskit.pretrain.main_pretrain as mp

    kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
    if kill_at:
        original_step, calls = torch.optim.AdamW.step, [0]
        def step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "KILL")))
            return original_step(self, *args, **kwargs)
        torch.optim.AdamW.step = step

    dump = os.environ.get("DUMP_DIR")
    if dump:
        rank = os.environ.get("RANK", "0")
        original_build = sitskit.data.build_dataset
        def build_dataset(*args, **kwargs):
            ds = original_build(*args, **kwargs)
            base = type(ds)
            class Recording(base):
                def __getitem__(self, i):
                    sample = base.__getitem__(self, i)
                    with open(os.path.join(dump, f"ids_rank{rank}.txt"), "a") as f:
                        f.write(f"{self.epoch} {sample['id']}\\n")
                    return sample
            ds.__class__ = Recording
            return ds
        sitskit.data.build_dataset = build_dataset
        original_train = mp.Pretrainer.train
        def train(self):
            code = original_train(self)
            weights = self.accelerator.unwrap_model(self.model).state_dict()
            torch.save({k: v.cpu() for k, v in weights.items()}, os.path.join(dump, f"weights_rank{rank}.pt"))
            return code
        mp.Pretrainer.train = train

    sys.exit(mp.main(sys.argv[1:]))
""")


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory):
    from sitskit.data_prep.pastis import convert_pastis
    from sitskit.simulate import simulate_pastis

    root = tmp_path_factory.mktemp("pastis")
    raw = simulate_pastis(root / "PASTIS", n_patches=5, size=32, seed=0)
    return convert_pastis(raw, root / "pastis.h5")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrain_runs")
    (d / "helper.py").write_text(HELPER)
    return d


def run_args(h5, name, *extra):
    return ["--data.path", str(h5), "--output.dir", "ckpt", "--output.name", name, "--output.save_every", "4",
            "--data.num_dates", "8", "--data.batch_size", "2", "--train.max_steps", str(STEPS),
            "--optim.lr", "3e-3", "--optim.warmup_steps", "2", "--run.log_every", "1", "--run.progress", "false",
            "--model.kwargs.encoder_kwargs", TINY_MODEL, *extra]


def launch(workdir, args, env_extra=None, processes=1, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}", PYTHONPATH=str(REPO / "src"),
               **(env_extra or {}))
    if processes == 1:
        cmd = [sys.executable, "helper.py", *args]
    else:  # `accelerate launch --cpu --num_processes 2` silently runs one process; this runs two
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "helper.py", *args]
    return subprocess.run(cmd, check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def reference_run(tiny_h5, workdir):
    """An uninterrupted run: the baseline for the loss, MLflow, export and resume tests."""
    out = launch(workdir, run_args(tiny_h5, "ref"))
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir / "ckpt" / "ref"


def final_weights(run_dir):
    states = sorted((run_dir / "state").glob("step_*"))
    assert states and states[-1].name == f"step_{STEPS:08d}", states
    return load_file(str(states[-1] / "model.safetensors"))


def mlflow_run(workdir, run_dir):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "encoder" / "config.json").read_text())["mlflow_run_id"]
    return client, client.get_run(run_id)


def test_short_run_loss_falls(reference_run, workdir):
    client, run = mlflow_run(workdir, reference_run)
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == STEPS
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:3]) / 3, losses


def test_mlflow_run_holds_params_metrics_tags_and_artifacts(reference_run, workdir):
    client, run = mlflow_run(workdir, reference_run)
    params = run.data.params
    assert params["optim.lr"] == "0.003" and params["mask.strategy"] == "time-space"
    assert params["mask.ratio"] == "0.4" and params["data.num_dates"] == "8"
    assert params["model.kwargs.encoder_kwargs.n_layers"] == "1"  # nested sections are flattened too
    metrics = run.data.metrics
    for key in ("loss", "lr", "samples_per_s", "masked_share", "eligible_date_share", "loss_band/B8"):
        assert key in metrics, key
    assert metrics["samples_per_s"] > 0 and metrics["lr"] > 0
    # exact sampling: the masked share of the valid pixel-dates is 0.4 of the eligible (gated) share
    shares = client.get_metric_history(run.info.run_id, "masked_share")
    eligible = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eligible_date_share")}
    for m in shares:
        assert abs(m.value - 0.4 * eligible[m.step]) < 0.01
    assert 0 < metrics["masked_share"] <= 0.4
    tags = run.data.tags
    assert tags["torch.version"] == torch.__version__ and tags["git.commit"] and tags["hardware.cpu"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "reconstruction.png", "encoder"} <= artifacts, artifacts
    assert run.info.status == "FINISHED"


def test_exported_encoder_loads_with_from_pretrained(reference_run, tiny_h5, workdir):
    from sitskit.data import build_dataset, pad_collate
    from sitskit.models import from_pretrained, read_pretrained_config

    encoder = from_pretrained(reference_run / "encoder")
    meta = read_pretrained_config(reference_run / "encoder")
    assert meta["name"] == "stcln_encoder" and meta["step"] == STEPS
    _, run = mlflow_run(workdir, reference_run)
    assert meta["mlflow_run_id"] == run.info.run_id
    state = final_weights(reference_run)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[f"encoder.{key}"]), key  # the export is the trained encoder
    batch = pad_collate([build_dataset(tiny_h5, num_dates=8)[i] for i in range(2)])
    feats, _ = encoder(batch["image"], batch["dates"], batch["pad_mask"])
    assert feats.shape[:2] == (2, 8) and torch.isfinite(feats).all()


def test_sigkill_then_resume_equals_uninterrupted_run(reference_run, tiny_h5, workdir):
    killed = launch(workdir, run_args(tiny_h5, "killed"), {"KILL_AT_STEP": "11"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = workdir / "ckpt" / "killed"
    assert [p.name for p in sorted((run_dir / "state").glob("step_*"))] == ["step_00000004", "step_00000008"]
    assert not (run_dir / "encoder").exists()
    resumed = launch(workdir, run_args(tiny_h5, "killed", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected, got = final_weights(reference_run), final_weights(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_ctrl_c_saves_state_and_exits_130(tiny_h5, workdir):
    out = launch(workdir, run_args(tiny_h5, "interrupted"), {"KILL_AT_STEP": "6", "KILL_SIGNAL": "INT"})
    assert out.returncode == 130, out.stderr[-2000:]
    states = sorted((workdir / "ckpt" / "interrupted" / "state").glob("step_*"))
    assert states[-1].name == "step_00000006"  # saved after the batch in progress, not at save_every
    assert "--resume" in out.stdout + out.stderr


def test_two_cpu_processes_shard_data_and_agree_on_weights(tiny_h5, workdir):
    dump = workdir / "ddp_dump"
    dump.mkdir()
    out = launch(workdir, run_args(tiny_h5, "ddp", "--train.max_steps", "4", "--data.batch_size", "1",
                                       "--data.holdout_patches", "0"),
                 {"DUMP_DIR": str(dump)}, processes=2)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = {}
    for rank in (0, 1):
        for line in (dump / f"ids_rank{rank}.txt").read_text().split("\n"):
            if line:
                epoch, pid = line.split()
                seen.setdefault((rank, int(epoch)), set()).add(pid)
    # 5 patches (none held out), 2 ranks, batch 1: each epoch has 3 steps per rank (one id repeated to even the shards)
    assert seen[(0, 0)] and seen[(1, 0)]
    assert seen[(0, 0)] != seen[(1, 0)]
    assert len(seen[(0, 0)] | seen[(1, 0)]) == 5  # together the ranks cover the dataset
    assert len(seen[(0, 0)] & seen[(1, 0)]) <= 1  # only the padding sample may repeat
    w0, w1 = torch.load(dump / "weights_rank0.pt"), torch.load(dump / "weights_rank1.pt")
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key


def test_paper_loop_one_step_per_crop_with_accumulation(tiny_h5, workdir):
    """5 patches (none held out), batch 2 -> 3 batches; 32x32 in 16x16 crops -> 4 micro-batches each; 2 per step -> 6 steps."""
    out = launch(workdir, run_args(tiny_h5, "per_crop", "--train.max_steps", "null", "--train.epochs", "1",
                                   "--data.step_per_crop", "true", "--data.step_crop", "16",
                                   "--optim.grad_accum", "2", "--mask.strategy", "time",
                                   "--data.holdout_patches", "0"))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = workdir / "ckpt" / "per_crop"
    assert [p.name for p in sorted((run_dir / "state").glob("step_*"))][-1] == "step_00000006"
    client, run = mlflow_run(workdir, run_dir)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    assert main(["--data.path", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5 does not exist" in capsys.readouterr().err
    assert main(["--data.path", str(tmp_path / "x.h5"), "--mask.strategy", "pixels"]) == 2
    assert "mask.strategy: expected one of time-space, time, space, got pixels" in capsys.readouterr().err
    assert main(["--mask.ratios", "0.4"]) == 2
    assert "unrecognized arguments: --mask.ratios" in capsys.readouterr().err


def test_an_existing_run_is_never_overwritten_silently(tmp_path, capsys):
    fake = tmp_path / "x.h5"
    fake.write_bytes(b"")  # never read: the check comes first
    old_state = tmp_path / "runs" / "r" / "state" / "step_00000001"
    old_state.mkdir(parents=True)
    args = ["--data.path", str(fake), "--output.dir", str(tmp_path / "runs"), "--output.name", "r",
            "--run.tracking", "false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run (state/)" in err and "--resume" in err and "--output.overwrite" in err
    assert old_state.exists()
    # with --output.overwrite the old states go; the run then fails on the (empty) data file, not the folder
    assert main(args + ["--output.overwrite", "true"]) == 2
    assert "already holds a run" not in capsys.readouterr().err
    assert not old_state.exists()


def test_sigterm_saves_marks_mlflow_killed_and_resume_from_the_folder_alone_is_exact(reference_run, tiny_h5,
                                                                                      workdir):
    """SIGTERM (Slurm, Kubernetes, `timeout`) saves like Ctrl-C; `--resume RUN_DIR` alone restores the saved
    config (the run was started with a dozen overrides) and ends with the uninterrupted run's weights."""
    out = launch(workdir, run_args(tiny_h5, "termed"), {"KILL_AT_STEP": "10", "KILL_SIGNAL": "TERM"})
    assert out.returncode == 143, out.stderr[-2000:]
    run_dir = workdir / "ckpt" / "termed"
    assert max((run_dir / "state").glob("step_*")).name == "step_00000010"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    progress = json.loads((run_dir / "state" / "step_00000010" / "progress.json").read_text())
    run_id = progress["train_state"]["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    resumed = launch(workdir, ["--resume", "ckpt/termed"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = final_weights(reference_run), final_weights(run_dir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no duplicate points after the resume


def test_resume_refuses_changed_settings_and_never_guesses(reference_run, tiny_h5, workdir):
    changed = launch(workdir, run_args(tiny_h5, "ref", "--resume", "--optim.lr", "1e-2"))
    assert changed.returncode == 2
    assert "cannot change optim.lr: 0.003 -> 0.01" in changed.stderr and "Traceback" not in changed.stderr
    unnamed = launch(workdir, ["--resume", "--data.path", str(tiny_h5)])
    assert unnamed.returncode == 2 and "never picks a run" in unnamed.stderr


def test_a_pickle_in_a_state_folder_is_refused_and_never_runs(reference_run, tiny_h5, workdir, tmp_path):
    """Accelerate's custom-state files are unpickled on load; sitskit states hold only safetensors + JSON."""
    import shutil

    victim = workdir / "ckpt" / "tampered"
    shutil.copytree(reference_run, victim)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    last = max((victim / "state").glob("step_*"))
    (last / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    out = launch(workdir, ["--resume", "ckpt/tampered", "--train.max_steps", str(STEPS + 2)])
    assert out.returncode == 2 and "custom_checkpoint_0.pkl" in out.stderr and "never unpickled" in out.stderr
    assert not marker.exists()
    # a pickle disguised as the optimiser's JSON/safetensors files is rejected as a corrupt state, not executed
    (last / "custom_checkpoint_0.pkl").unlink()
    (last / "optimizer.safetensors").write_bytes(pickle.dumps(Payload()))
    out = launch(workdir, ["--resume", "ckpt/tampered", "--train.max_steps", str(STEPS + 2)])
    assert out.returncode == 2 and "corrupt state" in out.stderr and not marker.exists()


def test_mixed_precision_comes_from_accelerate_unless_the_config_sets_it(tiny_h5, workdir):
    out = launch(workdir, run_args(tiny_h5, "bf16", "--train.max_steps", "2"),
                 {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert out.returncode == 0, out.stderr[-2000:]
    _client, run = mlflow_run(workdir, workdir / "ckpt" / "bf16")
    assert run.data.tags["mixed_precision"] == "bf16"
    fp16 = launch(workdir, run_args(tiny_h5, "fp16", "--train.mixed_precision", "fp16", "--train.cpu", "true"))
    assert fp16.returncode == 2 and "fp16 needs a GPU" in fp16.stderr


def test_mlflow_holds_the_encoder_weights_dataset_and_version(reference_run, workdir, tmp_path):
    client, run = mlflow_run(workdir, reference_run)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "encoder")}
    assert names == {"encoder/config.json", "encoder/model.safetensors"}
    assert [a.path for a in client.list_artifacts(run.info.run_id)].count("config.yaml") == 1
    tags = run.data.tags
    assert tags["sitskit.version"] and len(tags["data.training.sha256_index"]) == 64
    assert Path(tags["data.training.path"]).is_absolute()
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest
    holdout = client.get_metric_history(run.info.run_id, "holdout/loss")
    assert holdout and all(m.value > 0 for m in holdout)
    for key in ("holdout/temporal_interpolation", "holdout/neighbour_mean"):
        assert client.get_metric_history(run.info.run_id, key)[0].value > 0


def test_an_unwritable_output_is_one_line(tiny_h5, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--data.path", str(tiny_h5), "--output.dir", str(blocker), "--output.name", "r",
                 "--run.tracking", "false"]) == 2
    assert "cannot write the run folder" in capsys.readouterr().err


def test_a_full_disk_while_saving_leaves_nothing_and_is_one_line(tmp_path, monkeypatch):
    import errno

    from sitskit.errors import UserFacingError
    from sitskit.stage.state import atomic_save

    def write(folder):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserFacingError, match="No space left on device"):
        atomic_save(tmp_path / "state", 5, write)
    assert list((tmp_path / "state").iterdir()) == []


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, capsys):
    """Two processes never write one run folder: the second gets one clear error and changes nothing."""
    import fcntl
    import os

    fake = tmp_path / "x.h5"
    fake.write_bytes(b"")
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "state" / "step_00000001").mkdir(parents=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another process" holds the folder
    args = ["--data.path", str(fake), "--output.dir", str(tmp_path / "runs"), "--output.name", "r",
            "--run.tracking", "false", "--output.overwrite", "true"]
    try:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "is in use by another running process (pid 4242)" in err and str(run_dir) in err
        assert (run_dir / "state" / "step_00000001").exists()  # overwrite did not touch it
    finally:
        os.close(fd)
    assert main(args) == 2  # released: the run proceeds (and fails on the empty data file, not the folder)
    assert "in use" not in capsys.readouterr().err
    assert not (run_dir / "state" / "step_00000001").exists()
