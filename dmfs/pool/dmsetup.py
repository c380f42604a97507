"""A :class:`~dmfs.pool.dm.DeviceMapper` that runs the ``dmsetup`` command.

The fallback driver: every call starts a process (≈1.4 ms on a host, ≈55 ms in
the test guest).  dmsetup reports failures as text ending in the kernel's
strerror, e.g. ``device-mapper: message ioctl on pool  failed: File exists``;
the errno is recovered from that text so callers still decide by errno.
"""

from __future__ import annotations

import errno as errno_codes
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

from dmfs.pool.dm import DeviceInfo, DmError, NoSuchDevice, Target, dm_error

MIN_VERSION = (1, 2, 110)
# The errnos a dm ioctl answers with, recognised by their strerror text.
_KNOWN_ERRNOS = (
    errno_codes.EEXIST, errno_codes.ENXIO, errno_codes.ENODEV, errno_codes.ENODATA,
    errno_codes.EBUSY, errno_codes.EINVAL, errno_codes.ENOSPC, errno_codes.ENOMEM,
    errno_codes.EPERM, errno_codes.EACCES, errno_codes.EIO, errno_codes.ENOTTY,
    errno_codes.ENOENT, errno_codes.EROFS,
)
_ERRNO_BY_TEXT = {os.strerror(code): code for code in _KNOWN_ERRNOS}
_VERSION_RE = re.compile(r"Library version:\s+(\d+)\.(\d+)\.(\d+)")
_DRIVER_RE = re.compile(r"Driver version:\s+(\S+)")


class DmsetupDriver:
    """Device-mapper through the ``dmsetup`` command (>= 1.02.110)."""

    name = "dmsetup"

    def __init__(self, dmsetup: str | None = None) -> None:
        found = dmsetup or shutil.which("dmsetup")
        if found is None:
            raise FileNotFoundError("dmsetup not found: install the dmsetup package")
        self.dmsetup = found
        self._check_version()

    def _run(self, operation: str, device: str | None, *args: str,
             stdin: str | None = None) -> str:
        result = subprocess.run([self.dmsetup, *args], input=stdin, capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise self._error(operation, device, result.stderr)
        return result.stdout

    @staticmethod
    def _error(operation: str, device: str | None, stderr: str) -> DmError:
        text = stderr.strip()
        if "Device does not exist" in text or "No such device or address" in text:
            return NoSuchDevice(errno_codes.ENXIO, operation, device)
        for line in text.splitlines():
            _, _, reason = line.rpartition("failed: ")
            if reason.strip() in _ERRNO_BY_TEXT:
                return dm_error(_ERRNO_BY_TEXT[reason.strip()], operation, device)
        return DmError(errno_codes.EIO, operation, device, text.replace("\n", "; "))

    def _check_version(self) -> None:
        out = self._run("version", None, "version")
        match = _VERSION_RE.search(out)
        if match is None or tuple(int(g) for g in match.groups()) < MIN_VERSION:
            raise RuntimeError(f"dmsetup library >= 1.02.110 needed, found: {out.strip()!r}")

    def version(self) -> str:
        match = _DRIVER_RE.search(self._run("version", None, "version"))
        return match.group(1) if match else ""

    def create(self, name: str, targets: Sequence[Target], *, read_only: bool = False,
               uuid: str = "") -> DeviceInfo:
        args = ["create", name]
        if read_only:
            args.append("--readonly")
        if uuid:
            args += ["--uuid", uuid]
        self._run("create", name, *args, stdin="".join(t.line() + "\n" for t in targets))
        return self.info(name)

    def remove(self, name: str, *, deferred: bool = False) -> None:
        args = ["remove", *(["--deferred"] if deferred else []), name]
        self._run("remove", name, *args)

    def suspend(self, name: str, *, flush: bool = True) -> None:
        self._run("suspend", name, "suspend", *([] if flush else ["--noflush"]), name)

    def resume(self, name: str) -> None:
        self._run("resume", name, "resume", name)

    def info(self, name: str) -> DeviceInfo:
        out = self._run("info", name, "info", "-c", "--noheadings", "--separator", ";",
                        "-o", "name,major,minor,open,segments,attr,events,uuid", name)
        fields = out.strip().split(";")
        if len(fields) < 8:
            raise DmError(errno_codes.EIO, "info", name, f"unexpected output {out!r}")
        attr = fields[5]
        return DeviceInfo(
            name=fields[0], major=int(fields[1]), minor=int(fields[2]),
            open_count=int(fields[3]), target_count=int(fields[4]),
            live_table=attr[0] == "L", inactive_table=attr[1] == "I",
            suspended=attr[2] == "s", read_only=attr[3] == "r",
            event_nr=int(fields[6]), uuid=fields[7])

    @staticmethod
    def _targets(out: str) -> list[Target]:
        targets = []
        for line in out.splitlines():
            if not line.strip():
                continue
            start, length, target_type, *params = line.split(maxsplit=3)
            targets.append(Target(int(start), int(length), target_type,
                                  params[0].strip() if params else ""))
        return targets

    def status(self, name: str, *, flush: bool = True) -> list[Target]:
        return self._targets(self._run("status", name, "status",
                                       *([] if flush else ["--noflush"]), name))

    def table(self, name: str) -> list[Target]:
        return self._targets(self._run("table", name, "table", name))

    def message(self, name: str, message: str, sector: int = 0) -> str:
        return self._run("message", name, "message", name, str(sector), message).strip()

    def list_devices(self) -> dict[str, tuple[int, int]]:
        out = self._run("list", None, "ls")
        devices = {}
        for line in out.splitlines():
            match = re.match(r"^(\S+)\s+\((\d+)[:,]\s*(\d+)\)$", line.strip())
            if match:
                devices[match.group(1)] = (int(match.group(2)), int(match.group(3)))
        return devices

    def wait_event(self, name: str, event_nr: int) -> int:
        self._run("wait", name, "wait", name, str(event_nr))
        return self.info(name).event_nr

    def device_path(self, name: str) -> str:
        return f"/dev/mapper/{name}"

    def close(self) -> None:
        """Nothing to release: every call is its own process."""

    def event_watch(self) -> None:
        """dmsetup has no pollable events (``dmsetup wait`` blocks a process)."""
        return None
