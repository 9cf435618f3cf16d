"""Shared session-scoped fixtures: tiny simulated datasets converted to sitskit HDF5 (docs/hdf5_format.md).

They are built once per test session (a few seconds each) and must be treated as read-only: a test that
modifies a file copies it first (`shutil.copy(pastis_h5, tmp_path / "p.h5")`).
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pastis_h5(tmp_path_factory) -> Path:
    """Simulated PASTIS (S2 only, with instance annotations) as one HDF5 file; returns its path.

    5 patches of 32x32 px, seed 0 (the sizes of tests/test_pretrain.py): ids 10000, 10001, 20000, 30000,
    40000 in folds 1, 2, 3, 4, 5 (round-robin over the sorted ids), 38-61 S2 dates each, 10 bands,
    label maps `semantic`, `target`, `parcel_ids`, `heatmap`, `instances`, `zones` (task "panoptic"
    works); zstd compression. Keys "10000", …; sat "S2" only.
    """
    from sitskit.data_prep import convert_pastis
    from sitskit.simulate import simulate_pastis

    root = tmp_path_factory.mktemp("shared_pastis")
    raw = simulate_pastis(root / "PASTIS", n_patches=5, size=32, seed=0)
    return convert_pastis(raw, root / "pastis.h5")


@pytest.fixture(scope="session")
def mtlcc_h5(tmp_path_factory) -> Path:
    """Simulated MTLCC as one HDF5 file; returns its path.

    6 tiles (ids 0..5) of 24x24 px (the 240 m tile set, as in tests/test_data_prep_mtlcc.py), seed 5,
    years 2016 and 2017 (one patch per tile and year: 12 patches, keys "2016_0" … "2017_5", 34-46 dates);
    split attribute by tile position: tiles 0, 1, 2, 5 "train", tile 3 "test", tile 4 "eval"; fold 0;
    13 bands; label maps `semantic`, `semantic_original`; zstd compression.
    """
    from sitskit.data_prep import convert_mtlcc
    from sitskit.simulate import simulate_mtlcc

    root = tmp_path_factory.mktemp("shared_mtlcc")
    simulate_mtlcc(root / "MTLCC", n_tiles=6, size=24, seed=5)
    return convert_mtlcc(root / "MTLCC", root / "mtlcc.h5", size=240)
