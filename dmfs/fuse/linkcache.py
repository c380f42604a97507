"""Whether the kernel caches the targets of the tree's ``fs`` links.

Each node's ``fs`` is a symlink to its snapshot's ext4 mount (DESIGN.md §3).
The kernel caches a FUSE symlink's target only if the daemon asked for
``FUSE_CAP_CACHE_SYMLINKS`` at init; otherwise every path walk through
``M/<node>/fs`` is a READLINK round trip to Python (issue 12, in the test
guest: stat through such paths at 0.10x native, create at 0.43x).  Stock
pyfuse3 3.5 cannot ask for it; the build in ``contrib/pyfuse3`` can
(``Operations.enable_cache_symlinks``) and says whether the kernel agreed
(``Operations.cache_symlinks_granted``).  With stock pyfuse3 dmfs works as
before, warns once at mount and reports the state.

What caching asks of the view (``dmfs/fuse/operations.py``): a link's target
never changes (``fs`` always points at ``mount_path(device id)``, and a new
snapshot gets a new link inode), ``st_size`` is the target's length (older
kernels cut a cached target to it), and whenever a snapshot's mount goes away
(commit, remove, idle expiry) the kernel's copy is invalidated, because no
READLINK would tell dmfs that the snapshot is used again.

The daemon writes the negotiated state to ``<runtime dir>/fs-links`` so that
``dmfs status``, a separate process, can report the truth.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyfuse3
import trio

from dmfs.fuse.inodes import EntryRole, Identity, InodeTable

log = logging.getLogger(__name__)

#: whether this pyfuse3 can ask the kernel to cache symlinks (the patched build)
PYFUSE3_CAN_ASK = hasattr(pyfuse3.Operations, "cache_symlinks_granted")
STATE_FILE = "fs-links"
SLOWNESS = ("path lookups through M/<node>/fs are slow: each one is a round trip to the "
            "dmfs daemon")
ADVICE = "cd into fs or resolve it once (realpath M/<node>/fs) for many small operations"


def _pyfuse3_version() -> str:
    try:
        return version("pyfuse3")
    except PackageNotFoundError:
        return "?"


@dataclass(frozen=True)
class LinkCache:
    """Whether the kernel caches fs link targets, and why (one line for people)."""

    cached: bool
    why: str

    def describe(self) -> str:
        return ("cached by the kernel" if self.cached
                else f"not cached by the kernel ({self.why}): {SLOWNESS}")


def negotiated(granted: bool | None) -> LinkCache:
    """The state of a mount from what pyfuse3 reported at init (None: stock
    pyfuse3, which cannot ask)."""
    if not PYFUSE3_CAN_ASK or granted is None:
        return LinkCache(False, f"pyfuse3 {_pyfuse3_version()} cannot ask the kernel to cache "
                                "symlinks; contrib/pyfuse3 builds one that can")
    if not granted:
        return LinkCache(False, "the kernel does not offer FUSE_CAP_CACHE_SYMLINKS "
                                "(Linux 4.20 or newer has it)")
    return LinkCache(True, f"pyfuse3 {_pyfuse3_version()} asked for FUSE_CAP_CACHE_SYMLINKS")


def installed() -> LinkCache:
    """What a mount with the installed pyfuse3 would get (without a daemon)."""
    if PYFUSE3_CAN_ASK:
        return LinkCache(True, f"pyfuse3 {_pyfuse3_version()} can ask the kernel to cache "
                               "symlinks")
    return negotiated(None)


def announce(state: LinkCache, runtime_dir: Path) -> None:
    """Log the state at mount (a warning when links are not cached) and record
    it for ``dmfs status``; never raises (it runs in pyfuse3's init)."""
    if state.cached:
        log.info("fs links are cached by the kernel (%s)", state.why)
    else:
        log.warning("%s, because %s; %s", SLOWNESS, state.why, ADVICE)
    try:
        (runtime_dir / STATE_FILE).write_text(json.dumps(asdict(state)) + "\n")
    except OSError as error:
        log.warning("cannot record the fs link state in %s: %s", runtime_dir, error)


def recorded(runtime_dir: Path) -> LinkCache | None:
    """The state the serving daemon recorded, if any."""
    try:
        fields = json.loads((runtime_dir / STATE_FILE).read_text())
        return LinkCache(cached=bool(fields["cached"]), why=str(fields["why"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget(runtime_dir: Path) -> None:
    """The daemon stops: its state no longer holds."""
    with contextlib.suppress(OSError):
        (runtime_dir / STATE_FILE).unlink()


class LinkInvalidator:
    """Drops the kernel's cached copy of ``fs`` link targets (trio thread side).

    A cached target is never refreshed by a timeout, and no READLINK tells dmfs
    that the snapshot is used again: when a snapshot's mount goes away (commit,
    remove, idle expiry) the next path walk must come back to the daemon.  The
    kernel runs the invalidation in the calling thread and may wait in it for a
    path walk that waits for this daemon, so it runs in a worker thread while
    the trio loop goes on serving; and never once the FUSE session is closing
    (the engine's idle timer outlives the mount)."""

    def __init__(self, inodes: InodeTable, invalidate: Callable[[int], None],
                 invalidate_entry: Callable[[int, bytes], None] = pyfuse3.invalidate_entry,
                 invalidate_attributes: Callable[[int], None] = lambda inode:
                 pyfuse3.invalidate_inode(inode, attr_only=True)) -> None:
        self.state = LinkCache(False, "not mounted yet")
        self._inodes = inodes
        self._invalidate = invalidate
        self._invalidate_entry = invalidate_entry
        self._invalidate_attributes = invalidate_attributes
        self._lock = trio.Lock()  # held while an invalidation runs in a worker thread
        self._refresh_lock = trio.Lock()  # the same for refresh
        self._closing = False

    async def drop(self, identity: Identity) -> None:
        """Make the kernel ask for this snapshot's fs link target again."""
        if not self.state.cached:
            return
        inode = self._inodes.known_to_kernel(EntryRole.FS_LINK, identity)
        if inode is None:
            return  # the kernel never resolved it, or forgot it
        async with self._lock:
            if self._closing:
                return  # the session goes away, and the kernel's caches with it
            try:
                await trio.to_thread.run_sync(self._invalidate, inode)
            except OSError as error:
                if error.errno != errno.ENOENT:  # ENOENT: forgotten meanwhile
                    log.warning("the kernel may keep a stale target for fs link inode %d: %s",
                                inode, error)

    async def refresh(self, entries: list[tuple[int, bytes]], attributes: list[int]) -> None:
        """Make the kernel look ``entries`` (directory inode, name) up again and
        fetch the ``attributes`` of these inodes again: for a change another front
        end (containerd's socket) made, which no FUSE request told the kernel of.
        Worker threads and the closing rule as for links; entries the kernel does
        not hold are skipped (ENOENT)."""
        def invalidate_all() -> None:  # one worker thread for all: each hop costs
            calls: list[tuple[Callable[..., None], tuple[object, ...]]] = [
                (self._invalidate_entry, entry) for entry in entries]
            calls += [(self._invalidate_attributes, (inode,)) for inode in attributes]
            for call, args in calls:
                try:
                    call(*args)
                except OSError as error:
                    if error.errno != errno.ENOENT:
                        log.warning("the kernel may keep a stale entry or attributes (%s): %s",
                                    args, error)

        # Its own lock: an entry's invalidation waits for the directory's lock,
        # which a rename holds while its handler drops a link (self._lock).
        async with self._refresh_lock:
            if not self._closing:
                await trio.to_thread.run_sync(invalidate_all)

    async def session_closing(self) -> None:
        """No invalidation may reach pyfuse3 once its session is closed: wait
        for those under way, refuse the later ones."""
        async with self._lock, self._refresh_lock:
            self._closing = True
