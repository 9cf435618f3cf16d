"""`python data_prep.py verify FILE.h5`: read every chunk of every dataset and report the corrupt patches.

Format version 2 stores a Fletcher32 checksum with every chunk of the image series and label maps
(docs/hdf5_format.md), so any changed byte fails its read. Version 1 files have no checksums: every chunk is
still read (a chunk that no longer decompresses is found, a changed value that still decodes is not).
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import h5py
from tqdm import tqdm

from .h5schema import CHECKSUM_VERSION, is_checksum_error, open_sits


@dataclass
class VerifyReport:
    path: Path
    format_version: int
    n_datasets: int = 0
    n_chunks: int = 0
    n_patches: int = 0
    unchecked: list[str] = field(default_factory=list)      # chunked datasets without a checksum (format >= 2)
    bad: dict[str, list[str]] = field(default_factory=dict)  # patch key (or dataset path) -> problems

    @property
    def ok(self) -> bool:
        return not self.bad

    def lines(self) -> list[str]:
        out = [f"{self.path}: patch {key}: " + "; ".join(problems) if not key.startswith("/")
               else f"{self.path}: {key}: " + "; ".join(problems) for key, problems in self.bad.items()]
        if self.format_version < CHECKSUM_VERSION:
            out.append(f"{self.path}: format version {self.format_version} stores no checksums: every chunk was "
                       "read, but a changed value that still decodes cannot be detected (re-convert to get them)")
        elif self.unchecked:
            out.append(f"{self.path}: {len(self.unchecked)} chunked dataset(s) without a checksum, e.g. "
                       f"{self.unchecked[0]}")
        n_bad_patches = sum(not k.startswith("/") for k in self.bad)
        if self.ok:
            out.append(f"{self.path}: OK, {self.n_patches} patches, {self.n_datasets} datasets, "
                       f"{self.n_chunks} chunks read" + (", checksums verified"
                                                        if self.format_version >= CHECKSUM_VERSION else ""))
        else:
            out.append(f"{self.path}: CORRUPT, {n_bad_patches} of {self.n_patches} patches"
                       + (f" and {len(self.bad) - n_bad_patches} other dataset(s)" if len(self.bad) > n_bad_patches
                          else "") + " unreadable; convert the source again (--force) or restore the file")
        return out


# what h5py raises for damaged structures: OSError (I/O, filters), RuntimeError (B-tree / heap), KeyError
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip("'\"")
    return text.splitlines()[0] if text else type(exc).__name__


def _walk(group: h5py.Group, prefix: str, found: list, broken: list) -> None:
    """Every dataset below `group` into `found` as (path, dataset); unreadable links into `broken`."""
    try:
        names = list(group.keys())
    except H5_ERRORS as exc:
        broken.append((prefix or "/", exc))
        return
    for name in names:
        path = f"{prefix}/{name}" if prefix else name
        try:
            obj = group[name]
        except H5_ERRORS as exc:
            broken.append((path, exc))
            continue
        if isinstance(obj, h5py.Group):
            _walk(obj, path, found, broken)
        elif isinstance(obj, h5py.Dataset):
            found.append((path, obj))


def _owner(path: str) -> tuple[str, str]:
    """'patches/10000/S2/data' -> ('10000', 'S2/data'); anything else -> ('/index/key', 'index/key')."""
    parts = path.split("/")
    if parts[0] == "patches" and len(parts) > 2:
        return parts[1], "/".join(parts[2:])
    return "/" + path.lstrip("/"), path


def _describe(failures: list[tuple[str, int | None, str]]) -> list[str]:
    """[(dataset in the patch, date index or None, why)] -> ['S2/data dates 3, 7: checksum mismatch', …]."""
    grouped: dict[tuple[str, str], list[int]] = defaultdict(list)
    for name, date, why in failures:
        grouped[(name, why)] += [] if date is None else [date]
    grouped = {k: sorted(set(dates)) for k, dates in grouped.items()}  # a date is several chunks (64-row bands)
    return [f"{name}{' date' + ('s' if len(dates) > 1 else '') + ' ' + ', '.join(map(str, dates)) if dates else ''}"
            f": {why}" for (name, why), dates in grouped.items()]


def verify_file(path: str | os.PathLike, progress: bool | None = None) -> VerifyReport:
    """Read every chunk of every dataset of a sitskit HDF5 file. `progress`: tqdm's `disable` inverted
    (None: a bar only on a terminal)."""
    path = Path(path)
    failures: dict[str, list[tuple[str, int | None, str]]] = defaultdict(list)
    with open_sits(path) as f:
        report = VerifyReport(path, int(f.attrs["format_version"]))
        datasets, broken = [], []
        _walk(f, "", datasets, broken)
        for where, exc in broken:
            key, inner = _owner(where)
            failures[key].append((inner or "/", None, f"unreadable structure ({_reason(exc)})"))
        plan = []
        for name, d in datasets:
            try:
                chunks = [()] if d.chunks is None or d.size == 0 else list(d.iter_chunks())
                plan.append((name, d, chunks, bool(d.fletcher32)))
            except H5_ERRORS as exc:
                key, inner = _owner(name)
                failures[key].append((inner, None, f"unreadable layout ({_reason(exc)})"))
        report.n_datasets = len(datasets)
        if report.format_version >= CHECKSUM_VERSION:
            report.unchecked = [name for name, d, _, checked in plan if d.chunks is not None and not checked]
        bar = tqdm(total=sum(len(c) for _, _, c, _ in plan), unit="chunk", desc=f"verify {path.name}",
                   disable=None if progress is None else not progress)
        for name, d, chunks, checked in plan:
            key, inner = _owner(name)
            for sel in chunks:
                try:
                    d[sel] if sel else d[()]
                except H5_ERRORS as exc:
                    why = "checksum mismatch" if is_checksum_error(exc, checked) else \
                        f"cannot decode ({_reason(exc)})"
                    one_date = d.ndim == 4 and d.chunks[0] == 1 and sel if d.chunks else False
                    failures[key].append((inner, sel[0].start if one_date else None, why))
                report.n_chunks += 1
                bar.update(1)
        bar.close()
        stored = {_owner(name)[0] for name, _ in datasets if name.startswith("patches/")}
        try:
            keys = [k.decode() for k in f["index/key"][()]]
        except H5_ERRORS:  # reported above as an unreadable dataset or link
            keys = sorted(stored)
        for key in keys:
            if key not in stored and key not in failures:
                failures[key].append(("group", None, "listed in /index but missing"))
        report.n_patches = len(keys)
    report.bad = {key: _describe(items) for key, items in failures.items()}
    return report


def run_verify(path: str | os.PathLike) -> int:
    """CLI: print one line per bad patch and a summary; 0 when clean, 1 when something is corrupt."""
    report = verify_file(path)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
