"""The ``dmfs`` command."""

from __future__ import annotations

import argparse

from dmfs import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmfs",
        description="Show the snapshots of a device-mapper thin pool as a directory tree.")
    parser.add_argument("--version", action="version", version=f"dmfs {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmfs`` console script; returns the exit status."""
    build_parser().parse_args(argv)
    return 0
