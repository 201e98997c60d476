"""The content-addressed embedding cache: keys, HDF5 shards, manifests, locks, maintenance."""
