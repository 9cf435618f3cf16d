"""Limited-label selection: a stratified fraction, N patches per class, an explicit id list or a published
STCLN protocol list (`protocol_ids.py`)."""
from __future__ import annotations

import numpy as np

from sitskit.errors import UserFacingError

from .protocol_ids import PROTOCOL_IDS


def dominant_class(class_pixels: np.ndarray, exclude: list[int]) -> np.ndarray:
    """Per patch, the class with most pixels among the non-excluded ones (-1 if none). [N, K] -> [N]."""
    counts = class_pixels.astype(np.int64).copy()
    counts[:, [e for e in exclude if 0 <= e < counts.shape[1]]] = -1
    best = counts.argmax(1)
    best[counts.max(1) <= 0] = -1
    return best


def explicit_ids(label_subset) -> list[int] | None:
    """The id list for a protocol name or an explicit list; None for fraction / per-class selections."""
    if isinstance(label_subset, str):
        if label_subset not in PROTOCOL_IDS:
            raise UserFacingError(f"label_subset {label_subset!r}: unknown protocol list "
                                  f"(known: {', '.join(PROTOCOL_IDS)})")
        return list(PROTOCOL_IDS[label_subset])
    if isinstance(label_subset, (list, tuple)):
        try:
            return [int(i) for i in label_subset]
        except (TypeError, ValueError):
            raise UserFacingError("label_subset: an id list must hold integer patch / tile ids") from None
    return None


def stratified(rows: list[int], classes: np.ndarray, label_subset, seed: int) -> list[int]:
    """Select among `rows` (positions into `classes`, the dominant class per patch).

    float f in (0, 1]: in each class, round(f * n) patches (at least 1), drawn without replacement;
    int N >= 1: N patches per class (all of a class with fewer). Seeded; the result keeps file order.
    """
    if isinstance(label_subset, bool) or not isinstance(label_subset, (int, float, np.integer, np.floating)):
        raise UserFacingError(f"label_subset {label_subset!r}: use a fraction in (0, 1], a number of "
                              "patches per class, an id list or a protocol name")
    is_fraction = isinstance(label_subset, (float, np.floating))
    if is_fraction and not 0 < label_subset <= 1 or not is_fraction and label_subset < 1:
        raise UserFacingError(f"label_subset {label_subset!r}: a fraction must lie in (0, 1], a count be >= 1")
    rng = np.random.default_rng(seed)
    rows = np.asarray(rows)
    chosen: list[int] = []
    for k in np.unique(classes[rows]):
        if k < 0:
            continue  # patches with only background / void pixels carry no label to learn from
        members = rows[classes[rows] == k]
        n = max(1, round(label_subset * len(members))) if is_fraction else min(int(label_subset), len(members))
        chosen.extend(rng.choice(members, n, replace=False).tolist())
    return sorted(chosen)
