"""Mounting dmfs the way a user does, and acting as other users, for guest tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dmfs.cli.mount import wait_for_exit
from dmfs.pool import fs

DAEMON_EXIT_TIMEOUT = 60.0


def write_config(directory: Path, pool_name: str, **settings: object) -> Path:
    """A [dmfs] TOML file for ``pool_name`` with state and mounts in ``directory``."""
    values: dict[str, object] = {
        "pool_name": pool_name, "base_image_size": "64MiB",
        "root_path": str(directory / "state"), "runtime_path": str(directory / "run"),
        "idle_timeout": "1h", **settings}
    lines = ["[dmfs]"]
    for key, value in values.items():
        rendered = str(value).lower() if isinstance(value, bool) else (
            str(value) if isinstance(value, int | float) else f'"{value}"')
        lines.append(f"{key} = {rendered}")
    path = directory / "dmfs.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


CHECKOUT = Path(__file__).resolve().parents[2]


def dmfs(*args: str, check: bool = True, env: dict[str, str] | None = None,
         module: str = "dmfs") -> subprocess.CompletedProcess[str]:
    """Run the dmfs command (this checkout's) and return its result; ``module``
    may name a wrapper such as ``tests.support.stock_pyfuse3``."""
    path = {"PYTHONPATH": str(CHECKOUT)} if module != "dmfs" else {}
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                            text=True, check=False, timeout=300,
                            env={**os.environ, **path, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"dmfs {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stderr}")
    return result


class MountedTree:
    """A dmfs daemon serving a mountpoint, started with ``dmfs mount``."""

    def __init__(self, config: Path, mountpoint: Path, runtime_dir: Path) -> None:
        self.config = config
        self.mountpoint = mountpoint
        self.runtime_dir = runtime_dir
        self.pid: int | None = None

    def mount(self, *options: str, module: str = "dmfs") -> subprocess.CompletedProcess[str]:
        """`dmfs mount CONFIG MOUNTPOINT`; returns once mounted, with its output."""
        with contextlib.suppress(FileExistsError):  # (a dead mount fails even exist_ok)
            self.mountpoint.mkdir()
        result = dmfs("mount", str(self.config), str(self.mountpoint), *options, module=module)
        self.pid = int((self.runtime_dir / "dmfs.pid").read_text())
        return result

    def is_mounted(self) -> bool:
        return any(e.mountpoint == self.mountpoint and e.fs_type == "fuse.dmfs"
                   for e in fs.mountinfo())

    def unmount(self) -> None:
        """umount the tree and wait for the daemon to finish its cleanup."""
        subprocess.run(["umount", str(self.mountpoint)], check=True, capture_output=True)
        self.wait_stopped()

    def signal(self, signum: int) -> None:
        assert self.pid is not None
        os.kill(self.pid, signum)
        self.wait_stopped()

    def wait_stopped(self) -> None:
        assert self.pid is not None
        assert wait_for_exit(self.pid), f"dmfs daemon {self.pid} did not stop"
        self.pid = None

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def pool_lines(self) -> dict[str, str]:
        """``M/.dmfs/pool`` as a dict of its ``key: value`` lines."""
        text = self.path(".dmfs", "pool").read_text()
        return dict(line.split(": ", 1) for line in text.splitlines())

    def requests(self) -> dict[str, int]:
        """FUSE requests that reached the daemon so far, per handler."""
        summary = self.pool_lines()["fuse_requests"]
        return {name: int(count) for name, count in
                (item.split("=") for item in summary.split() if "=" in item)}

    def log(self) -> str:
        try:
            return (self.runtime_dir / "dmfs.log").read_text()
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Whatever state a test left: no daemon, no mount."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            if not wait_for_exit(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                wait_for_exit(self.pid, 10)
            self.pid = None
        if self.is_mounted():
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)


def errno_of(call: Callable[[], object]) -> int:
    """The errno a call fails with (0 when it succeeds)."""
    try:
        call()
    except OSError as error:
        return error.errno or -1
    return 0


def as_user(uid: int, gid: int, groups: list[int], call: Callable[[], object]) -> int:
    """Run ``call`` in a child process with those credentials; its errno (0 = ok).

    The machine's Python lives where other users cannot exec it, so the child
    is a fork that drops privileges, not a new program (DESIGN.md §4).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            code = errno_of(call)
            os.write(write_end, str(code).encode())
        finally:
            os._exit(0 if code == 0 else 1)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer, "the child acting as another user died"
    return int(answer)



@contextlib.contextmanager
def hellofs_mounted(mountpoint: Path) -> Iterator[subprocess.Popen[str]]:
    """tests/support/hellofs.py (a trivial pyfuse3 + trio filesystem) mounted at
    the new directory ``mountpoint`` until the block ends; then killed if it
    still runs, and its mount cleared."""
    mountpoint.mkdir()
    fs = subprocess.Popen([sys.executable, str(Path(__file__).parent / "hellofs.py"),
                           str(mountpoint)], stdout=subprocess.PIPE, text=True)
    try:
        # hellofs prints "ready" after pyfuse3.init() has mounted it.
        assert fs.stdout is not None and fs.stdout.readline().strip() == "ready"
        yield fs
    finally:
        if fs.poll() is None:
            fs.kill()
            fs.wait()
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2) with flags (RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def wait_until(condition: Callable[[], bool], timeout: float = 30.0,
               what: str = "condition") -> None:
    """Wait for a state the daemon reaches on its own (e.g. idle expiry).

    Checks every 50 ms; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


