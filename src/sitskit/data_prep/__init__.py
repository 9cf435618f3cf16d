"""data_prep: source datasets (PASTIS folder, MTLCC TFRecords) -> one self-describing HDF5 file."""
