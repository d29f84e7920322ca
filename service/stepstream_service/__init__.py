"""The training service: engine, registries, datasets (and later server, store, workers)."""
