"""h5ad → Zarr v3 corpus → MDS shards → StreamingDataLoader (see docs/data_prep.md)."""
