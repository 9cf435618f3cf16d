"""Prediction files (docs/predictions.md): writer, reader and scorer.

One HDF5 file per prediction run, keyed exactly like the data file (docs/hdf5_format.md)::

    /                        attrs: kind = "sitskit-predictions", format_version, model, checkpoint,
                             data_file, data_sha, class_names, num_classes, ignore_index, created,
                             sitskit_version, n_patches
    /patches/<key>/semantic  uint8 [H, W]       class index of the data file
    /patches/<key>/probs     float16 [K, H, W]  optional
    /patches/<key>/instances int32 [H, W], instance_class uint8 [N], instance_score float32 [N]
                             panoptic files only (file attribute has_instances = 1)
    /patches/<key>           attrs: the data file patch group's georeferencing (id, fold, footprint, ...)

`score_predictions` reads the truth from the data file and scores with the same protocols as
`finetune.py evaluate --checkpoint`, so maps from any tool are scored identically; `score_panoptic_predictions`
does the same for the instance maps (SQ / RQ / PQ, docs/panoptic.md).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

import sitskit
from sitskit.data_prep.h5schema import PARTIAL_SUFFIX, compression_options, open_sits
from sitskit.errors import UserFacingError
from sitskit.finetune.metrics import ConfusionMeter, compute_metrics, protocol_options

if TYPE_CHECKING:
    from typing import Self  # Python >= 3.11; annotations are not evaluated

KIND = "sitskit-predictions"
FORMAT_VERSION = 1
# Patch-group attributes copied from the data file (whichever of them it has).
PATCH_ATTRS = ("id", "fold", "split", "year", "tile", "crs", "footprint", "geotransform")


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def data_index_sha(data: str | os.PathLike | h5py.File) -> str:
    """sha256 of a data file's /index (field names, dtypes, shapes and bytes, fields sorted): identifies the
    set of patches and their metadata without reading any image."""
    def digest(f: h5py.File) -> str:
        if "index" not in f:
            raise UserFacingError(f"{f.filename}: no /index group")
        h = hashlib.sha256()
        for name in sorted(f["index"]):
            arr = np.ascontiguousarray(f["index"][name][()])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.tobytes())
        return h.hexdigest()
    if isinstance(data, h5py.File):
        return digest(data)
    with open_sits(data) as f:
        return digest(f)


def _data_compression(f: h5py.File) -> dict:
    """The data file's own compression (its conversion settings), as h5py keywords."""
    try:
        spec = json.loads(_text(f.attrs.get("conversion_settings", "{}"))).get("compression", "zstd")
    except json.JSONDecodeError:
        spec = "zstd"
    return compression_options(spec)


class PredictionWriter:
    """Writes one prediction file atomically (``<out>.partial``, renamed by `close`).

    with PredictionWriter(out, data_path, model="stcln", checkpoint="checkpoints/run") as w:
        w.write(key, semantic [H, W], probs [K, H, W] or None)
    An exception inside the block removes the partial file and leaves no output.
    instances=True (a panoptic file, attribute has_instances = 1): every `write` also gets `instances`
    [H, W] (ids 0..N, 0 = none), `instance_class` [N] and `instance_score` [N] (instance i+1 at index i).
    """

    def __init__(self, out: str | os.PathLike, data_path: str | os.PathLike, *, model: str, checkpoint: str,
                 overwrite: bool = False, instances: bool = False):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        if self.out.is_dir():
            raise UserFacingError(f"{self.out}: output path is a directory")
        if self.out.exists() and not overwrite:
            raise UserFacingError(f"{self.out}: output exists; pass overwrite (--overwrite) to replace it")
        if not self.out.parent.exists():
            raise UserFacingError(f"{self.out.parent}: output directory does not exist")
        self.data_path = Path(data_path)
        self.data = open_sits(self.data_path)
        a = self.data.attrs
        self.class_names = [_text(c) for c in a["class_names"]]
        self.num_classes = int(a["num_classes"])
        self.compression = _data_compression(self.data)
        self.partial.unlink(missing_ok=True)
        self.file = h5py.File(self.partial, "w")
        self.file.attrs.update({
            "kind": KIND, "format_version": FORMAT_VERSION,
            "model": str(model), "checkpoint": str(checkpoint),
            "data_file": str(self.data_path.resolve()), "data_sha": data_index_sha(self.data),
            "class_names": self.class_names, "num_classes": self.num_classes,
            "ignore_index": int(a["ignore_index"]), "sitskit_version": sitskit.__version__,
            "has_instances": int(bool(instances)),
        })
        self.instances = bool(instances)
        self.keys: list[str] = []

    def write(self, key: str, semantic, probs=None, *, instances=None, instance_class=None,
              instance_score=None) -> None:
        """semantic: [H, W] integer class indices; probs: [K, H, W] float or None (numpy or torch);
        instances [H, W], instance_class [N], instance_score [N]: required by a panoptic writer, refused
        otherwise."""
        key = str(key)
        if f"patches/{key}" not in self.data:
            raise UserFacingError(f"{self.data_path}: no patch {key!r} to predict for")
        if f"patches/{key}" in self.file:
            raise UserFacingError(f"{self.out}: patch {key!r} written twice")
        truth_shape = self.data[f"patches/{key}/semantic"].shape
        semantic = _numpy(semantic)
        if semantic.shape != truth_shape:
            raise UserFacingError(f"{self.out}: patch {key!r}: prediction {semantic.shape} vs "
                                  f"data {truth_shape}")
        if semantic.size and (semantic.min() < 0 or semantic.max() >= self.num_classes):
            raise UserFacingError(f"{self.out}: patch {key!r}: class index outside 0..{self.num_classes - 1}")
        given = [v is not None for v in (instances, instance_class, instance_score)]
        if self.instances and not all(given):
            raise UserFacingError(f"{self.out}: patch {key!r}: a panoptic file needs instances, instance_class "
                                  "and instance_score")
        if not self.instances and any(given):
            raise UserFacingError(f"{self.out}: patch {key!r}: instances given to a writer made without "
                                  "instances=True")
        if self.instances:
            panoptic = self._check_instances(key, truth_shape, instances, instance_class, instance_score)
        group = self.file.create_group(f"patches/{key}")
        if self.instances:
            for name, arr in panoptic.items():
                group.create_dataset(name, data=arr, **(self.compression if arr.ndim == 2 else {}))
        group.create_dataset("semantic", data=semantic.astype(np.uint8), **self.compression)
        if probs is not None:
            probs = _numpy(probs)
            if probs.shape != (self.num_classes, *truth_shape):
                raise UserFacingError(f"{self.out}: patch {key!r}: probs {probs.shape} vs "
                                      f"{(self.num_classes, *truth_shape)}")
            group.create_dataset("probs", data=probs.astype(np.float16), **self.compression)
        src = self.data[f"patches/{key}"].attrs
        for name in PATCH_ATTRS:
            if name in src:
                group.attrs[name] = src[name]
        self.keys.append(key)

    def _check_instances(self, key, shape, instances, instance_class, instance_score) -> dict:
        inst, cls, score = _numpy(instances), _numpy(instance_class).reshape(-1), _numpy(instance_score).reshape(-1)
        where = f"{self.out}: patch {key!r}"
        if inst.shape != shape:
            raise UserFacingError(f"{where}: instances {inst.shape} vs data {shape}")
        if len(cls) != len(score):
            raise UserFacingError(f"{where}: {len(cls)} instance classes but {len(score)} scores")
        if inst.size and (inst.min() < 0 or inst.max() > len(cls)):
            raise UserFacingError(f"{where}: instance ids must lie in 0..{len(cls)} (0 = none, i = "
                                  "instance_class[i-1])")
        if cls.size and (cls.min() < 0 or cls.max() >= self.num_classes):
            raise UserFacingError(f"{where}: instance class outside 0..{self.num_classes - 1}")
        return {"instances": inst.astype(np.int32), "instance_class": cls.astype(np.uint8),
                "instance_score": score.astype(np.float32)}

    def close(self) -> Path:
        self.file.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.file.attrs["n_patches"] = len(self.keys)
        self.file.close()
        self.data.close()
        os.replace(self.partial, self.out)
        return self.out

    def abort(self) -> None:
        for f in (self.file, self.data):
            if f.id.valid:
                f.close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def write_predictions(out, data_path, items: Iterable[tuple[str, np.ndarray, np.ndarray | None]], *,
                      model: str, checkpoint: str, overwrite: bool = False) -> Path:
    """Write (key, semantic [H, W], probs [K, H, W] | None) items; returns the final path."""
    with PredictionWriter(out, data_path, model=model, checkpoint=checkpoint, overwrite=overwrite) as w:
        for key, semantic, probs in items:
            w.write(key, semantic, probs)
    return w.out


def _open_predictions(path: Path) -> h5py.File:
    if not path.exists():
        raise UserFacingError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserFacingError(f"{path}: not a readable HDF5 file ({exc})") from exc
    if _text(f.attrs.get("kind", "")) != KIND:
        f.close()
        raise UserFacingError(f"{path}: not a sitskit prediction file (kind is not {KIND!r})")
    if int(f.attrs.get("format_version", -1)) > FORMAT_VERSION:
        v = f.attrs.get("format_version")
        f.close()
        raise UserFacingError(f"{path}: prediction format version {v} is newer than this sitskit "
                              f"({FORMAT_VERSION})")
    return f


def _check_against_data(path: Path, f: h5py.File, data_path: Path, check_sha: bool) -> None:
    with open_sits(data_path) as d:
        ours = [_text(c) for c in f.attrs["class_names"]]
        theirs = [_text(c) for c in d.attrs["class_names"]]
        if ours != theirs:
            raise UserFacingError(f"{path}: class names {ours} do not match those of {data_path} ({theirs})")
        missing = [k for k in f.get("patches", {}) if k not in d["patches"]]
        if missing:
            raise UserFacingError(f"{path}: {len(missing)} patch key(s) not in {data_path}, "
                                  f"e.g. {missing[0]!r}")
        if check_sha and _text(f.attrs["data_sha"]) != data_index_sha(d):
            raise UserFacingError(f"{path}: was written for another data file than {data_path} "
                                  "(index hash differs)")


def read_predictions(path: str | os.PathLike, data_path: str | os.PathLike | None = None, *,
                     keys: Sequence[str] | None = None, with_probs: bool = True,
                     check_sha: bool = True
                     ) -> tuple[dict, Iterator[tuple[str, np.ndarray, np.ndarray | None]]]:
    """Validate a prediction file and iterate over it.

    With `data_path`, the class names, patch keys and (check_sha) the data file's index hash must match.
    keys: only these patches (all must be present), in this order; default: all, in file order.
    Returns (file attributes, iterator of (key, semantic uint8 [H, W], probs float16 [K, H, W] | None)).
    """
    path = Path(path)
    with _open_predictions(path) as f:
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
        attrs["class_names"] = [_text(c) for c in attrs["class_names"]]
        present = list(f.get("patches", {}))
        if data_path is not None:
            _check_against_data(path, f, Path(data_path), check_sha)
    if keys is not None:
        keys = [str(k) for k in keys]
        absent = [k for k in keys if k not in present]
        if absent:
            raise UserFacingError(f"{path}: no prediction for patch {absent[0]!r} ({len(absent)} missing)")
    order = keys if keys is not None else present

    def iterate():
        with h5py.File(path, "r") as f:
            for key in order:
                g = f["patches"][key]
                probs = g["probs"][()] if with_probs and "probs" in g else None
                yield key, g["semantic"][()], probs
    return attrs, iterate()


def score_predictions(pred_path: str | os.PathLike, data_path: str | os.PathLike, protocol: str = "sitskit",
                      keys: Sequence[str] | None = None, *, exclude_background: bool = False,
                      check_sha: bool = True) -> dict:
    """Score a prediction file against the data file's `semantic` maps (compute_metrics + n_patches)."""
    _, items = read_predictions(pred_path, data_path, keys=keys, with_probs=False, check_sha=check_sha)
    with open_sits(data_path) as d:
        names = [_text(c) for c in d.attrs["class_names"]]
        options = protocol_options(d.attrs)
        meter = ConfusionMeter(len(names))
        n_patches = 0
        for key, semantic, _ in items:
            truth = d[f"patches/{key}/semantic"][()]
            if truth.shape != semantic.shape:
                raise UserFacingError(f"{pred_path}: patch {key!r}: prediction {semantic.shape} vs "
                                      f"data {truth.shape}")
            meter.update(torch.from_numpy(semantic.astype(np.int64)),
                         torch.from_numpy(truth.astype(np.int64)))
            n_patches += 1
    metrics = compute_metrics(meter.confusion, names, protocol, exclude_background=exclude_background,
                              **options)
    metrics["n_patches"] = n_patches
    return metrics


def read_instances(path: str | os.PathLike, data_path: str | os.PathLike | None = None, *,
                   keys: Sequence[str] | None = None, check_sha: bool = True
                   ) -> tuple[dict, Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
    """Like `read_predictions` for a panoptic file (attribute has_instances = 1). Returns (file attributes,
    iterator of (key, semantic uint8 [H, W], instances int32 [H, W], instance_class uint8 [N],
    instance_score float32 [N]))."""
    attrs, _ = read_predictions(path, data_path, keys=keys, with_probs=False, check_sha=check_sha)  # validates
    if not int(attrs.get("has_instances", 0)):
        raise UserFacingError(f"{path}: has no instance maps (attribute has_instances is not 1)")
    if keys is None:
        with h5py.File(path, "r") as f:
            order = list(f.get("patches", {}))
    else:
        order = [str(k) for k in keys]

    def iterate():
        with h5py.File(path, "r") as f:
            for key in order:
                g = f["patches"][key]
                missing = [n for n in ("instances", "instance_class", "instance_score") if n not in g]
                if missing:
                    raise UserFacingError(f"{path}: patch {key!r} has no {', '.join(missing)}")
                yield key, g["semantic"][()], g["instances"][()], g["instance_class"][()], g["instance_score"][()]
    return attrs, iterate()


def score_panoptic_predictions(pred_path: str | os.PathLike, data_path: str | os.PathLike,
                               protocol: str = "sitskit", keys: Sequence[str] | None = None, *,
                               exclude_background: bool = False, check_sha: bool = True) -> dict:
    """Score a panoptic prediction file against the data file's `instances` and `semantic` maps: the same
    metrics.json as `finetune.py evaluate --checkpoint` of a panoptic run (panoptic_stage.panoptic_metrics)."""
    from sitskit.finetune.panoptic import PanopticMeter
    from sitskit.finetune.panoptic_stage import panoptic_classes, panoptic_metrics

    _, items = read_instances(pred_path, data_path, keys=keys, check_sha=check_sha)
    with open_sits(data_path) as d:
        names = [_text(c) for c in d.attrs["class_names"]]
        options = protocol_options(d.attrs)
        void = [int(v) for v in np.atleast_1d(d.attrs.get("void_ids", []))]
        background = [int(v) for v in np.atleast_1d(d.attrs.get("background_ids", []))]
        meter = PanopticMeter(len(names), classes=panoptic_classes(len(names), void, background),
                              void_label=void[0] if void else None)
        confusion = ConfusionMeter(len(names))
        n_patches = 0
        for key, semantic, instances, _, _ in items:
            g = d[f"patches/{key}"]
            if "instances" not in g:
                raise UserFacingError(f"{data_path}: patch {key!r} has no instance annotations")
            truth, truth_inst = g["semantic"][()], g["instances"][()]
            if truth.shape != semantic.shape or truth.shape != instances.shape:
                raise UserFacingError(f"{pred_path}: patch {key!r}: prediction {semantic.shape} vs "
                                      f"data {truth.shape}")
            sem, inst = torch.from_numpy(semantic.astype(np.int64)), torch.from_numpy(instances.astype(np.int64))
            t_sem = torch.from_numpy(truth.astype(np.int64))
            meter.update(inst, sem, torch.from_numpy(truth_inst.astype(np.int64)), t_sem)
            confusion.update(sem, t_sem)
            n_patches += 1
    metrics = panoptic_metrics(meter.table, confusion.confusion, names, protocol, options, void_ids=void,
                               background_ids=background, exclude_background=exclude_background)
    metrics["n_patches"] = n_patches
    return metrics
