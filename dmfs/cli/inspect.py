"""``dmfs status``, ``dmfs tree`` and ``dmfs check``: a pool and its journal, read.

They work whether or not a daemon serves the pool (the journal is read without
its lock); ``check --repair`` needs the daemon stopped, since it runs the
start-up reconciliation.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmfs.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    OperationFailed,
    add_command,
    emit,
    json_option,
)
from dmfs.cli.preflight import (
    EnvironmentProblem,
    open_device_mapper,
    require_device_mapper,
    require_root,
)
from dmfs.config import Config, load_config
from dmfs.pool import JournalCorrupt, PoolError
from dmfs.units import format_size

if TYPE_CHECKING:
    from dmfs.pool import DeviceMapper, Inspection

log = logging.getLogger("dmfs.cli")


def add_parser(commands: argparse._SubParsersAction) -> None:
    def command(name: str, help_text: str, description: str, example: str
                ) -> argparse.ArgumentParser:
        parser = add_command(commands, name, help_text, description, [example])
        parser.add_argument("config", metavar="CONFIG", type=Path, help="the pool's TOML file")
        return parser

    status = command("status", "pool space, snapshot counts, faulty devices",
                     "Show the pool's data and metadata use, its low-water state, the\n"
                     "snapshots by kind, faulty devices, and whether a dmfs daemon serves it.",
                     "dmfs status /etc/dmfs/pool0.toml --json")
    json_option(status)
    status.set_defaults(run=run_status)

    tree = command("tree", "the snapshot lineage",
                   "Print every snapshot under its parent with its kind, device state and\n"
                   "usage (bytes provisioned beyond its parent) and exclusive bytes (blocks\n"
                   "no other device shares). --dot prints a Graphviz graph.",
                   "dmfs tree /etc/dmfs/pool0.toml --dot | dot -Tsvg > tree.svg")
    shape = tree.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="nested JSON")
    shape.add_argument("--dot", action="store_true", help="a Graphviz digraph")
    tree.set_defaults(run=run_tree)

    check = command("check", "compare the journal with the pool",
                    "Compare the metadata journal with the pool's real devices, live\n"
                    "device-mapper devices and mounts, and report what differs. With\n"
                    "--repair (dmfs must not be running) run the start-up reconciliation:\n"
                    "finish or roll back interrupted operations, mark lost devices Faulty,\n"
                    "deactivate strays. Devices in the pool that dmfs did not make are only\n"
                    "reported. Exit status 1 when problems remain.",
                    "dmfs check /etc/dmfs/pool0.toml --repair")
    check.add_argument("--repair", action="store_true", help="fix what can be fixed")
    json_option(check)
    check.set_defaults(run=run_check)


def _open(args: argparse.Namespace, action: str) -> tuple[Config, DeviceMapper]:
    config = load_config(args.config)
    require_root(action)
    require_device_mapper()
    return config, open_device_mapper(config.driver, udev_timeout=config.activation_timeout)


def _inspect(config: Config, dm: DeviceMapper) -> Inspection:
    # The journal and metadata modules load here, not with this module: every
    # dmfs command imports it to build its parser.
    from dmfs.pool import inspect_pool

    try:
        return inspect_pool(config, dm)
    except PoolError as error:
        raise EnvironmentProblem(str(error)) from None
    except JournalCorrupt as error:
        raise OperationFailed(str(error)) from None


def _look(args: argparse.Namespace, action: str) -> tuple[Config, Inspection]:
    """Load the config and inspect its pool (for commands that only read)."""
    config, dm = _open(args, action)
    try:
        return config, _inspect(config, dm)
    finally:
        dm.close()


def _percent(used: int, total: int) -> str:
    return f"{100 * used / total:.0f}%" if total else "-"


def run_status(args: argparse.Namespace) -> int:
    config, seen = _look(args, "dmfs status")
    summary = seen.summary
    status, block, kinds = summary.status, summary.block_size, summary.snapshots
    faulty = summary.faulty_devices
    data = {**summary.nested(), "served": seen.served,
            "problems": [f.message for f in seen.problems],
            "fs_links": _fs_links(config, seen.served)}
    low_water = (f"low-water mark {summary.low_water_blocks} blocks: "
                 f"{'REACHED' if summary.low_water_reached else 'ok'}"
                 if summary.low_water_blocks else "no low-water mark")
    lines = [
        f"pool {config.pool_name}: {status.mode}, transaction {status.transaction_id}"
        + (", NEEDS CHECK" if status.needs_check else ""),
        f"  data      {format_size(status.used_data_blocks * block)} of "
        f"{format_size(status.total_data_blocks * block)} used "
        f"({_percent(status.used_data_blocks, status.total_data_blocks)}); {low_water}",
        f"  metadata  {status.used_metadata_blocks} of {status.total_metadata_blocks} blocks "
        f"used ({_percent(status.used_metadata_blocks, status.total_metadata_blocks)})",
        f"snapshots   {sum(kinds.values())}: " + ", ".join(f"{n} {k}" for k, n in kinds.items()),
        f"faulty      {', '.join(f'device {i}' for i in faulty) or 'none'}",
        f"daemon      {'serving this pool' if seen.served else 'not running'}",
        f"fs links    {data['fs_links']['text']}",
    ]
    lines += [f"problem     {f.message}" for f in seen.problems if f.kind != "faulty"]
    emit(args, data, lines)
    return EXIT_OK


def _fs_links(config: Config, served: bool) -> dict[str, Any]:
    """Whether the kernel caches the tree's fs links: what the serving daemon
    negotiated, or (no daemon) what the installed pyfuse3 can do."""
    from dmfs.fuse import linkcache  # (imports pyfuse3: only status needs it)

    if not served:
        state = linkcache.installed()
        text = state.why if state.cached else state.describe()
        return {"cached": None, "why": state.why, "text": f"(no daemon) {text}"}
    state = linkcache.recorded(config.runtime_dir)
    if state is None:
        return {"cached": None, "why": "the daemon recorded nothing", "text": "unknown"}
    return {"cached": state.cached, "why": state.why, "text": state.describe()}


def _usage_text(node: dict[str, Any]) -> str:
    usage = node["usage"]
    text = format_size(usage) if usage is not None else "?"
    if node["exclusive"] is not None:
        text += f", {format_size(node['exclusive'])} exclusive"
    return text


def tree_lines(nodes: list[dict[str, Any]], prefix: str = "", top: bool = True) -> list[str]:
    """Box-drawing lines of a tree: roots at the margin, children indented."""
    lines = []
    for index, node in enumerate(nodes):
        last = index == len(nodes) - 1
        connector = "" if top else ("└── " if last else "├── ")
        lines.append(f"{prefix}{connector}{node['name']}  ({node['kind']}, {node['state']}, "
                     f"{_usage_text(node)})")
        nested = prefix if top else prefix + ("    " if last else "│   ")
        lines += tree_lines(node["children"], nested, top=False)
    return lines


def _dot_quote(*lines: str) -> str:
    """A Graphviz string whose lines are ``lines``."""
    escaped = (line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)
    return '"' + "\\n".join(escaped) + '"'


def tree_dot(nodes: list[dict[str, Any]], pool: str) -> str:
    styles = {"active": "solid", "committed": "bold", "view": "dashed"}
    lines = [f"digraph {_dot_quote(pool)} {{", "  node [shape=box];"]

    def walk(node: dict[str, Any]) -> None:
        name = _dot_quote(node["name"])
        label = _dot_quote(node["name"], f"{node['kind']}, {_usage_text(node)}")
        lines.append(f"  {name} [label={label}, style={styles.get(node['kind'], 'solid')}];")
        for child in node["children"]:
            lines.append(f"  {name} -> {_dot_quote(child['name'])};")
            walk(child)

    for node in nodes:
        walk(node)
    lines.append("}")
    return "\n".join(lines)


def run_tree(args: argparse.Namespace) -> int:
    from dmfs.pool import tree_of

    config, seen = _look(args, "dmfs tree")
    nodes = tree_of(seen)
    if args.json:
        print(json.dumps({"pool": config.pool_name, "snapshots": nodes}, indent=2))
    elif args.dot:
        print(tree_dot(nodes, config.pool_name))
    else:
        print("\n".join(tree_lines(nodes)) or f"pool {config.pool_name} has no snapshots")
    return EXIT_OK


async def _repair(config: Config, dm: DeviceMapper) -> None:
    from dmfs.pool import Snapshotter  # (the whole engine: only --repair needs it)

    async with Snapshotter.open(config, dm):
        pass  # opening reconciles; closing unmounts and deactivates again


def run_check(args: argparse.Namespace) -> int:
    config, dm = _open(args, "dmfs check")
    try:
        seen = _inspect(config, dm)
        before = seen.problems
        if args.repair and before:
            if seen.served:
                raise OperationFailed("a dmfs daemon serves this pool: unmount it first, its "
                                      "next start repairs the same way")
            try:
                import trio  # (only --repair needs it: see _serve in dmfs.cli.mount)

                trio.run(_repair, config, dm)
            except PoolError as error:
                raise EnvironmentProblem(str(error)) from None
            seen = _inspect(config, dm)
    finally:
        dm.close()
    remaining = seen.problems
    routine = [] if seen.served else seen.routine()
    data = {"pool": config.pool_name, "repaired": [f.message for f in before]
            if args.repair else [], "findings": [f.as_dict() for f in seen.findings],
            "next_start": routine, "ok": not remaining}
    lines = []
    if args.repair and before:
        lines += [f"repaired  {f.message}" for f in before if f not in remaining]
    lines += [f"{'problem ' if f.problem else 'note    '}  {f.message}" for f in seen.findings]
    lines += [f"start     {line}" for line in routine]
    if not remaining:
        lines.append(f"pool {config.pool_name}: journal and pool agree")
    elif not args.repair:
        lines.append("run `dmfs check --repair` (with dmfs stopped) to fix what can be fixed")
    emit(args, data, lines)
    return EXIT_OK if not remaining else EXIT_FAILED
