"""dmfs: the snapshots of a device-mapper thin pool as a directory tree."""

__version__ = "0.1.0"
