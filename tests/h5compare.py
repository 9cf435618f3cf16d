"""Test helper: compare two sitskit HDF5 files (kept out of the shipped package)."""
from __future__ import annotations

import os

import h5py
import numpy as np

from sitskit.data_prep.h5schema import PROVENANCE_TIME_ATTRS


def h5_differences(a: str | os.PathLike, b: str | os.PathLike,
                   ignore_attrs: tuple[str, ...] = PROVENANCE_TIME_ATTRS) -> list[str]:
    """Every dataset/attribute that differs between two files (names, shapes, dtypes, values, attrs)."""
    diffs: list[str] = []

    def attrs_of(obj) -> dict:
        return {k: v for k, v in obj.attrs.items() if k not in ignore_attrs}

    def same(x, y) -> bool:
        x, y = np.asarray(x), np.asarray(y)
        return x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        items_a, items_b = {}, {}
        fa.visititems(lambda n, o: items_a.__setitem__(n, o) and None)
        fb.visititems(lambda n, o: items_b.__setitem__(n, o) and None)
        for name in sorted(set(items_a) ^ set(items_b)):
            diffs.append(f"{name}: only in {'the first' if name in items_a else 'the second'} file")
        for name, oa in [("/", fa)] + sorted(items_a.items()):
            ob = fb if name == "/" else items_b.get(name)
            if ob is None:
                continue
            aa, ab = attrs_of(oa), attrs_of(ob)
            for k in sorted(set(aa) | set(ab)):
                if k not in aa or k not in ab or not same(aa[k], ab[k]):
                    diffs.append(f"{name}: attribute {k} differs")
            if isinstance(oa, h5py.Dataset) and not same(oa[()], ob[()]):
                diffs.append(f"{name}: values differ")
    return diffs
