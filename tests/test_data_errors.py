"""data_prep on bad input and bad places: damaged files for `info`, a full disk or read-only output, an
--out that cannot be created, an interrupted .partial on a rerun, `show --out`, the usage line, a closed
pipe. Each is one line naming the file, exit code 2, and nothing left behind."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from sitskit.data_prep import h5schema
from sitskit.data_prep.cli import build_parser
from sitskit.data_prep.cli import main as data_prep
from sitskit.data_prep.verify import verify_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from sitskit.simulate import simulate_pastis
    return simulate_pastis(tmp_path_factory.mktemp("src") / "PASTIS", n_patches=4, size=32, seed=2)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err[len("error: "):].strip()


def convert_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["pastis", "--root", str(source), "--out", str(out), *extra]


# ------------------------------------------------------------------------------------------------ info
@pytest.mark.parametrize("damage, named", [
    (lambda f: f.attrs.__delitem__("dataset"), "attribute 'dataset'"),
    (lambda f: f.attrs.__delitem__("sats"), "attribute 'sats'"),
    (lambda f: f.__delitem__("index"), "group /index"),
    (lambda f: f["index"].__delitem__("class_pixels"), "/index/class_pixels"),
    (lambda f: f.attrs.__delitem__("bands_S2"), "attribute 'bands_S2'"),
])
def test_info_names_what_a_damaged_file_lacks(damage, named, pastis_h5, tmp_path, capsys):
    h5 = tmp_path / "damaged.h5"
    shutil.copy(pastis_h5, h5)
    with h5py.File(h5, "r+") as f:
        damage(f)
    assert data_prep(["info", str(h5)]) == 2
    assert one_error_line(capsys) == f"{h5}: damaged sitskit file: missing {named}"


def test_info_on_a_good_file_and_on_what_is_not_hdf5(pastis_h5, tmp_path, capsys):
    assert data_prep(["info", str(pastis_h5)]) == 0
    out = capsys.readouterr().out
    assert "sitskit format v2" in out and "patches: 5  size: 32x32 (5)" in out
    text = tmp_path / "notes.h5"
    text.write_text("hello\n")
    assert data_prep(["info", str(text)]) == 2
    assert one_error_line(capsys).startswith(f"{text}: not a readable HDF5 file (")
    assert data_prep(["info", str(tmp_path)]) == 2
    assert one_error_line(capsys) == f"{tmp_path}: is a directory, not an HDF5 file"
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2]
    assert data_prep(["info", str(other)]) == 2
    assert one_error_line(capsys) == f"{other}: not a sitskit HDF5 file (missing format attribute)"


# ------------------------------------------------------------------------------------ full disk (mocked)
def fail_on_write(monkeypatch, after: int, code: int = errno.ENOSPC) -> None:
    """Every image-series write after the first `after` ones raises OSError(code), as a full disk does."""
    real = h5schema.CompressedSeries.write_into
    calls = []

    def write_into(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise OSError(code, os.strerror(code))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5schema.CompressedSeries, "write_into", write_into)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_full_disk_is_one_line_and_removes_the_partial_file(workers, source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.h5"
    fail_on_write(monkeypatch, after=2)
    assert data_prep(convert_args(source, out, "--workers", workers)) == 2
    assert one_error_line(capsys) == f"cannot write {out}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_full_disk_with_resume_keeps_the_partial_file_and_says_so(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.h5"
    with monkeypatch.context() as m:
        fail_on_write(m, after=2)
        assert data_prep(convert_args(source, out, "--resume")) == 2
    partial = tmp_path / "out.h5.partial"
    assert one_error_line(capsys) == (f"cannot write {out}: No space left on device; {partial} kept: free "
                                      "space, then run again with --resume")
    with h5py.File(partial, "r") as f:  # the first two patches were committed before the failure
        assert sorted(k for k in f["patches"] if f["patches"][k].attrs.get("complete")) == ["10000", "20000"]
    assert data_prep(convert_args(source, out, "--resume")) == 0
    assert not partial.exists() and verify_file(out).ok and verify_file(out).n_patches == 4


def test_read_only_output_folder_is_one_line(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.h5"
    fail_on_write(monkeypatch, after=0, code=errno.EROFS)
    assert data_prep(convert_args(source, out)) == 2
    assert one_error_line(capsys) == f"cannot write {out}: Read-only file system"
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder_is_refused_before_any_work(source, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a mode 555 folder stays writable")
        assert data_prep(convert_args(source, locked / "out.h5")) == 2
        assert one_error_line(capsys) == f"cannot write {locked / 'out.h5'}: Permission denied"
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_out_in_a_missing_folder_or_under_a_file(source, tmp_path, capsys):
    missing = tmp_path / "nope" / "out.h5"
    assert data_prep(convert_args(source, missing)) == 2
    assert one_error_line(capsys) == f"{missing}: output folder {missing.parent} does not exist"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert data_prep(convert_args(source, afile / "out.h5")) == 2
    assert one_error_line(capsys) == f"{afile / 'out.h5'}: {afile} is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# -------------------------------------------------------------------------------- full disk (real tmpfs)
def _can_mount_tmpfs() -> bool:
    try:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                "mount -t tmpfs -o size=64k tmpfs /mnt"], check=False, capture_output=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not shutil.which("unshare") or not _can_mount_tmpfs(),
                                 reason="needs unprivileged user+mount namespaces (unshare) for a small tmpfs")


def convert_on_tmpfs(source: Path, mnt: Path, options: str, *args: str,
                     prefill: bool = False) -> tuple[subprocess.CompletedProcess, str]:
    """Run a conversion into <mnt>/out.h5 on a private tmpfs mounted with `options` (`prefill`: full before
    the start); returns the process and what was left in the tmpfs (listed before the namespace goes away)."""
    mnt.mkdir()
    fill = 'dd if=/dev/zero of="$MNT/fill" bs=4k 2>/dev/null; ' if prefill else ""
    script = (f'mount -t tmpfs -o "$0" tmpfs "$MNT" || exit 99; {fill}"$@"; rc=$?; echo "LEFT:$(ls -A "$MNT")"; '
              'exit $rc')
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, options,
           sys.executable, "-m", "sitskit.data_prep.cli", *convert_args(source, mnt / "out.h5", *args)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MNT=str(mnt)))
    left = proc.stdout.rsplit("LEFT:", 1)[-1].strip()
    return proc, left


@needs_tmpfs
@pytest.mark.parametrize("workers, prefill", [("0", False), ("2", False), ("0", True)])
def test_a_really_full_disk_is_one_line_and_frees_the_space(workers, prefill, source, tmp_path):
    # 4 patches of ~0.55 MB each: a 1 MiB file system fills up in the second patch (or is full at the start)
    proc, left = convert_on_tmpfs(source, tmp_path / "mnt", "size=1m", "--workers", workers, prefill=prefill)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: cannot write {tmp_path / 'mnt' / 'out.h5'}: No space left on device\n"
    assert left == ("fill" if prefill else "")


@needs_tmpfs
def test_a_read_only_file_system_is_one_line(source, tmp_path):
    proc, left = convert_on_tmpfs(source, tmp_path / "mnt", "ro,size=1m")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: cannot write {tmp_path / 'mnt' / 'out.h5'}: Read-only file system\n"
    assert left == ""


# ------------------------------------------------------------------------------- an interrupted .partial
def interrupt_after(monkeypatch, patches: int) -> None:
    """Ctrl-C after `patches` committed patches (what a user's interrupt leaves)."""
    real = h5schema.H5Writer.write_patch

    def write_patch(self, *args, **kwargs):
        if self._committed == patches:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5schema.H5Writer, "write_patch", write_patch)


def test_a_rerun_without_resume_never_deletes_an_interrupted_partial(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.h5"
    partial = tmp_path / "out.h5.partial"
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        assert data_prep(convert_args(source, out)) == 130
    before = partial.stat()
    capsys.readouterr()
    assert data_prep(convert_args(source, out)) == 2
    assert one_error_line(capsys) == (f"{partial}: an interrupted conversion of {out} is there; pass --resume "
                                      "to continue it or --force to start over")
    after = partial.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert not out.exists()
    assert data_prep(convert_args(source, out, "--force")) == 0  # start over
    assert not partial.exists() and verify_file(out).ok and verify_file(out).n_patches == 4
    assert data_prep(convert_args(source, out)) == 2  # --force is also what replaces a finished file
    assert one_error_line(capsys) == f"{out}: output exists; pass --force to overwrite it"


def test_a_damaged_partial_is_one_line_on_resume(source, tmp_path, capsys):
    out, partial = tmp_path / "out.h5", tmp_path / "out.h5.partial"
    partial.write_bytes(b"\0" * 4096)
    assert data_prep(convert_args(source, out, "--resume")) == 2
    assert one_error_line(capsys).startswith(f"{partial}: cannot reopen the interrupted conversion (")
    assert partial.exists()  # the user decides: --force starts over
    assert data_prep(convert_args(source, out, "--force")) == 0 and not partial.exists()


# --------------------------------------------------------------------------------------------- show, CLI
def test_show_creates_missing_folders_and_refuses_a_file_as_folder(source, tmp_path, capsys):
    out = tmp_path / "figs" / "deep" / "p.png"
    assert data_prep(["show", str(source), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blocker = tmp_path / "figs" / "deep" / "p.png" / "q.png"
    assert data_prep(["show", str(source), "--out", str(blocker)]) == 2
    assert one_error_line(capsys) == f"--out {blocker}: {out} is a file, not a folder"
    assert data_prep(["show", str(source), "--out", str(tmp_path)]) == 2
    assert one_error_line(capsys) == f"--out {tmp_path}: is a directory; give a .png file name"


def _run(cmd: list[str], close_stdout: bool = False) -> tuple[int, str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not close_stdout:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        return proc.returncode, proc.stdout, proc.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env, text=True)
    proc.stdout.close()  # the reader is gone before anything is written (`… | head -0`)
    err = proc.stderr.read()
    return proc.wait(timeout=60), "", err


def test_usage_names_the_command_the_user_typed(monkeypatch):
    rc, out, _ = _run([sys.executable, "data_prep.py", "verify", "--help"])
    assert rc == 0 and out.startswith("usage: data_prep.py verify ")
    for argv0, prog in [("/venv/bin/sitskit-data-prep", "sitskit-data-prep"), ("./data_prep.py", "data_prep.py"),
                        ("/src/sitskit/data_prep/cli.py", "python -m sitskit.data_prep.cli")]:
        monkeypatch.setattr(sys, "argv", [argv0])
        assert build_parser().format_usage().startswith(f"usage: {prog} [-h] COMMAND"), argv0


def test_help_into_a_closed_pipe_is_quiet():
    rc, _, err = _run([sys.executable, "data_prep.py", "--help"], close_stdout=True)
    assert (rc, err) == (0, "")
