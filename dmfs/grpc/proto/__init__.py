"""containerd's snapshots API as dmfs writes it (``*.proto``) and protoc's Python
modules of it (``*_pb2*.py``, committed; ``generate.py`` says why and remakes them)."""
