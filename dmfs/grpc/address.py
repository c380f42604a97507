"""The service's unix socket: where it may be, who may connect, and a stale one.

The socket is as privileged as the tree's mkdir (DESIGN.md §3): it is mode
0660, owned by root (the daemon's user) and the admin group, in a directory
others cannot enter.  A directory that does not exist yet is made so (mode
0750, root and the admin group; 0700 without one); one that exists is used
only if it is root's and others have no access to it, and is never changed:
dmfs does not chmod a directory it did not make.  The directory is what keeps
others out while the socket is being bound (its own mode is set right after:
umask cannot be set for one thread of a daemon).

A socket file left by a daemon that was killed (nothing accepts on it: connect
says ECONNREFUSED) is replaced; one that a process still serves, or a path that
is not a socket, stops the start with a :class:`SocketProblem`, before anything
else happens (``dmfs mount`` checks it first: exit status 3).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIRECTORY_MODE = 0o750
SOCKET_MODE = 0o660


class SocketProblem(Exception):
    """The socket cannot be served where the config says; the message says why."""


def check_socket_path(path: Path) -> None:
    """SocketProblem unless dmfs can serve ``path``: its directory, if it exists,
    is root's and closed to others; the path is free, or a stale socket."""
    directory = path.parent
    try:
        info = directory.stat()
    except FileNotFoundError:
        return  # made at start
    except OSError as error:
        raise SocketProblem(f"grpc_address {path}: cannot look at {directory}: "
                            f"{error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SocketProblem(f"grpc_address {path}: {directory} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o007:
        what = "open to every user" if info.st_mode & 0o007 else "not owned by root"
        raise SocketProblem(
            f"grpc_address {path}: {directory} is {what} "
            f"(mode {stat.S_IMODE(info.st_mode):04o}, uid {info.st_uid}), so the socket "
            "would not be private: give a path in a directory of its own that does not "
            "exist yet (dmfs makes it, mode 0750, for root and admin_group), e.g. "
            "/run/dmfs/<pool>/grpc/snapshots.sock")
    _check_free(path)


def _check_free(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketProblem(f"grpc_address {path} exists and is not a socket: dmfs will "
                            "not replace it")
    if _serving(path):
        raise SocketProblem(f"grpc_address {path}: another process serves this socket "
                            "(a dmfs of another pool with the same grpc_address?)")


def _serving(path: Path) -> bool:
    """Whether a process accepts connections on the socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError as error:
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise SocketProblem(f"grpc_address {path}: cannot tell whether a process "
                                f"serves it: {error.strerror}") from None
    return True


def prepare_socket_path(path: Path, admin_gid: int | None) -> None:
    """Make the socket's directory if it is missing, and remove a stale socket
    (after :func:`check_socket_path` said both are fine)."""
    directory = path.parent
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
        if admin_gid is not None:
            os.chown(directory, -1, admin_gid)
            directory.chmod(DIRECTORY_MODE)
    check_socket_path(path)  # again: the start comes later than dmfs mount's check
    if path.is_socket():
        log.info("replacing the stale socket %s (no process serves it)", path)
        path.unlink()


def secure_socket(path: Path, admin_gid: int | None) -> None:
    """The socket's group and mode, once it is bound: the admin group, 0660 (its
    owner is the daemon's user, root)."""
    if admin_gid is not None:
        os.chown(path, -1, admin_gid)
    path.chmod(SOCKET_MODE)
