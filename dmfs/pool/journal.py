"""The metadata store: one append-only JSON-lines journal plus a checkpoint.

Each line is ``<crc32 hex> <json>``; the JSON carries a sequence number.  A
record that announces a device-mapper operation is fsync'd before the
operation starts (``durable=True``); records that only confirm one ride along
with the next durable write.  Compaction writes the whole state to
``checkpoint.json`` (temporary file, fsync, atomic rename, fsync of the
directory) and starts an empty journal; records at or below the checkpoint's
sequence number are skipped on replay, so a crash between the two steps is
harmless.

On open, a torn last record (cut by a crash mid-write: no newline, or a bad
checksum on the very last line) is dropped with a warning and cut off the
file; a damaged record anywhere else stops the start with the file name and
byte offset, since guessing could lose committed snapshots.
"""

from __future__ import annotations

import contextlib
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

        ``then`` (applying the record to the in-memory state) runs under the
        same lock, so a checkpoint never sees a record written but not applied.
        """
        with self._write_lock:
            if self._fd is None:
                raise RuntimeError("journal is not open")
            self.seq += 1
            data = encode({**record, "seq": self.seq})
            written = os.write(self._fd, data)
            if written != len(data):  # a short write on a full disk: no half a line
                raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
            self.records_since_checkpoint += 1
            self._dirty = True
            if durable:
                self._sync()
            if then is not None:
                then(record)
            return self.seq

    def sync(self) -> None:
        with self._write_lock:
            self._sync()

    def _sync(self) -> None:
        if self._fd is not None and self._dirty:
            failpoint("journal:fsync")
            os.fsync(self._fd)
            self._dirty = False

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def wants_compaction(self) -> bool:
        return self.records_since_checkpoint >= self.compact_after

    def compact(self, state: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """Write the state as the checkpoint and start an empty journal (a
        callable is evaluated under the write lock, consistent with the seq)."""
        with self._write_lock:
            self._compact(state() if callable(state) else state)

    def _compact(self, state: dict[str, Any]) -> None:
        self._sync()
        tmp = self.checkpoint_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(encode({"seq": self.seq, "state": state}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)
        _fsync_dir(self.directory)
        fresh = self.path.with_suffix(".tmp")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fsync(fd)
        os.replace(fresh, self.path)
        _fsync_dir(self.directory)
        if self._fd is not None:
            os.close(self._fd)
        os.close(fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.records_since_checkpoint = 0

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.sync()
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
