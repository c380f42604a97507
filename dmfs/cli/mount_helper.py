"""How mount(8) and mount.fuse3 start dmfs, turned into a ``dmfs mount`` command line.

Two calling conventions reach dmfs for a FUSE filesystem of type ``fuse.dmfs``
(both seen in the test guest: util-linux 2.38, fuse3 3.14):

- mount(8) runs ``/sbin/mount.fuse.dmfs`` (a link to dmfs, made by the
  production install) as ``mount.fuse.dmfs CONFIG MOUNTPOINT [-s] [-f] [-n] [-v]
  [-N NAMESPACE] -o OPTIONS [-t TYPE]``.  OPTIONS starts with ``rw``, keeps
  fstab's ``nofail`` and lacks its ``x-*`` options; ``-f`` is ``mount -f``
  ("fake": do everything but mount).
- Without that link mount(8) falls back to ``/sbin/mount.fuse`` (mount.fuse3)
  with ``-t fuse.dmfs``; so does the fstab spelling ``dmfs#CONFIG MOUNTPOINT
  fuse OPTIONS``.  mount.fuse3 drops ``nofail``, ``_netdev``, ``auto``,
  ``user`` and the like, adds ``dev`` and ``suid`` unless ``nodev``/``nosuid``
  were given, and runs ``dmfs CONFIG MOUNTPOINT -o OPTIONS`` through /bin/sh
  with mount's minimal PATH (so dmfs must be in /usr/local/bin or the like).
  With its ``drop_privileges`` option the mountpoint is ``/dev/fd/N``, a FUSE
  descriptor opened for an unprivileged daemon: dmfs needs root and mounts the
  tree itself, so that is refused.

Both become ``dmfs mount CONFIG MOUNTPOINT -o OPTIONS`` (``--fake`` for ``-f``),
which returns once the tree is mounted, as mount(8) expects.

``mount -a`` skips a line whose filesystem is mounted already, by comparing
/proc/self/mountinfo with fstab.  For ``dmfs#CONFIG`` lines it cannot (the
mount's type is fuse.dmfs and its source CONFIG, the line's ``fuse`` and
``dmfs#CONFIG``) and calls the helper again: a tree that a live dmfs already
serves for that CONFIG at that MOUNTPOINT is then left as it is, with success.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection, Sequence
from pathlib import Path

#: mount(8)'s helper flags that ask nothing of dmfs: sloppy, no mtab, verbose
IGNORED_FLAGS = frozenset({"-s", "-n", "-v"})


class HelperCallError(ValueError):
    """A mount helper call dmfs cannot serve; the message says why."""


def command_names(parser: argparse.ArgumentParser) -> set[str]:
    """The names of the parser's sub-commands (``mount``, ``pool``, ...)."""
    return {name for action in parser._actions
            if isinstance(action, argparse._SubParsersAction) for name in action.choices}


def is_helper_call(argv: Sequence[str], program: str, commands: Collection[str]) -> bool:
    """Whether dmfs was started as a mount helper rather than as ``dmfs COMMAND``.

    By its name (``mount.fuse.dmfs``), or because the first argument is a
    configuration file rather than a command: a path with a ``/`` (what fstab
    holds), or an existing file that is not named like a command.
    """
    if os.path.basename(program).startswith("mount."):
        return True
    if not argv or argv[0].startswith("-") or argv[0] in commands:
        return False
    return "/" in argv[0] or os.path.isfile(argv[0])


def helper_argv(argv: Sequence[str]) -> list[str]:
    """``CONFIG [MOUNTPOINT] [flags] [-o OPTIONS]...`` as a ``dmfs mount`` command line.

    Raises HelperCallError for what dmfs cannot do (another mount namespace,
    drop_privileges) and for flags that mount(8) does not pass.
    """
    positional: list[str] = []
    options: list[str] = []
    fake = False
    words = iter(argv)
    for word in words:
        if word == "-o":
            options.append(next(words, ""))
        elif word.startswith("-o"):
            options.append(word[2:])
        elif word == "-t":
            next(words, None)  # fuse.dmfs, or fuse: nothing to choose
        elif word == "-f":
            fake = True
        elif word == "-N":
            raise HelperCallError("mount -N (mounting in another mount namespace) is not "
                                  "supported: run mount inside that namespace")
        elif word in IGNORED_FLAGS:
            continue
        elif word.startswith("-"):
            raise HelperCallError(f"unknown mount helper option {word!r}")
        else:
            positional.append(word)
    if not 1 <= len(positional) <= 2:
        raise HelperCallError("a mount helper call is CONFIG MOUNTPOINT [-o OPTIONS], got "
                              + (" ".join(argv) or "nothing"))
    if len(positional) == 2 and positional[1].startswith("/dev/fd/"):
        raise HelperCallError(
            f"mountpoint {positional[1]}: the drop_privileges mount option is not supported "
            f"(dmfs needs root and mounts the tree itself); remove it")
    merged = ",".join(option for option in options if option)
    if len(positional) == 2 and already_served(*positional):
        fake = True
    return ["mount", *positional, *(["-o", merged] if merged else []),
            *(["--fake"] if fake else [])]


def already_served(config: str, mountpoint: str) -> bool:
    """A live dmfs serves ``config`` at ``mountpoint`` (the last mount there is dmfs's
    tree of that config, and it answers)."""
    target = Path(os.path.abspath(mountpoint))
    # here, not at the top: every dmfs command asks is_helper_call, and the mount
    # table's reader brings the engine's fs module (20-30 ms in the guest)
    from dmfs.pool import mountinfo

    entries = [entry for entry in mountinfo() if entry.mountpoint == target]
    if not entries or entries[-1].fs_type != "fuse.dmfs":
        return False
    if os.path.abspath(entries[-1].source) != os.path.abspath(config):
        return False
    try:
        os.stat(target)  # ENOTCONN when its daemon died: `dmfs mount` clears that
    except OSError:
        return False
    return True
