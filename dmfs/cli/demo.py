"""``dmfs demo``: a guided tour on a throw-away loop-backed pool.

Creates a pool on sparse files, mounts dmfs on it (``dmfs mount``, a daemon),
builds layers with mkdir / cp / mv, makes a view, browses it, shows labels and
the refusals that protect the tree, shows the control directory, prints the
lineage (``dmfs tree``), removes everything in the only legal order (children
first), unmounts and destroys the pool, also when a step fails.  Each step is
printed as the shell command it is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dmfs.cli.common import EXIT_OK, OperationFailed, add_command
from dmfs.cli.mount import PIDFILE, wait_for_exit
from dmfs.cli.pool import created_lines, destroyed_lines
from dmfs.cli.preflight import open_device_mapper, require_device_mapper, require_fuse, require_root
from dmfs.pool import plan_loop_pool
from dmfs.units import parse_size

#: (command, expected to fail) — run in the mounted tree
TOUR: list[tuple[str, str, bool]] = [
    ("A parentless mkdir prepares an empty, writable snapshot", "mkdir base", False),
    ("", "ls -l base", False),
    ("Its files are an ordinary ext4 filesystem under fs",
     "mkdir -p base/fs/etc && echo 'release 1' > base/fs/etc/release && "
     "cp /etc/os-release base/fs/etc/os-release && ls -l base/fs/etc", False),
    ("mv commits it: the node becomes read-only (mode 555)", "mv base base-v1 && ls -ld base-v1",
     False),
    ("A committed snapshot's files cannot change", "touch base-v1/fs/etc/new", True),
    ("mkdir under a committed node prepares a child with its content",
     "mkdir base-v1/app && cat base-v1/app/fs/etc/release", False),
    ("", "echo 'release 2' > base-v1/app/fs/etc/release && mkdir base-v1/app/fs/srv && "
     "echo 'hello' > base-v1/app/fs/srv/index.html", False),
    ("", "mv base-v1/app base-v1/app-v1", False),
    ("mkdir without the owner-write bit makes a read-only view",
     "mkdir -m 0555 base-v1/app-v1/look && ls -ld base-v1/app-v1/look", False),
    ("", "cat base-v1/app-v1/look/fs/etc/release base-v1/app-v1/look/fs/srv/index.html", False),
    ("Each layer keeps its own version", "cat base-v1/fs/etc/release", False),
    ("Labels and information are extended attributes",
     "setfattr -n user.label.owner -v demo base-v1/app-v1 && "
     "getfattr -d -m user. base-v1/app-v1", False),
    ("The lineage cannot change: mv to another parent is refused",
     "mkdir -m 0555 look2 && mv look2 base-v1/", True),
    ("", "rmdir look2", False),
    ("A parent with children cannot be removed", "rmdir base-v1", True),
    ("The control directory", "cat .dmfs/pool && ls -l .dmfs/by-name", False),
    ("", "find -L . -path ./.dmfs -prune -o -name release -print", False),
]
CLEANUP = "rmdir base-v1/app-v1/look base-v1/app-v1 base-v1 && ls -A"


def add_parser(commands: argparse._SubParsersAction) -> None:
    demo = add_command(
        commands, "demo", "a guided tour on a throw-away pool",
        (
            "Create a loop-backed thin pool on sparse files, mount dmfs on it, build\n"
            "layers with mkdir/cp/mv, make a view, browse it, remove everything in\n"
            "order, print the tree and clean up. Needs root, dm-thin and FUSE."),
        ["dmfs demo"])
    demo.add_argument("--dir", type=Path, help="work directory (default: a new one in "
                      "/var/tmp, removed afterwards)")
    demo.add_argument("--size", default="512MiB",
                      help="pool data size (default: 512MiB, sparse)")
    demo.set_defaults(run=run_demo)


def _dmfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmfs", *args], capture_output=True,
                          text=True, check=False)


def _step(title: str, command: str, cwd: Path, expect_failure: bool) -> None:
    if title:
        print(f"\n# {title}")
    print(f"$ {command}")
    result = subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True,
                            check=False)
    output = (result.stdout + result.stderr).rstrip()
    if output:
        print(output)
    if (result.returncode != 0) != expect_failure:
        raise OperationFailed(f"demo step {command!r} "
                              f"{'succeeded' if expect_failure else 'failed'} unexpectedly")
    if expect_failure:
        print("(refused, as it should be)")


def run_demo(args: argparse.Namespace) -> int:
    # Imported here, not with this module: every dmfs command imports it to build
    # its parser.
    import tempfile

    from dmfs.pool import create_loop_pool, destroy_pool

    require_root("dmfs demo")
    require_device_mapper()
    require_fuse()
    for tool in ("setfattr", "getfattr"):
        if shutil.which(tool) is None:
            raise OperationFailed(f"{tool} not found: install the attr package")
    work = args.dir or Path(tempfile.mkdtemp(prefix="dmfs-demo-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    name = f"dmfs-demo-{os.getpid()}"
    dm = open_device_mapper("ioctl")
    config = work / "demo.toml"
    tree = work / "tree"
    mounted = False
    try:
        spec = plan_loop_pool(name, work, parse_size(args.size))
        print(f"$ dmfs pool create --loopback {work} --size {args.size} --name {name}")
        print("\n".join(created_lines(create_loop_pool(dm, spec))))
        config.write_text(
            f'[dmfs]\npool_name = "{name}"\nbase_image_size = "128MiB"\n'
            f'root_path = "{work / "state"}"\nruntime_path = "{work / "run"}"\n')
        tree.mkdir(exist_ok=True)
        print(f"\n$ dmfs mount {config} {tree}")
        result = _dmfs("mount", str(config), str(tree))
        print(result.stderr.rstrip())
        if result.returncode != 0:
            raise OperationFailed("dmfs mount failed")
        mounted = True
        for title, command, expect_failure in TOUR:
            _step(title, command, tree, expect_failure)
        print(f"\n$ dmfs tree {config}")
        print(_dmfs("tree", str(config)).stdout.rstrip())
        _step("Remove in the only legal order: children first", CLEANUP, tree, False)
        print(f"\n$ umount {tree}")
        _unmount(tree, work)
        mounted = False
        print("\nThe demo went as it should. Cleaning up.")
        return EXIT_OK
    except OperationFailed:
        raise
    except Exception as error:
        raise OperationFailed(f"demo failed: {error}") from error
    finally:
        if mounted:
            _unmount(tree, work, lazy=True)
        print(f"$ dmfs pool destroy --name {name} --loopback {work}")
        try:
            print("\n".join(destroyed_lines(destroy_pool(dm, name, loopback_dir=work))))
        except Exception as error:  # the pool may not exist when creation failed
            print(f"(pool {name}: {error})")
        dm.close()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _unmount(tree: Path, work: Path, lazy: bool = False) -> None:
    pidfile = work / "run" / PIDFILE
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    subprocess.run(["umount", *(["-l"] if lazy else []), str(tree)], check=not lazy,
                   capture_output=True)
    if pid is not None and not wait_for_exit(pid):
        raise OperationFailed(f"the dmfs daemon {pid} did not stop after umount")

