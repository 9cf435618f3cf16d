"""An interrupted conversion (SIGKILL after k patches, or in the middle of one) leaves no file that looks
complete, and --resume finishes it into a file identical to an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from h5compare import h5_differences

from sitskit.data_prep import convert_pastis
from sitskit.data_prep.h5schema import _TEST_KILL_HOOK_ENV as KILL_HOOK_ENV


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from sitskit.simulate import simulate_pastis
    root = tmp_path_factory.mktemp("pastis") / "PASTIS"
    simulate_pastis(root, n_patches=5, size=32, seed=11, with_s1=True)
    return root


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> Path:
    return convert_pastis(source, tmp_path_factory.mktemp("ref") / "ref.h5", sats=("S2", "S1A"))


def _cli(args: list[str], kill_after: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(KILL_HOOK_ENV, None)
    if kill_after is not None:
        env[KILL_HOOK_ENV] = kill_after
    # Ctrl-C reaches a foreground process: start the child with the default SIGINT disposition even when this
    # test runs as a background job (`cmd &` ignores SIGINT, and Python then installs no KeyboardInterrupt)
    return subprocess.run([sys.executable, "-m", "sitskit.data_prep.cli", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# SIGKILL between patches / halfway through the 4th patch; Ctrl-C (SIGINT) or SIGTERM after 2 patches
@pytest.mark.parametrize("kill_after", ["2", "3.5", "2:INT", "2:TERM"])
def test_resume_after_an_interrupt_gives_an_identical_file(kill_after, source, reference, tmp_path):
    out = tmp_path / "out.h5"
    args = ["pastis", "--root", str(source), "--out", str(out), "--sats", "S2", "S1A", "--workers", "2"]
    killed = _cli(args, kill_after)
    if ":" in kill_after:  # Ctrl-C and SIGTERM: the partial file is kept for --resume, exit 130 / 143
        expected = 130 if kill_after.endswith("INT") else 143
        assert killed.returncode == expected and "--resume" in killed.stderr + killed.stdout, killed.stderr
        kill_after = kill_after.split(":")[0]
    else:
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()  # nothing that looks complete
    partial = tmp_path / "out.h5.partial"
    with h5py.File(partial, "r") as f:
        assert f.attrs["complete"] == 0
        done = [k for k in f["patches"] if f["patches"][k].attrs.get("complete", 0)]
        assert len(done) == int(float(kill_after))
        assert len(f["patches"]) == len(done) + (1 if "." in kill_after else 0)
    finished = _cli(args + ["--resume"])
    assert finished.returncode == 0, finished.stderr
    assert not partial.exists()
    assert h5_differences(reference, out, ignore_attrs=("created_utc", "source_path")) == []


def test_resume_refuses_other_settings(source, tmp_path):
    out = tmp_path / "out.h5"
    args = ["pastis", "--root", str(source), "--out", str(out)]
    assert _cli(args, "1").returncode == -signal.SIGKILL
    res = _cli(args + ["--resume", "--compression", "gzip"])
    assert res.returncode == 2 and "different settings" in res.stderr
    assert not out.exists()


def test_h5_differences_sees_a_changed_value_and_attribute(reference, tmp_path):
    import shutil
    copy = tmp_path / "copy.h5"
    shutil.copy(reference, copy)
    assert h5_differences(reference, copy) == []
    with h5py.File(copy, "r+") as f:
        key = min(f["patches"])
        f[f"patches/{key}/S2/data"][0, 0, 0, 0] += 1
        f[f"patches/{key}"].attrs["fold"] = 9
    assert h5_differences(reference, copy) == [f"patches/{key}: attribute fold differs",
                                               f"patches/{key}/S2/data: values differ"]
