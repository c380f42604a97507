"""containerd's snapshots API on a unix socket: the second front end of the engine.

containerd runs dmfs as a proxy snapshotter (``[proxy_plugins.dmfs]`` in its
config, ``type = "snapshot"``): it sends ``containerd.services.snapshots.v1``
requests to the socket the pool's config names (``grpc_address``), and the
daemon serving the tree answers them from the same engine (DESIGN.md §3).
"""

import os

#: grpc's C core, as the daemon starts it: read once, when grpc is first imported
#: (so here, before any module of this package imports it; a value of the
#: caller's own is kept).  ``-event_engine_listener`` accepts and reads the
#: socket's connections with grpc's older poller, which the thread waiting on the
#: completion queue runs itself, instead of the EventEngine's thread pool, which
#: wakes two more threads per request (futex calls per Stat on the server, under
#: strace in the test guest: 4 instead of 11).  Measured there with
#: bench/grpc_ops.py's scratch A/B (servers side by side, requests alternating):
#: a Stat round trip 0.2-0.4 ms (8-10 %) faster, with Python's and containerd's
#: Go client alike.
GRPC_EXPERIMENTS = "-event_engine_listener"
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
