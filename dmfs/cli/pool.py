"""``dmfs pool create`` and ``dmfs pool destroy``: loop-backed thin pools.

The work is done by :mod:`dmfs.pool.loopback`; this module holds the parsers,
the checks of the machine and the text for the terminal.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dmfs.cli.common import (
    EXIT_OK,
    EXIT_STATUS_HELP,
    HelpFormatter,
    UsageError,
    add_command,
    directory_argument,
    driver_option,
    emit,
    json_option,
    low_water_argument,
    new_directory_argument,
    pool_name_argument,
    size_argument,
)
from dmfs.cli.preflight import (
    EnvironmentProblem,
    open_device_mapper,
    require_device_mapper,
    require_root,
    require_tool,
)
from dmfs.pool import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LOW_WATER,
    PoolError,
    PoolSpecError,
    plan_loop_pool,
)
from dmfs.units import SIZE_EXAMPLES, format_size

if TYPE_CHECKING:
    from dmfs.pool import DestroyReport, PoolReport


def add_parser(commands: argparse._SubParsersAction) -> None:
    pool = commands.add_parser(
        "pool", help="create or destroy a loop-backed thin pool",
        description="Create or destroy a thin pool on two sparse files (for tests, demos\n"
                    "and small machines). For a production pool on disks or LVM, see\n"
                    "contrib/PRODUCTION-POOL.md.",
        epilog=EXIT_STATUS_HELP, formatter_class=HelpFormatter)
    actions = pool.add_subparsers(dest="pool_command", metavar="ACTION", required=True)

    create = add_command(
        actions, "create", "create a loop-backed thin pool",
        (
            "Create thin pool NAME on two sparse files in DIR, NAME.data and NAME.metadata,\n"
            "each on a loop device. The pool fails writes at once when full\n"
            "(error_if_no_space) and raises a device event when its free data blocks fall\n"
            "below the low-water mark.\n\n"
            "Running it again is harmless: a pool NAME already on those files is reported\n"
            "as it is (with different options it is an error, pools are not changed). If\n"
            "the files exist but the pool does not (after a reboot, or `pool destroy`\n"
            "without --loopback), they are attached again and the pool comes back with\n"
            "its thin devices and data."),
        ["dmfs pool create --loopback /var/lib/dmfs-pools --size 20GiB --name pool0"],
        notes=(f"sizes: {SIZE_EXAMPLES};\n"
               "every unit is 1024-based, as in containerd (10GB = 10GiB)."))
    create.add_argument("--loopback", metavar="DIR", type=new_directory_argument,
                        required=True,
                        help="directory for the pool's files; made (mode 0700, with its "
                             "parents) if missing")
    create.add_argument("--size", type=size_argument, required=True,
                        help="data size (the file is sparse: space is used as data is written)")
    create.add_argument("--name", type=pool_name_argument, required=True,
                        help="device-mapper name of the pool (/dev/mapper/NAME)")
    create.add_argument("--metadata-size", metavar="SIZE", type=size_argument,
                        help="metadata size (default: 96 bytes per data block, at least "
                             "16MiB; sparse as well)")
    create.add_argument("--block-size", metavar="SIZE", type=size_argument,
                        default=DEFAULT_BLOCK_SIZE,
                        help=f"data block size, the unit of allocation and copy-on-write: a "
                             f"multiple of 64KiB up to 1GiB (default: "
                             f"{format_size(DEFAULT_BLOCK_SIZE)})")
    create.add_argument("--low-water", metavar="SIZE|PERCENT", type=low_water_argument,
                        default=DEFAULT_LOW_WATER,  # parsed by the type, when used
                        help=f"free space below which the kernel raises an event, as a size or "
                             f"a percentage of the data blocks (default: "
                             f"{DEFAULT_LOW_WATER.replace('%', '%%')})")
    create.add_argument("--overcommit", action="store_true",
                        help="create the files even if DIR's filesystem cannot hold them "
                             "full (a pool whose file cannot grow fails and needs repair)")
    driver_option(create)
    json_option(create)
    create.set_defaults(run=run_pool_create)

    destroy = add_command(
        actions, "destroy", "remove a thin pool and its loop devices",
        (
            "Remove thin pool NAME and detach its loop devices. Refuses while any device\n"
            "is active on the pool (a thin device, mounted or not): stop dmfs first.\n"
            "Without --loopback the files stay, and `pool create` with the same options\n"
            "brings the pool back; with --loopback DIR they are deleted, and with them\n"
            "every snapshot in the pool."),
        ["dmfs pool destroy --name pool0 --loopback /var/lib/dmfs-pools"])
    destroy.add_argument("--name", type=pool_name_argument, required=True,
                         help="device-mapper name of the pool")
    destroy.add_argument("--loopback", metavar="DIR", type=directory_argument,
                         help="also delete NAME.data and NAME.metadata in DIR (they must be "
                              "the pool's files)")
    driver_option(destroy)
    json_option(destroy)
    destroy.set_defaults(run=run_pool_destroy)


def run_pool_create(args: argparse.Namespace) -> int:
    # dmfs.pool.loopback loads here, not with this module: every dmfs command
    # imports it to build its parser.
    from dmfs.pool import create_loop_pool

    try:
        spec = plan_loop_pool(args.name, args.loopback, args.size,
                              metadata_size=args.metadata_size, block_size=args.block_size,
                              low_water=args.low_water)
    except PoolSpecError as error:
        raise UsageError(str(error)) from None
    require_root("dmfs pool create")
    require_device_mapper()
    dm = open_device_mapper(args.driver)
    require_tool("losetup", "util-linux")
    report = create_loop_pool(dm, spec, overcommit=args.overcommit)
    emit(args, report.as_dict(), created_lines(report))
    return EXIT_OK


def run_pool_destroy(args: argparse.Namespace) -> int:
    from dmfs.pool import destroy_pool

    require_root("dmfs pool destroy")
    require_device_mapper()
    dm = open_device_mapper(args.driver)
    require_tool("losetup", "util-linux")
    try:
        report = destroy_pool(dm, args.name, loopback_dir=args.loopback)
    except PoolError as error:  # no such pool, or not a thin pool
        raise EnvironmentProblem(str(error)) from None
    emit(args, report.as_dict(), destroyed_lines(report))
    return EXIT_OK


def created_lines(report: PoolReport) -> list[str]:
    """What ``pool create`` found or made, for people."""
    verb = ("re-activated from its files" if report.reactivated
            else "created" if report.created else "already exists")
    percent = 100 * report.low_water_blocks / max(report.total_data_blocks, 1)
    metadata_size = format_size(report.metadata_size) if report.metadata_size else "?"
    return [
        *(f"  made       directory {path}" for path in report.created_directories),
        f"pool {report.name} {verb}: {report.device}",
        f"  data       {report.data_file or '-'} on {report.data_device}, "
        f"{format_size(report.data_size)} = {report.total_data_blocks} blocks of "
        f"{format_size(report.block_size)}, {report.used_data_blocks} used",
        f"  metadata   {report.metadata_file or '-'} on {report.metadata_device}, "
        f"{metadata_size}",
        f"  low water  {report.low_water_blocks} blocks ({percent:.3g}% of the data blocks)",
        f"  features   {' '.join(report.features) or '-'}; mode {report.mode}",
    ]


def destroyed_lines(report: DestroyReport) -> list[str]:
    """What ``pool destroy`` did, for people."""
    lines = [f"pool {report.name} removed" if report.removed
             else f"pool {report.name} was not active"]
    if report.used_data_blocks is not None and report.block_size:
        lines.append(f"  it held {format_size(report.used_data_blocks * report.block_size)} "
                     f"of data ({report.used_data_blocks} blocks)")
    lines += [f"  detached {device}" for device in report.detached]
    lines += [f"  deleted  {path}" for path in report.deleted]
    return lines
