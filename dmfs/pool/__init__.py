"""The snapshot engine: thin pool, devices, metadata journal, udev. Knows nothing of FUSE."""
