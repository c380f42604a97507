"""containerd's snapshots API on a unix socket: the second front end of the engine.

containerd runs dmfs as a proxy snapshotter (``[proxy_plugins.dmfs]`` in its
config, ``type = "snapshot"``): it sends ``containerd.services.snapshots.v1``
requests to the socket the pool's config names (``grpc_address``), and the
daemon serving the tree answers them from the same engine (DESIGN.md §3).
"""
