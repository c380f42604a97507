"""``dmfs --version``: dmfs and what it runs on, so a bug report says it all.

Besides dmfs's version: the Python and the libraries the tree depends on
(pyfuse3 and the libfuse it is linked with, trio, pyudev), the kernel, and
whether the kernel caches the targets of the tree's ``fs`` symlinks
(FUSE_CAP_CACHE_SYMLINKS, DESIGN.md §6) and its listings (FOPEN_CACHE_DIR):
both need Linux ≥ 4.20 and a pyfuse3 that can ask for them, which stock
pyfuse3 3.5 cannot (contrib/pyfuse3 has the patches).  The kernel's FUSE protocol
version is only known once a filesystem is mounted (the INIT exchange), so it
is not shown.  Every probe is defensive: ``--version`` always answers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from dmfs import __version__

#: the first kernel whose FUSE protocol (7.28) has FUSE_CACHE_SYMLINKS
CACHE_SYMLINKS_KERNEL = (4, 20)
LIBFUSE = "libfuse3.so.3"


def package_version(name: str) -> str:
    # Imported here: importlib.metadata is 90 ms of every dmfs command's start
    # in the test guest, and only --version needs it.
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def libfuse_version() -> str:
    """The version of the libfuse 3 library the dynamic linker finds (pyfuse3's)."""
    import ctypes

    try:
        library = ctypes.CDLL(LIBFUSE)
        library.fuse_pkgversion.restype = ctypes.c_char_p
        return library.fuse_pkgversion().decode()
    except (OSError, AttributeError) as error:
        return f"unknown ({error})"


def pyfuse3_caches_symlinks() -> bool | None:
    """Whether this pyfuse3 can ask the kernel to cache symlink targets (the tree's
    own answer, :data:`dmfs.fuse.linkcache.PYFUSE3_CAN_ASK`); None when pyfuse3
    is missing."""
    try:
        from dmfs.fuse.linkcache import PYFUSE3_CAN_ASK
    except ImportError:
        return None
    return PYFUSE3_CAN_ASK


def pyfuse3_caches_listings() -> bool | None:
    """Whether this pyfuse3's opendir can ask the kernel to cache listings (the
    tree's own answer, :data:`dmfs.fuse.listings.PYFUSE3_CAN_CACHE`); None when
    pyfuse3 is missing."""
    try:
        from dmfs.fuse.listings import PYFUSE3_CAN_CACHE
    except ImportError:
        return None
    return PYFUSE3_CAN_CACHE


def kernel_release(release: str | None = None) -> tuple[str, tuple[int, int] | None]:
    """The running kernel's release string and its (major, minor), if readable."""
    release = release or os.uname().release
    match = re.match(r"(\d+)\.(\d+)", release)
    return release, (int(match[1]), int(match[2])) if match else None


def kernel_caching(pyfuse3_can: bool | None, kernel: tuple[int, int] | None) -> str:
    """One phrase: is a FUSE cache of the kernel's (symlink targets, listings:
    both since Linux 4.20) in use, and if not, what is missing."""
    if kernel is not None and kernel < CACHE_SYMLINKS_KERNEL:
        return "not available (needs Linux 4.20 or later)"
    if pyfuse3_can is None:
        return "unknown (pyfuse3 cannot be imported)"
    if not pyfuse3_can:
        return "not in use, this pyfuse3 cannot request it"
    return "in use"


def version_report() -> str:
    release, kernel = kernel_release()
    rows = [
        ("python", f"{'.'.join(map(str, sys.version_info[:3]))} ({sys.executable})"),
        ("pyfuse3", package_version("pyfuse3")),
        ("libfuse", libfuse_version()),
        ("trio", package_version("trio")),
        ("pyudev", package_version("pyudev")),
        ("kernel", release),
        ("features", "FUSE symlink caching (FUSE_CAP_CACHE_SYMLINKS) "
                     + kernel_caching(pyfuse3_caches_symlinks(), kernel)
                     + "; FUSE listing caching (FOPEN_CACHE_DIR) "
                     + kernel_caching(pyfuse3_caches_listings(), kernel)),
    ]
    return "\n".join([f"dmfs {__version__}", *(f"  {name:<9} {value}" for name, value in rows)])


class VersionAction(argparse.Action):
    """``--version``: print :func:`version_report` and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        kwargs.setdefault("help", "show dmfs's version, its libraries' and the kernel "
                                  "features in use, and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        try:
            print(version_report(), flush=True)
        except BrokenPipeError:  # `dmfs --version | head -n 1`: the reader has had enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit()
