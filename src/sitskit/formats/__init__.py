"""On-disk formats of the source datasets, read and written without TensorFlow."""
