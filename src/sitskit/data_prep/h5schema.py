"""The sitskit HDF5 layout (docs/hdf5_format.md) and the single writer every converter uses.

One file per dataset::

    /                      attrs: format, format_version, dataset, reference_date, bands, classes, …
    /norm/<sat>/mean,std   source normalisation statistics, one row per fold (PASTIS) or one row (MTLCC)
    /patches/<key>/<sat>/data   int16 [T, C, H, W] (S1: float32/float16 as in the source), chunks of one date,
                                all bands, 64 rows (`series_chunks`)
    /patches/<key>/<sat>/date   ISO dates (bytes, 'YYYY-MM-DD') [T]; day (int32, days since the
                                reference date), doy (int16), year (int16) [T]
    /patches/<key>/semantic     uint8 [H, W] contiguous class index; more label maps per dataset
    /index/…                    one row per complete patch, written last (cheap dataset construction)

Integrity (format version 2): every chunked dataset (image series and label maps) carries HDF5's Fletcher32
checksum, the last filter of the pipeline, so a changed byte in a stored chunk fails the read instead of
returning other values; `verify_file` reads every chunk. Version 1 files (no checksums) are still read.

Atomicity: everything is written to ``<out>.partial``; a patch group gets ``complete = 1`` only after all
its datasets are written and the file is flushed; the index and ``/``'s ``complete`` attribute are written
last, then the file is renamed to ``<out>``. ``--resume`` reopens ``<out>.partial``, drops any group that is
not complete and continues with the patches not yet written.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import gc
import json
import os
import re
import signal
import sys
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from sitskit.errors import UserFacingError

FORMAT_NAME = "sitskit-sits"
FORMAT_VERSION = 2
CHECKSUM_VERSION = 2  # first format version with Fletcher32 on every chunked dataset
PARTIAL_SUFFIX = ".partial"
# Attributes that legitimately differ between two conversions of the same source (excluded from identity).
PROVENANCE_TIME_ATTRS = ("created_utc",)
# Test hook: SIGKILL ourselves after this many committed patches ("2") or in the middle of the next one
# ("2.5"), to prove that --resume reproduces an uninterrupted conversion; "2:INT" sends SIGINT (Ctrl-C).
_TEST_KILL_HOOK_ENV = "SITSKIT_TEST_KILL_AFTER"  # private: used by the test suite only


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("sitskit")
    except PackageNotFoundError:  # running from a bare checkout
        return "unknown"


ZSTD_LEVEL, GZIP_LEVEL = 5, 4


def compression_options(spec: str) -> dict:
    """h5py create_dataset keywords for "zstd[:level]", "gzip[:level]" or "none".

    zstd (default, level 5 of 1-9) is byte-shuffle + zstd inside the Blosc filter of hdf5plugin (id 32001).
    Measured on simulated PASTIS S2 (one-date chunks): 0.597x the raw size and ~1.3x the decoding speed of
    hdf5plugin's plain Zstd filter with HDF5 shuffle (0.612x). gzip (shuffle + deflate, default level 4) is
    readable by any HDF5 tool without plugins, but ~3.5x slower to read. Every choice, "none" included,
    adds the Fletcher32 checksum (h5py appends it as the last filter: checked first when reading).
    """
    name, _, level = spec.partition(":")
    limits = {"zstd": (1, 9, ZSTD_LEVEL), "gzip": (1, 9, GZIP_LEVEL)}
    if name == "none" and not level:
        return {"fletcher32": True}
    if name not in limits:
        raise UserFacingError(f"--compression {spec!r}: use zstd[:1-9], gzip[:1-9] or none")
    lo, hi, default = limits[name]
    try:
        value = int(level) if level else default
    except ValueError:
        value = -1
    if not lo <= value <= hi:
        raise UserFacingError(f"--compression {spec!r}: {name} level must be an integer in {lo}..{hi}")
    if name == "zstd":
        return {**hdf5plugin.Blosc(cname="zstd", clevel=value, shuffle=hdf5plugin.Blosc.SHUFFLE),
                "fletcher32": True}
    return {"shuffle": True, "compression": "gzip", "compression_opts": value, "fletcher32": True}


CHUNK_ROWS = 64


def series_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape of a [T, C, H, W] series: one date, every band, CHUNK_ROWS full-width rows.

    One date per chunk, so that a date subset or an early-season cut-off decodes only those dates; 64-row
    bands, so that a 32 x 32 training crop of a 128 x 128 PASTIS patch decodes one or two of its two bands
    instead of the whole date: crop reads 1.2x faster for +1.3 % storage, full-patch reads unchanged
    (64 x 64 tiles: crops 1.75x faster, but full patches 13 % slower and +2.4 % storage; docs/hdf5_format.md)."""
    _, c, h, w = shape
    return (1, c, min(h, CHUNK_ROWS), w)


class CompressedSeries:
    """A [T, C, H, W] series already cut into its chunks (`series_chunks`) and run through the HDF5 filter
    pipeline (in a reader process), so that the single writer only copies bytes (`write_direct_chunk`)."""

    def __init__(self, arr: np.ndarray, compression: dict):
        self.shape, self.dtype = arr.shape, arr.dtype
        # An in-memory HDF5 file applies exactly the filters the writer declares for the dataset.
        with h5py.File(f"mem-{id(arr)}", "w", driver="core", backing_store=False) as mem:
            d = mem.create_dataset("x", data=arr, chunks=series_chunks(arr.shape), **compression)
            offsets = [tuple(s.start for s in sel) for sel in d.iter_chunks()]
            self.chunks = [(offset, d.id.read_direct_chunk(offset)) for offset in offsets]

    def write_into(self, group: h5py.Group, name: str, compression: dict) -> None:
        d = group.create_dataset(name, shape=self.shape, dtype=self.dtype, chunks=series_chunks(self.shape),
                                 **compression)
        for offset, (mask, data) in self.chunks:
            d.id.write_direct_chunk(offset, data, mask)


def precompress(sats: dict[str, dict], compression_name: str) -> None:
    """Replace each non-empty series by its CompressedSeries (called in reader processes)."""
    opts = compression_options(compression_name)
    for s in sats.values():
        if isinstance(s["data"], np.ndarray) and s["data"].shape[0] > 0:
            s["data"] = CompressedSeries(s["data"], opts)


class OutputWriteError(UserFacingError):
    """The output could not be written (disk full, read-only file system, no permission): one line."""


def os_error_reason(exc: OSError) -> str:
    """'No space left on device' for an OSError from Python or from HDF5 (whose message holds 'errno = N')."""
    code = exc.errno
    if code is None:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code:
        return os.strerror(code)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class DataReadError(UserFacingError):
    """A stored chunk failed its checksum or could not be decoded; the message names the file and the patch.

    Picklable (one str argument). torch's DataLoader re-raises a worker's exception as
    `type(exc)("Caught … in DataLoader worker process N.\nOriginal Traceback …")`: that form is reduced back
    to the original one-line message, so the user still reads one line.
    """

    def __init__(self, message: str):
        lines = [line for line in str(message).splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Caught "):
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            message = lines[-1].removeprefix(prefix)
        super().__init__(message)


def is_checksum_error(exc: BaseException, checksummed: bool) -> bool:
    """Whether a failed chunk read is a checksum mismatch. h5py reports only HDF5's outermost message
    ("filter returned failure during read"); Fletcher32 is the first filter run on read, so on a checksummed
    dataset a failing filter is the checksum (the decompressor only ever sees verified bytes)."""
    text = str(exc).lower()
    return "fletcher32" in text or "checksum" in text or (checksummed and "filter returned failure" in text)


def has_checksums(f: h5py.File) -> bool:
    return int(f.attrs.get("format_version", 1)) >= CHECKSUM_VERSION


def read_error(path: str | os.PathLike, key: str, exc: Exception, checksummed: bool) -> DataReadError:
    """The one-line error for an HDF5 read of patch `key` that failed (checksum mismatch or undecodable)."""
    if is_checksum_error(exc, checksummed):
        what = "data is corrupt (checksum mismatch in a stored chunk)"
    else:
        what = f"data cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return DataReadError(f"{path}: patch {key}: {what}; run `python data_prep.py verify {path}`")


def check_output_location(out: Path) -> None:
    """One clear line for an --out that cannot be created: missing or non-folder parent, no write access."""
    parent = out.parent
    if not parent.exists():
        raise UserFacingError(f"{out}: output folder {parent} does not exist")
    if not parent.is_dir():
        raise UserFacingError(f"{out}: {parent} is a file, not a folder")
    if out.is_dir():
        raise UserFacingError(f"{out}: output path is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
        raise OutputWriteError(f"cannot write {out}: {os.strerror(errno.EROFS if read_only else errno.EACCES)}")


def _writes(method):
    """H5Writer methods: an OSError (ENOSPC, EROFS, EACCES, …) becomes one OutputWriteError line."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            self._write_failed()
            reason = os_error_reason(exc)
        # Raised outside the except block: the failed call's frames (h5py objects) are released first.
        raise OutputWriteError(f"cannot write {self.out}: {reason}")
    return wrapper


def iso_dates(dates: list[_dt.date]) -> np.ndarray:
    return np.array([d.isoformat().encode() for d in dates], dtype="S10")


class H5Writer:
    """Single writer of one conversion: temp file, per-patch commit, resume, final atomic rename."""

    def __init__(self, out: str | os.PathLike, *, force: bool = False, resume: bool = False,
                 compression: str = "zstd", settings: dict | None = None):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self.compression = compression_options(compression)
        self.settings = json.dumps(settings or {}, sort_keys=True)
        check_output_location(self.out)
        if self.out.exists() and not force:
            raise UserFacingError(f"{self.out}: output exists; pass --force to overwrite it")
        if self.partial.exists() and not (resume or force):
            raise UserFacingError(f"{self.partial}: an interrupted conversion of {self.out} is there; pass "
                                  "--resume to continue it or --force to start over")
        self.resumed, self.failed, self.keep_on_failure = False, False, resume
        if resume and self.partial.exists():
            self.file = self._reopen()
            self.resumed = True
        else:
            if resume:
                print(f"note: no interrupted conversion at {self.partial}; starting from scratch")
            self._create()
        self.patches = self.file.require_group("patches")
        self._committed = 0
        hook, _, sig = os.environ.get(_TEST_KILL_HOOK_ENV, "").partition(":")
        self._kill_after = float(hook) if hook else None
        self._kill_signal = getattr(signal, f"SIG{sig or 'KILL'}")

    def _reopen(self) -> h5py.File:
        try:
            f = h5py.File(self.partial, "r+")
        except OSError as exc:
            raise UserFacingError(f"{self.partial}: cannot reopen the interrupted conversion "
                                  f"({os_error_reason(exc)}); start over with --force (without --resume)") from None
        started_with = f.attrs.get("conversion_settings")
        if started_with != self.settings:
            f.close()
            raise UserFacingError(
                f"{self.partial}: was started with different settings ({started_with}, now "
                f"{self.settings}); resume with the same options or use --force")
        try:
            for key in list(f.get("patches", {})):
                if not f["patches"][key].attrs.get("complete", 0):
                    del f["patches"][key]  # interrupted mid-patch: redo it
        except (OSError, KeyError, RuntimeError) as exc:  # e.g. cut short by a full disk mid-write
            with contextlib.suppress(Exception):
                f.close()
            reason = str(exc).strip("'\"").splitlines()[0]
            raise UserFacingError(f"{self.partial}: the interrupted conversion is damaged ({reason}); start "
                                  "over with --force (without --resume)") from None
        return f

    @_writes
    def _create(self) -> None:
        self.partial.unlink(missing_ok=True)  # --force: start over
        # Default (earliest) libver on purpose: newer superblocks carry a "file open for write" flag
        # that a killed run leaves set, which would make the partial file unopenable for --resume.
        try:
            self.file = h5py.File(self.partial, "w", track_order=False)
            self.file.attrs["conversion_settings"] = self.settings
            self.file.attrs["complete"] = 0
        except OSError:
            self.abort()  # no empty .partial that a rerun would take for an interrupted conversion
            raise

    def _write_failed(self) -> None:
        """A write failed (typically a full disk). Unless the partial file is kept for --resume, empty it at
        once: that frees the space, so the writes HDF5 still makes while closing succeed into a file we are
        about to delete (on a full disk they fail again and again, and h5py ends in a segfault)."""
        self.failed = True
        if not self.keep_on_failure:
            with contextlib.suppress(OSError):
                os.truncate(self.partial, 0)

    def done_keys(self) -> set[str]:
        return set(self.patches.keys())

    # ----------------------------------------------------------------------------------- writing
    @_writes
    def write_root_attrs(self, attrs: dict) -> None:
        for k, v in attrs.items():
            self.file.attrs[k] = v
        self.file.attrs["format"] = FORMAT_NAME
        self.file.attrs["format_version"] = FORMAT_VERSION
        self.file.attrs["tool_version"] = tool_version()

    @_writes
    def write_array(self, where: str, name: str, arr: np.ndarray, *, chunk_dates: bool = False,
                    compress: bool = True) -> None:
        """Write one dataset; `chunk_dates`: a [T, C, H, W] series, chunked by `series_chunks`."""
        group = self.file.require_group(where)
        if name in group:
            del group[name]
        if isinstance(arr, CompressedSeries):
            arr.write_into(group, name, self.compression)
            return
        kwargs = dict(self.compression) if compress and arr.size and arr.ndim else {}
        if chunk_dates and arr.size:
            kwargs["chunks"] = series_chunks(arr.shape)
        # flush now: a write that fails (full disk) must fail here, not later when the object is released
        group.create_dataset(name, data=arr, **kwargs).flush()

    @_writes
    def write_patch(self, key: str, sats: dict[str, dict], arrays: dict[str, np.ndarray],
                    attrs: dict) -> None:
        """One patch: per-sat series {'data', 'dates': list[date], 'day', 'doy', 'year'} + label maps."""
        base = f"patches/{key}"
        if base in self.file:
            del self.file[base]
        group = self.file.create_group(base)
        for sat, s in sats.items():
            self.write_array(f"{base}/{sat}", "data", s["data"], chunk_dates=True)
            self.write_array(f"{base}/{sat}", "date", iso_dates(s["dates"]), compress=False)
            for field, dtype in (("day", np.int32), ("doy", np.int16), ("year", np.int16)):
                self.write_array(f"{base}/{sat}", field, np.asarray(s[field], dtype=dtype), compress=False)
        self._maybe_kill(half=True)
        for name, arr in arrays.items():
            self.write_array(base, name, arr)
        for k, v in attrs.items():
            group.attrs[k] = v
        group.attrs["complete"] = 1
        self.file.flush()
        self._committed += 1
        self._maybe_kill(half=False)

    def _maybe_kill(self, half: bool) -> None:
        if self._kill_after is None:
            return
        whole, frac = int(self._kill_after), self._kill_after % 1
        if (not half and not frac and self._committed == whole) or (half and frac and self._committed == whole):
            if half:  # leave a genuinely half-written patch group behind
                self.file.flush()
            self._kill_after = None  # once (SIGINT is survivable)
            os.kill(os.getpid(), self._kill_signal)

    @_writes
    def finalize(self, index: dict[str, np.ndarray], provenance: dict) -> Path:
        """Write the index, mark complete, close and rename <out>.partial -> <out>."""
        for key in list(self.patches):  # stray debris from a killed run never reaches the final file
            if not self.patches[key].attrs.get("complete", 0):
                del self.patches[key]
        if "index" in self.file:
            del self.file["index"]
        for name, arr in index.items():
            self.write_array("index", name, arr, compress=False)
        for k, v in provenance.items():
            self.file.attrs[k] = v
        self.file.attrs["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.file.attrs["complete"] = 1
        self.file.close()
        os.replace(self.partial, self.out)
        return self.out

    def abort(self, keep_partial: bool = False) -> None:
        """Close; remove the temp file unless it should stay for --resume (interrupt, failed write)."""
        hook = sys.unraisablehook
        if self.failed:  # h5py reports each metadata write that fails again while closing as "ignored"
            sys.unraisablehook = lambda _: None
        try:
            with contextlib.suppress(Exception):  # already closed / broken: the file is dropped anyway
                self.file.close()
            gc.collect()
        finally:
            sys.unraisablehook = hook
        if not keep_partial:
            self.partial.unlink(missing_ok=True)


def open_sits(path: str | os.PathLike) -> h5py.File:
    """Open a finished sitskit HDF5 file read-only, with a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise UserFacingError(f"{path}: no such file")
    if path.is_dir():
        raise UserFacingError(f"{path}: is a directory, not an HDF5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserFacingError(f"{path}: not a readable HDF5 file ({os_error_reason(exc)})") from None
    if f.attrs.get("format") != FORMAT_NAME:
        f.close()
        raise UserFacingError(f"{path}: not a sitskit HDF5 file (missing format attribute)")
    if int(f.attrs.get("format_version", -1)) > FORMAT_VERSION:
        v = f.attrs.get("format_version")
        f.close()
        raise UserFacingError(f"{path}: format version {v} is newer than this sitskit ({FORMAT_VERSION})")
    if not int(f.attrs.get("complete", 0)):
        f.close()
        raise UserFacingError(f"{path}: incomplete conversion")
    missing = missing_parts(f, attrs=("dataset", "sats"), index_fields=("key",))
    if missing:
        f.close()
        raise UserFacingError(f"{path}: damaged sitskit file: missing {missing}")
    return f


def missing_parts(f: h5py.File, attrs: tuple[str, ...] = (), index_fields: tuple[str, ...] = ()) -> str:
    """'' when every listed root attribute and /index field is there, else what is missing (one phrase)."""
    gone = [f"attribute {a!r}" for a in attrs if a not in f.attrs]
    if index_fields and not isinstance(f.get("index"), h5py.Group):
        gone.append("group /index")
    else:
        gone += [f"/index/{k}" for k in index_fields if k not in f["index"]]
    return ", ".join(gone)
