"""Tell systemd how the service is doing (sd_notify(3)), without a library.

``dmfs mount --foreground`` under ``Type=notify`` (contrib/systemd/dmfs@.service)
sends ``READY=1`` once the tree is mounted, so units ordered after it find the
tree there, and ``STOPPING=1`` when SIGTERM starts the clean-up.
"""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=mounted"``) to $NOTIFY_SOCKET.

    Returns False, doing nothing, when not started by systemd with a notify
    socket (or with one that is not a local socket); errors sending are raised.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    elif not address.startswith("/"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(states).encode())
    return True
