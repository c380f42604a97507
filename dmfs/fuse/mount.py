"""Serving the tree: engine, FUSE mount and signals in one trio run.

The shape is s3ql's: the engine's context encloses an exit stack in which the
FUSE mount (and containerd's snapshots API, when ``grpc_address`` is set)
registers its own teardown, and SIGTERM / SIGINT / SIGHUP are routed to
``pyfuse3.terminate()``.  However serving ends (a signal, ``umount`` of the
mountpoint, an error), the FUSE mount goes first, then the snapshots API
(requests in flight finish), then the engine unmounts every snapshot, leaves
each device in a recorded state and closes the journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from dmfs.config import Config, admin_gid
from dmfs.fuse import linkcache
from dmfs.fuse.operations import DmfsOperations
from dmfs.pool import Snapshotter

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def fuse_options(config: Config, extra: set[str] = frozenset()) -> set[str]:
    """libfuse mount options: no default_permissions (dmfs checks and logs
    refusals itself), allow_other when configured, a recognisable source."""
    options = {"subtype=dmfs", f"fsname={config.source or config.pool_name}"}
    if config.allow_other:
        options.add("allow_other")
    return options | set(extra)


async def _stop_on_signals(on_stopping: Callable[[], None]) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            on_stopping()
            pyfuse3.terminate()
            return


async def serve(config: Config, mountpoint: Path, *, extra_options: set[str] = frozenset(),
                on_ready: Callable[[], None] = lambda: None,
                on_stopping: Callable[[], None] = lambda: None) -> None:
    """Mount the tree at ``mountpoint`` and serve it until unmounted or signalled;
    with ``grpc_address``, serve containerd's snapshots API there too, from the
    same engine, stopped before the engine is."""
    gid = admin_gid(config.admin_group) if config.admin_group else None
    async with Snapshotter.open(config) as engine:
        operations = DmfsOperations(engine, admin_gid=gid)
        async with contextlib.AsyncExitStack() as stack:
            if config.grpc_address is not None:
                # Imported only then: grpc costs 0.3 s to import in the test guest.
                from dmfs.grpc.server import snapshots_api

                await stack.enter_async_context(snapshots_api(
                    engine, config.grpc_address, gid, operations.follower.changed_elsewhere))
            pyfuse3.init(operations, os.fspath(mountpoint), fuse_options(config, extra_options))
            stack.callback(_close_fuse)
            stack.callback(linkcache.forget, config.runtime_dir)
            log.info("serving thin pool %s at %s", config.pool_name, mountpoint)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_stop_on_signals, on_stopping)
                    nursery.start_soon(operations.follower.follow)
                    on_ready()
                    await pyfuse3.main()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await operations.links.session_closing()
        log.info("%s unmounted; stopping the engine", mountpoint)


def _close_fuse() -> None:
    # After `umount` from outside this only cleans up; otherwise it unmounts.
    try:
        pyfuse3.close(unmount=True)
    except OSError as error:
        log.warning("closing the FUSE session: %s", error)
