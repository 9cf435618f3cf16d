"""The MTLCC Example schema (MarcCoru/MTLCC `S2parser.py`): one gzip TFRecord per tile, one Example each.

Arrays are stored as raw little-endian int64 bytes with their shape in a separate Int64List:
``x10`` (T,H,W,4), ``x20`` (T,H/2,W/2,6), ``x60`` (T,H/6,W/6,3), ``dates/doy`` and ``dates/year`` (T,)
(padding dates have doy 0), ``labels`` (T,H,W) = the label map repeated for every date.
"""
from __future__ import annotations

import numpy as np

from .tfrecord import TFRecordError

ARRAY_KEYS = ("x10", "x20", "x60", "labels")
REQUIRED_KEYS = tuple(f"{k}/{p}" for k in ARRAY_KEYS for p in ("data", "shape")) + (
    "dates/doy", "dates/year", "dates/shape")


def _raw(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<i8").tobytes()


def encode_mtlcc_example(x10: np.ndarray, x20: np.ndarray, x60: np.ndarray, doy: np.ndarray,
                         year: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """Feature dict for one tile. `labels` may be (H,W) (repeated over T here) or (T,H,W)."""
    t = len(doy)
    if labels.ndim == 2:
        labels = np.broadcast_to(labels, (t, *labels.shape))
    feats: dict[str, object] = {}
    for key, arr in (("x10", x10), ("x20", x20), ("x60", x60), ("labels", labels)):
        feats[f"{key}/data"] = _raw(arr)
        feats[f"{key}/shape"] = np.asarray(arr.shape, dtype=np.int64)
    feats["dates/doy"] = _raw(doy)
    feats["dates/year"] = _raw(year)
    feats["dates/shape"] = np.asarray([t], dtype=np.int64)
    return feats


def decode_mtlcc_example(feats: dict[str, object], where: str = "record") -> dict[str, np.ndarray]:
    """Arrays of one MTLCC Example: x10, x20, x60, labels (T,H,W), doy, year (int64).

    Raises TFRecordError naming `where` if a key is missing or a buffer does not match its shape.
    """
    missing = [k for k in REQUIRED_KEYS if k not in feats]
    if missing:
        raise TFRecordError(f"{where}: not an MTLCC Example, missing keys {missing}")
    out: dict[str, np.ndarray] = {}

    def take(name: str, data_key: str, shape) -> np.ndarray:
        buf = feats[data_key][0] if feats[data_key] else b""
        shape = tuple(int(s) for s in shape)
        if len(buf) != 8 * int(np.prod(shape)):
            raise TFRecordError(f"{where}: '{data_key}' holds {len(buf)} bytes, shape {shape} needs "
                                f"{8 * int(np.prod(shape))}")
        return np.frombuffer(buf, dtype="<i8").reshape(shape).astype(np.int64)

    for key in ARRAY_KEYS:
        out[key] = take(key, f"{key}/data", feats[f"{key}/shape"])
    out["doy"] = take("doy", "dates/doy", feats["dates/shape"])
    out["year"] = take("year", "dates/year", feats["dates/shape"])
    return out
