"""What a dmfs command's start imports: not the daemon's libraries.

Every command builds the whole parser, so what the command modules import at
their top is paid by every command; ``dmfs diff`` is measured against
``diff -rq`` as a whole command (bench/diff_ops.py), and in the test guest
trio and pyudev alone were ~0.2 s of it.  A fresh interpreter does what
``dmfs diff`` does before and around its comparison, short of touching a
device, and lists the modules it ended up with: a regression guard that needs
no timing.
"""

from __future__ import annotations

import subprocess
import sys

#: libraries only the daemon (or dmfs --version) needs, with what they cost
#: at a command's start in the test guest (-X importtime, bytecode cached)
NOT_AT_START = {
    "trio": "~0.2 s with its dependencies (attrs, ssl, hashlib)",
    "pyudev": "libudev through ctypes",
    "pyfuse3": "libfuse",
    "grpc": "the gRPC runtime",
    "importlib.metadata": "90 ms (only --version reads package versions)",
    "tomllib": "15 ms (only commands that read a config file)",
    "logging.handlers": "socket and pickle (only the daemon logs to syslog)",
}

DIFF_START = """
import contextlib, io, sys
from dmfs.cli.main import build_parser
parser = build_parser()
parser.parse_args(["diff", "/srv/snapshots/base", "/srv/snapshots/base/app"])
for argv in (["--help"], ["diff", "--help"]):
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        parser.parse_args(argv)
# what run_diff imports before it compares: the comparison, the tree's names,
# the thin delta and the ioctl driver (its node strategy included)
import dmfs.cli.diff, dmfs.diff, dmfs.diff.lineage, dmfs.fuse.names
from dmfs.pool import ThinPool, device_node, mountinfo, open_driver, read_delta, thin_device_of
from dmfs.pool.dmioctl import IoctlDriver
from dmfs.pool.dmnodes import UdevNodes
UdevNodes()
print(" ".join(sorted(sys.modules)))
"""


def test_dmfs_diff_and_help_start_without_the_daemons_libraries() -> None:
    result = subprocess.run([sys.executable, "-c", DIFF_START], capture_output=True,
                            text=True, check=True)
    modules = set(result.stdout.split())
    assert "dmfs.diff.compare" in modules and "dmfs.pool.dmioctl" in modules
    loaded = {name: why for name, why in NOT_AT_START.items()
              if name in modules or any(m.startswith(f"{name}.") for m in modules)}
    assert not loaded, f"imported at the start of dmfs diff: {loaded}"
