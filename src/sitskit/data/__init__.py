"""torch Datasets over the sitskit HDF5 files: `build_dataset(...)`, `pad_collate(samples)`."""
from .collate import pad_collate
from .datasets import MTLCCDataset, PastisDataset, SITSDataset, build_dataset

__all__ = ["MTLCCDataset", "PastisDataset", "SITSDataset", "build_dataset", "pad_collate"]
