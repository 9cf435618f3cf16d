"""Drive one conversion: parallel readers (process pool), a single HDF5 writer, --skip-bad, progress bar.

A source module provides a plan (jobs = (key, args) in file order + problems found before reading) and a
picklable `read(args)` that returns a `PatchRecord` or raises `PatchError("<file>: <what is wrong>")`.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sitskit.errors import UserFacingError
from sitskit.parallel import ordered_map

from .h5schema import H5Writer, OutputWriteError, os_error_reason, precompress


class PatchError(Exception):
    """One bad source patch; the message names the patch and the file and says what is wrong."""


@dataclass
class PatchRecord:
    key: str
    sats: dict[str, dict]              # sat -> {"data", "dates", "day", "doy", "year"}
    arrays: dict[str, np.ndarray]      # label maps etc., stored under /patches/<key>/
    attrs: dict                        # patch attributes (id, fold, split, year, tile, class_pixels, …)


@dataclass
class Plan:
    jobs: list[tuple[str, object]]     # (key, read args) in output order
    read: Callable[[object], PatchRecord]
    root_attrs: dict
    extra_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # "group/name" -> array (norm stats)
    problems: list[tuple[str, str]] = field(default_factory=list)      # (what, why) found while planning
    index_fields: tuple[str, ...] = ()  # patch attrs copied into /index


def _safe_read(read, args, compression=None):
    try:
        record = read(args)
    except PatchError as exc:
        return exc
    if compression:  # compress here (in a worker: in parallel); the writer only copies finished chunks,
        precompress(record.sats, compression)  # so a failed write (full disk) raises at once, not on release
    return record


def _results(plan: Plan, todo: list[tuple[str, object]], workers: int, compression: str):
    """Yield (key, PatchRecord | PatchError) in plan order; at most 2*workers patches in flight."""
    read = functools.partial(_safe_read, plan.read, compression=compression)
    yield from zip((key for key, _ in todo), ordered_map(read, (args for _, args in todo), workers))


def run(plan: Plan, out: str | os.PathLike, *, source: str, workers: int = 0, resume: bool = False,
        skip_bad: bool = False, force: bool = False, compression: str = "zstd",
        settings: dict | None = None) -> Path:
    """Convert `plan` into `out`; returns the final path. Raises UserFacingError on the first bad patch
    (unless `skip_bad`), leaving nothing behind."""
    out = Path(out)
    if plan.problems and not skip_bad:
        what, why = plan.problems[0]
        more = f" (and {len(plan.problems) - 1} more problems)" if len(plan.problems) > 1 else ""
        raise UserFacingError(f"{what}: {why}{more}; fix the source or pass --skip-bad")
    if not plan.jobs:
        raise UserFacingError(f"{source}: no patches to convert")
    writer = H5Writer(out, force=force, resume=resume, compression=compression, settings=settings)
    skipped = list(plan.problems)
    try:
        writer.write_root_attrs(plan.root_attrs)
        for name, arr in plan.extra_arrays.items():
            group, _, leaf = name.rpartition("/")
            writer.write_array(group, leaf, arr, compress=False)
        done = writer.done_keys()
        todo = [(k, a) for k, a in plan.jobs if k not in done]
        bar = tqdm(total=len(plan.jobs), initial=len(plan.jobs) - len(todo), unit="patch",
                   desc=f"converting {Path(source).name}", disable=None)
        for key, result in _results(plan, todo, workers, compression):
            if isinstance(result, PatchError):
                if not skip_bad:
                    raise UserFacingError(f"{result}; fix the source or pass --skip-bad")
                what, _, why = str(result).partition(": ")  # messages start with "patch <id>: "
                skipped.append((what, why))
            else:
                writer.write_patch(result.key, result.sats, result.arrays, result.attrs)
            bar.update(1)
        bar.close()
        kept = [k for k, _ in plan.jobs if k in writer.patches]
        if not kept:
            raise UserFacingError(f"{source}: every patch was skipped, nothing to write")
        index = build_index(writer, kept, plan.index_fields)
        report = out.with_name(out.name + ".skipped.json")
        try:
            report.unlink(missing_ok=True)
            if skipped:
                report.write_text(json.dumps([{"what": w, "why": y} for w, y in skipped], indent=1))
        except OSError as exc:
            report.unlink(missing_ok=True)
            raise OutputWriteError(f"cannot write {report}: {os_error_reason(exc)}") from None
        if skipped:
            print(f"skipped {len(skipped)} bad item(s); see {report}")
        path = writer.finalize(index, {"source_path": str(Path(source).resolve())})
    except KeyboardInterrupt:
        writer.abort(keep_partial=True)
        print(f"interrupted; continue later with --resume ({writer.partial} kept)")
        raise
    except OutputWriteError as exc:  # full disk, read-only or no permission: nothing disk-filling stays
        writer.abort(keep_partial=resume)
        if resume:
            raise OutputWriteError(f"{exc}; {writer.partial} kept: free space, then run again with "
                                   "--resume") from None
        raise
    except BaseException:
        writer.abort(keep_partial=False)
        raise
    return path


def build_index(writer: H5Writer, keys: list[str], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One row per patch, from the patch attributes (so a resumed run rebuilds the same index)."""
    groups = [writer.patches[k] for k in keys]
    index: dict[str, np.ndarray] = {"key": np.array([k.encode() for k in keys], dtype=f"S{max(map(len, keys))}")}
    for name in fields:
        values = [g.attrs[name] for g in groups]
        if isinstance(values[0], str):
            width = max(1, max(len(v.encode()) for v in values))
            index[name] = np.array([v.encode() for v in values], dtype=f"S{width}")
        else:
            index[name] = np.asarray(values)
    sats = [s for s in ("S2", "S1A", "S1D") if s in groups[0]]
    for sat in sats:
        index[f"n_dates_{sat}"] = np.array([g[sat]["data"].shape[0] if sat in g else 0 for g in groups],
                                           dtype=np.int32)
    index["height"] = np.array([g[sats[0]]["data"].shape[2] for g in groups], dtype=np.int32)
    index["width"] = np.array([g[sats[0]]["data"].shape[3] for g in groups], dtype=np.int32)
    return index
