"""The metadata store: one append-only JSON-lines journal plus a checkpoint.

Each line is ``<crc32 hex> <json>``; the JSON carries a sequence number.  A
record that announces a device-mapper operation is fsync'd before the
operation starts (``durable=True``); records that only confirm one ride along
with the next durable write.  Compaction writes the whole state to
``checkpoint.json`` (temporary file, fsync, atomic rename, fsync of the
directory) and starts a journal holding only the records after the checkpoint's
sequence number; records at or below it are skipped on replay, so a crash
between the two steps is harmless.  The engine writes records from worker
threads while the trio thread owns the in-memory state, so a checkpoint names
the sequence number its state includes, and records written after it (by a
sequence still running) are carried into the new journal.

A failed fsync is not retried as if nothing happened: after an fsync error the
kernel may have dropped the dirty pages, so a later fsync that succeeds proves
nothing.  :attr:`Journal.needs_rewrite` then stays set until a compaction has
written the whole state again.

On open, a torn last record (cut by a crash mid-write: no newline, or a bad
checksum on the very last line) is dropped with a warning and cut off the
file; a damaged record anywhere else stops the start with the file name and
byte offset, since guessing could lose committed snapshots.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmfs.pool.errors import JournalCorrupt, PoolError
from dmfs.pool.failpoints import failpoint

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"
CHECKPOINT_NAME = "checkpoint.json"
LOCK_NAME = "lock"


def encode(record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    data = payload.encode()
    return b"%08x %s\n" % (zlib.crc32(data), data)


def decode(line: bytes) -> dict[str, Any] | None:
    """The record on one line (without its newline), or None when damaged."""
    crc_text, sep, data = line.partition(b" ")
    if not sep or len(crc_text) != 8:
        return None
    try:
        if int(crc_text, 16) != zlib.crc32(data):
            return None
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The journal and checkpoint in one state directory, locked for one process."""

    def __init__(self, directory: Path, compact_after: int = 2000) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.checkpoint_path = directory / CHECKPOINT_NAME
        self.compact_after = compact_after
        self.seq = 0
        self.records_since_checkpoint = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._dirty = False
        #: (seq, line) of every record since the checkpoint, for compaction
        self._tail: list[tuple[int, bytes]] = []
        #: an fsync failed: only a compaction makes the journal trustworthy again
        self.needs_rewrite = False
        # The engine writes from the trio thread and from the worker thread
        # running a device-mapper sequence: one writer at a time.
        self._write_lock = threading.Lock()

    # -- opening -----------------------------------------------------------------
    def open(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """Lock the directory, read the checkpoint and the records after it."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock()
        checkpoint = self._read_checkpoint()
        base_seq = checkpoint["seq"] if checkpoint else 0
        records = [r for r in self._read_journal() if r["seq"] > base_seq]
        self.seq = max([base_seq, *(r["seq"] for r in records)])
        self.records_since_checkpoint = len(records)
        self._tail = [(r["seq"], encode(r)) for r in records]
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return (checkpoint["state"] if checkpoint else None), records

    def _lock(self) -> None:
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PoolError(f"{self.directory} is in use by another dmfs process") from None
        self._lock_fd = fd

    def _read_checkpoint(self) -> dict[str, Any] | None:
        try:
            data = self.checkpoint_path.read_bytes()
        except FileNotFoundError:
            return None
        record = decode(data.rstrip(b"\n")) if data.endswith(b"\n") else None
        if record is None or "seq" not in record or "state" not in record:
            raise JournalCorrupt(f"{self.checkpoint_path}: the checkpoint is damaged "
                                 "(bad checksum or format); restore it from a backup")
        return record

    def read(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """Like :meth:`open`, for a look only: no lock, nothing changed on disk
        (a torn last record is skipped, not cut off)."""
        checkpoint = self._read_checkpoint()
        base_seq = checkpoint["seq"] if checkpoint else 0
        records = [r for r in self._read_journal(repair=False) if r["seq"] > base_seq]
        return (checkpoint["state"] if checkpoint else None), records

    def _read_journal(self, repair: bool = True) -> list[dict[str, Any]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records: list[dict[str, Any]] = []
        offset = 0
        while offset < len(data):
            end = data.find(b"\n", offset)
            if end < 0:
                if repair:
                    self._drop_torn_tail(offset, len(data), "it has no end of line")
                break
            record = decode(data[offset:end])
            if record is None or not isinstance(record.get("seq"), int):
                if end + 1 == len(data):
                    if repair:
                        self._drop_torn_tail(offset, len(data), "its checksum does not match")
                    break
                raise JournalCorrupt(
                    f"{self.path}: damaged record at byte offset {offset}, followed by "
                    f"{len(data) - end - 1} more bytes; refusing to guess (see `dmfs check`)")
            records.append(record)
            offset = end + 1
        return records

    def _drop_torn_tail(self, offset: int, size: int, why: str) -> None:
        log.warning("%s: dropping a torn last record at byte offset %d (%d bytes): %s",
                    self.path, offset, size - offset, why)
        with open(self.path, "r+b") as f:
            f.truncate(offset)
            os.fsync(f.fileno())

    # -- writing -----------------------------------------------------------------
    def append(self, record: dict[str, Any], *, durable: bool,
               then: Callable[[dict[str, Any]], None] | None = None) -> int:
        """Append a record; with ``durable`` it is on disk when this returns.

        ``then`` runs once the record is written (before the fsync), so that a
        record that reached the file is applied even when its fsync fails.
        """
        seq = self.write(record)
        if then is not None:
            then(record)
        if durable:
            self.sync()
        return seq

    def write(self, record: dict[str, Any]) -> int:
        """Write a record without waiting for the disk; returns its sequence number."""
        with self._write_lock:
            if self._fd is None:
                raise PoolError(f"{self.path}: the journal is not open")
            seq = self.seq + 1
            data = encode({**record, "seq": seq})
            size = os.fstat(self._fd).st_size
            try:
                written = os.write(self._fd, data)
                if written != len(data):  # a short write on a full disk
                    raise OSError(errno.ENOSPC, f"{self.path}: short write ({written} of "
                                  f"{len(data)} bytes)")
            except OSError:
                # No half a line may stay: the next record would follow it and
                # make a damaged record in the middle of the journal.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
                raise
            self.seq = seq
            self._tail.append((seq, data))
            self.records_since_checkpoint += 1
            self._dirty = True
            return seq

    def sync(self) -> None:
        """Make every record written so far durable."""
        with self._write_lock:
            self._sync()

    def _sync(self) -> None:
        if self._fd is not None and self._dirty:
            try:
                failpoint("journal:fsync")
                os.fsync(self._fd)
            except OSError:
                self.needs_rewrite = True
                raise
            self._dirty = False

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def wants_compaction(self) -> bool:
        return self.records_since_checkpoint >= self.compact_after

    def compact(self, state: dict[str, Any] | Callable[[], dict[str, Any]],
                seq: int | None = None) -> None:
        """Write ``state`` as the checkpoint and start a journal that holds only
        the records after ``seq``: the sequence number the state includes (by
        default the last one written; a callable state is then evaluated under
        the write lock, consistent with it)."""
        with self._write_lock:
            if callable(state):
                state = state()
            self._compact(state, self.seq if seq is None else seq)

    def _compact(self, state: dict[str, Any], seq: int) -> None:
        if self._fd is None:
            raise PoolError(f"{self.path}: the journal is not open")
        # No fsync of the old journal: the checkpoint and the new journal hold
        # everything in it (and after a failed fsync, its pages prove nothing).
        tmp = self.checkpoint_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(encode({"seq": seq, "state": state}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)
        _fsync_dir(self.directory)
        tail = [(s, line) for s, line in self._tail if s > seq]
        fresh = self.path.with_suffix(".tmp")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            data = b"".join(line for _, line in tail)
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, f"{fresh}: short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(fresh, self.path)
        _fsync_dir(self.directory)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._tail = tail
        self.records_since_checkpoint = len(tail)
        self._dirty = False
        self.needs_rewrite = False

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.sync()
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
