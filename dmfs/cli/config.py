"""``dmfs config``: check a configuration file and print every setting."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dmfs.cli.common import EXIT_OK, add_command, emit, json_option
from dmfs.config import CONFIG_KEYS, Config, load_config
from dmfs.units import format_size


def add_parser(commands: argparse._SubParsersAction) -> None:
    config = add_command(
        commands, "config", "check a configuration file",
        (
            "Check a configuration file and print every setting it gives, defaults\n"
            "included, with sizes in bytes and durations in seconds. A bad file gives one\n"
            "line naming the file, the key and what is wrong, and exit status 2.\n"
            "contrib/dmfs.toml.example describes every key."),
        ["dmfs config /etc/dmfs/pool0.toml"])
    config.add_argument("file", metavar="FILE", type=Path, help="the TOML file to check")
    json_option(config)
    config.set_defaults(run=run_config)


def config_settings(config: Config) -> dict[str, Any]:
    """Every key of ``config`` with the value dmfs will use (defaults resolved)."""
    settings: dict[str, Any] = {key: getattr(config, key) for key in CONFIG_KEYS}
    settings["root_path"] = config.state_dir
    settings["runtime_path"] = config.runtime_dir
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in settings.items()}


def run_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    settings = config_settings(config)
    width = max(map(len, settings))
    lines = [f"{key:<{width}}  {'-' if value is None else json.dumps(value)}"
             for key, value in settings.items()]
    lines[CONFIG_KEYS.index("base_image_size")] += f"  # {format_size(config.base_image_size)}"
    emit(args, settings, [f"# {args.file}: valid", *lines])
    return EXIT_OK
