"""The filesystem view: serves the snapshot namespace through FUSE via the engine API."""
