"""The fs link cache state and the request counters, without a mount (the guest
tests check them against a real kernel)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pyfuse3
import pytest
import trio

from dmfs.fuse import linkcache, requests


def test_stock_pyfuse3_is_reported_as_unable_to_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linkcache, "PYFUSE3_CAN_ASK", False)
    for granted in (None, False, True):  # what pyfuse3 says does not matter then
        state = linkcache.negotiated(granted)
        assert not state.cached and "cannot ask the kernel to cache symlinks" in state.why
    assert linkcache.installed() == linkcache.negotiated(None)


def test_patched_pyfuse3_reports_what_the_kernel_granted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linkcache, "PYFUSE3_CAN_ASK", True)
    assert linkcache.negotiated(True).cached
    refused = linkcache.negotiated(False)
    assert not refused.cached and "FUSE_CAP_CACHE_SYMLINKS" in refused.why
    assert refused.describe().startswith("not cached by the kernel (the kernel does not")
    assert linkcache.negotiated(True).describe() == "cached by the kernel"


def test_announce_warns_once_and_records_for_status(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    state = linkcache.LinkCache(False, "pyfuse3 9 cannot ask")
    with caplog.at_level(logging.INFO, logger="dmfs"):
        linkcache.announce(state, tmp_path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith(
        "path lookups through M/<node>/fs are slow: each one is a round trip to the dmfs "
        "daemon, because pyfuse3 9 cannot ask; cd into fs")
    assert linkcache.recorded(tmp_path) == state
    linkcache.forget(tmp_path)
    assert linkcache.recorded(tmp_path) is None
    linkcache.forget(tmp_path)  # twice is harmless


def test_a_cached_state_is_logged_without_warning(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dmfs"):
        linkcache.announce(linkcache.LinkCache(True, "asked"), tmp_path)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert linkcache.recorded(tmp_path) == linkcache.LinkCache(True, "asked")


def test_a_damaged_or_unwritable_record_is_no_record(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / linkcache.STATE_FILE).write_text("{not json\n")
    assert linkcache.recorded(tmp_path) is None
    (tmp_path / linkcache.STATE_FILE).write_text('{"why": "no cached key"}\n')
    assert linkcache.recorded(tmp_path) is None
    linkcache.announce(linkcache.LinkCache(True, "x"), tmp_path / "missing")  # no raise
    assert "cannot record the fs link state" in caplog.text


def test_counted_handlers_count_their_calls() -> None:
    @requests.counted
    class Counting(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.requests: Counter[str] = Counter()

        async def getattr(self, inode: int, ctx: object = None) -> int:
            """Answers its inode."""
            return inode

    operations = Counting()
    assert {"lookup", "getattr", "readlink", "getxattr", "forget"} <= requests.HANDLERS

    async def calls() -> None:
        assert await operations.getattr(7, None) == 7
        assert await operations.getattr(8, None) == 8
        with pytest.raises(pyfuse3.FUSEError):  # an inherited handler: ENOSYS, still counted
            await operations.readlink(7, None)

    trio.run(calls)
    assert operations.requests == {"getattr": 2, "readlink": 1}
    assert Counting.getattr.__doc__ == "Answers its inode."
    assert requests.summary(operations.requests) == "getattr=2 readlink=1"
    assert requests.summary(Counter()) == "none"


def test_no_link_invalidation_reaches_pyfuse3_once_its_session_closes() -> None:
    from types import SimpleNamespace

    from dmfs.fuse.inodes import EntryRole
    from dmfs.fuse.operations import DmfsOperations

    engine = SimpleNamespace(before_unmount=None)
    operations = DmfsOperations(engine)  # type: ignore[arg-type]
    assert engine.before_unmount == operations._unmount_coming
    invalidated: list[int] = []
    links = linkcache.LinkInvalidator(operations.inodes, invalidated.append)
    identity = (5, "2026-01-01T00:00:00")
    link = operations.inodes.inode(EntryRole.FS_LINK, identity)

    async def drop_then_close() -> None:
        await links.drop(identity)  # links not cached: nothing to drop
        links.state = linkcache.LinkCache(True, "asked")
        await links.drop(identity)  # the kernel never looked it up
        operations.inodes.looked_up(link)
        await links.drop(identity)
        await links.session_closing()
        await links.drop(identity)

    trio.run(drop_then_close)
    assert invalidated == [link]
