"""The production install (contrib/install --system) from a clean clone, used, removed.

The clone holds what is committed: commit before running this test.

It installs into the guest's own / (a tmpfs overlay: everything written there is
thrown away when the guest powers off).  The guest has no network, so pip takes
dmfs's libraries and build tools from the wheels contrib/install collected on the
host (``.venv/wheelhouse``).  One test, since each install costs tens of seconds
in the guest: install, install again (nothing changes), the unit verifies, the
manual page is found, the tree is served through mount -a from an fstab in both
helper spellings, uninstall refuses while dmfs runs, and afterwards everything is
as before but the user's configuration.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from dmfs.cli.mount import PIDFILE, wait_for_exit
from tests.support.loop_pool import LoopPool
from tests.support.tree import write_config

CHECKOUT = Path(__file__).resolve().parents[2]
WHEELS = CHECKOUT / ".venv" / "wheelhouse"
PREFIX = Path("/opt/dmfs")
CONFIG = Path("/etc/dmfs/pool0.toml")
#: where the install writes: whole trees, and directories whose entries alone matter
WATCHED_TREES = ("/etc", "/usr/local")
WATCHED_DIRS = ("/opt", "/usr/sbin", "/sbin")


def file_system_state() -> dict[str, str]:
    """Every path the install could add, change or leave behind: its type and mode, or
    its link target (contents and times aside)."""
    def describe(path: str) -> str:
        info = os.lstat(path)
        return (f"-> {os.readlink(path)}" if stat.S_ISLNK(info.st_mode)
                else stat.filemode(info.st_mode))

    state = {}
    for top in WATCHED_TREES:
        for directory, dirs, files in os.walk(top):
            for name in dirs + files:
                path = os.path.join(directory, name)
                state[path] = describe(path)
    for directory in WATCHED_DIRS:
        for name in os.listdir(directory):
            state[os.path.join(directory, name)] = describe(os.path.join(directory, name))
    return state


def sh(*argv: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                            timeout=600, check=False, cwd=cwd,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def mount_all(fstab: Path, line: str, mountpoint: Path, runtime_dir: Path) -> int:
    """mount -a from an fstab of one line; the pid of the daemon now serving it."""
    fstab.write_text(line + "\n")
    mountpoint.mkdir(exist_ok=True)
    sh("mount", "-a", "-T", fstab)
    entry = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                 if line.split()[4] == str(mountpoint))
    assert entry.split(" - ")[1].split()[:2] == ["fuse.dmfs", str(CONFIG)], entry
    # mount -a again finds it mounted and leaves it alone.
    sh("mount", "-a", "-T", fstab)
    return int((runtime_dir / PIDFILE).read_text())


def unmount(mountpoint: Path, pid: int) -> None:
    sh("umount", mountpoint)
    assert wait_for_exit(pid), f"dmfs {pid} did not stop after umount"


# Nothing here depends on udev, and it takes most of a minute: in the guest-udev
# tier only, which is the shorter of the two.
@pytest.mark.guest_udev_tier
def test_install_use_and_uninstall(scratch_dir: Path, thin_pool: LoopPool) -> None:
    if not any(WHEELS.glob("setuptools-*.whl")) or not any(WHEELS.glob("pyfuse3-*.whl")):
        pytest.fail(f"no wheels in {WHEELS}: run contrib/install on the host first (the "
                    f"guest has no network)")
    assert not PREFIX.exists(), f"{PREFIX} exists before the test"
    before = file_system_state()

    clone = scratch_dir / "clone"
    sh("git", "clone", "-q", CHECKOUT, clone)
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELS)}
    first = sh(clone / "contrib" / "install", "--system", env=offline)
    assert "installed: dmfs " in first.stdout
    installed = file_system_state()
    assert Path("/usr/local/bin/dmfs").readlink() == PREFIX / "bin" / "dmfs"
    assert Path("/sbin/mount.fuse.dmfs").readlink() == PREFIX / "bin" / "dmfs"
    for path in ("/usr/local/lib/systemd/system/dmfs@.service", "/etc/dmfs/dmfs.toml.example",
                 "/usr/local/share/man/man8/dmfs.8", "/usr/local/share/doc/dmfs/fstab.example"):
        assert oct(os.stat(path).st_mode & 0o777) == "0o644", path
    assert sh("git", "status", "--porcelain", "--ignored", cwd=clone).stdout == "", \
        "the install left files in the checkout"

    # Again: nothing changes (the same commit is not built again).
    again = sh(clone / "contrib" / "install-system", env=offline)
    assert "is already commit" in again.stdout
    assert file_system_state() == installed

    # The unit's ExecStart names the installed command; systemd finds nothing to say.
    verify = sh("systemd-analyze", "verify", "/usr/local/lib/systemd/system/dmfs@.service",
                check=False)
    assert (verify.returncode, verify.stderr) == (0, "")
    found = Path(sh("man", "-w", "dmfs").stdout.strip())  # Debian: /usr/local/man -> share/man
    assert found.resolve() == Path("/usr/local/share/man/man8/dmfs.8")
    version = sh("dmfs", "--version").stdout  # found on PATH, run from the venv
    assert version.startswith("dmfs ") and f"({PREFIX / 'bin' / 'python'})" in version

    # The user's configuration, and the tree served through mount(8) from fstab lines:
    # /sbin/mount.fuse.dmfs for type fuse.dmfs, mount.fuse3 running `dmfs` for dmfs#.
    written = write_config(scratch_dir, thin_pool.name)
    CONFIG.write_text(written.read_text())
    mountpoint, runtime_dir = scratch_dir / "mnt", scratch_dir / "run"
    fstab = scratch_dir / "fstab"
    pid = mount_all(fstab, f"{CONFIG} {mountpoint} fuse.dmfs nofail,nodev,nosuid 0 0",
                    mountpoint, runtime_dir)
    sh("sh", "-c", "mkdir base && echo served > base/fs/file && mv base base-c", cwd=mountpoint)
    refused = sh(clone / "contrib" / "install", "--system", "--uninstall", check=False)
    assert refused.returncode == 1 and f"dmfs from {PREFIX} is running" in refused.stderr
    assert PREFIX.exists()
    unmount(mountpoint, pid)

    pid = mount_all(fstab, f"dmfs#{CONFIG} {mountpoint} fuse nofail,nodev,nosuid 0 0",
                    mountpoint, runtime_dir)
    assert (mountpoint / "base-c" / "fs" / "file").read_text() == "served\n"
    os.rmdir(mountpoint / "base-c")
    unmount(mountpoint, pid)

    removed = sh(clone / "contrib" / "install", "--system", "--uninstall")
    assert "keeping /etc/dmfs: it holds files the install did not put there" in removed.stdout
    after = file_system_state()
    assert after.pop(str(CONFIG)) == "-rw-r--r--", "the user's configuration is gone"
    assert after.pop("/etc/dmfs") == "drwxr-xr-x"
    assert after == before
