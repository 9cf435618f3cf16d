"""data_prep: source datasets (PASTIS folder, MTLCC TFRecords) -> one self-describing HDF5 file.

`convert_pastis(root, out, **opts)` and `convert_mtlcc(root, out, **opts)`; layout in docs/hdf5_format.md.
"""
from .mtlcc import convert_mtlcc
from .pastis import convert_pastis

__all__ = ["convert_mtlcc", "convert_pastis"]
