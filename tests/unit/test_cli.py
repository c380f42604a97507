from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dmfs import __version__
from dmfs.cli import build_parser, main
from dmfs.cli.common import setup_logging
from dmfs.cli.version_info import kernel_caching, kernel_release


def test_version_names_the_libraries_and_kernel_features(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"dmfs {__version__}"
    rows = dict(line.split(None, 1) for line in lines[1:])
    assert rows["pyfuse3"] == importlib.metadata.version("pyfuse3")
    assert rows["libfuse"].startswith("3.")
    assert rows["kernel"] == platform.release()
    assert rows["features"].startswith("FUSE symlink caching (FUSE_CAP_CACHE_SYMLINKS) ")
    assert "; FUSE listing caching (FOPEN_CACHE_DIR) " in rows["features"]


@pytest.mark.parametrize(("pyfuse3_can", "kernel", "phrase"), [
    (True, (6, 1), "in use"),
    (False, (6, 1), "not in use, this pyfuse3 cannot request it"),
    (True, (4, 19), "not available (needs Linux 4.20 or later)"),
    (None, None, "unknown (pyfuse3 cannot be imported)"),
])
def test_kernel_caching_phrase(pyfuse3_can: bool | None, kernel: tuple[int, int] | None,
                                phrase: str) -> None:
    assert kernel_caching(pyfuse3_can, kernel) == phrase
    assert kernel_release("4.19.0-21-amd64")[1] == (4, 19)


def test_module_entry_point_help() -> None:
    result = subprocess.run([sys.executable, "-m", "dmfs", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "usage: dmfs" in result.stdout


def subcommand_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                     ) -> list[tuple[str, ...]]:
    """Every command and sub-command the parser knows, e.g. ("pool", "create")."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(subcommand_paths(sub, (*prefix, name)))
    return paths


COMMANDS = subcommand_paths(build_parser())


def test_the_pool_commands_exist() -> None:
    assert {("pool",), ("pool", "create"), ("pool", "destroy")} <= set(COMMANDS)


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "dmfs")
def test_help_of_every_command(command: tuple[str, ...],
                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(('dmfs', *command))}")
    assert "exit status:" in out


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmfs", *args], capture_output=True,
                          text=True, check=False, env=env)


@pytest.mark.parametrize(("args", "message"), [
    ((), "the following arguments are required: COMMAND"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("pool",), "the following arguments are required: ACTION"),
    (("pool", "create", "--size", "1G", "--name", "p"), "required: --loopback"),
    (("pool", "create", "--loopback", "/", "--name", "p"), "required: --size"),
    (("pool", "create", "--loopback", "/", "--size", "1G"), "required: --name"),
    (("pool", "create", "--loopback", "/etc/passwd/pools", "--size", "1G", "--name", "p"),
     "argument --loopback: /etc/passwd/pools: /etc/passwd is not a directory"),
    (("pool", "destroy", "--loopback", "/no/such/dir", "--name", "p"),
     "argument --loopback: /no/such/dir: no such directory"),
    (("pool", "create", "--loopback", "/", "--size", "1XB", "--name", "p"),
     "argument --size: '1XB' is not a size"),
    (("pool", "create", "--loopback", "/", "--size", "1G", "--name", "a/b"),
     "argument --name: pool name 'a/b' contains '/'"),
    (("pool", "create", "--loopback", "/", "--size", "1G", "--name", "p", "--low-water", "100%"),
     "argument --low-water: '100%' must be at least 0% and less than 100%"),
    (("pool", "create", "--loopback", "/", "--size", "1G", "--name", "p", "--driver", "lvm"),
     "argument --driver: invalid choice: 'lvm'"),
    (("pool", "destroy"), "required: --name"),
    (("pool", "destroy", "--name", "p", "--bogus"), "unrecognized arguments: --bogus"),
    (("--log-level", "loud", "pool", "destroy", "--name", "p"), "argument --log-level"),
])
def test_bad_arguments_exit_2_with_a_message(args: tuple[str, ...], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (("--size", "512KiB"), "size 512KiB is too small"),
    (("--size", "1G", "--block-size", "96KiB"), "block size 96KiB must be a multiple of 64KiB"),
    (("--size", "1000000000"), "is not a whole number of 64KiB blocks"),
    (("--size", "1G", "--low-water", "2G"), "low-water mark 2GiB is not below"),
    (("--size", "1G", "--metadata-size", "1M"), "metadata size 1MiB must be"),
])
def test_impossible_pools_exit_2_before_touching_anything(
        args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    result = run_cli("pool", "create", "--loopback", str(tmp_path), "--name", "p", *args)
    assert result.returncode == 2
    assert result.stderr.startswith("dmfs: error: ")
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_logging_options_work_before_and_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--log-level", "debug", "pool", "destroy", "--name", "p"])
    after = parser.parse_args(["pool", "destroy", "--name", "p", "--log-format", "journal"])
    default = parser.parse_args(["pool", "destroy", "--name", "p"])
    assert (before.log_level, before.log_format) == ("debug", "auto")
    assert (after.log_level, after.log_format) == ("info", "journal")
    assert (default.log_level, default.log_format) == ("info", "auto")


def test_journal_format_prefixes_every_line_with_its_priority() -> None:
    stream = io.StringIO()
    setup_logging("debug", "journal", stream)
    log = logging.getLogger("dmfs.test")
    log.error("broken\nsecond line")
    log.warning("careful")
    log.info("news")
    log.debug("detail")
    assert stream.getvalue().splitlines() == [
        "<3>broken", "<3>second line", "<4>careful", "<6>news", "<7>detail"]


def test_text_format_names_the_level_of_warnings_and_errors() -> None:
    stream = io.StringIO()
    setup_logging("info", "text", stream)
    log = logging.getLogger("dmfs.test")
    log.error("broken")
    log.info("news")
    log.debug("hidden")
    assert stream.getvalue().splitlines() == ["dmfs: error: broken", "dmfs: news"]


def test_auto_format_is_journal_on_systemds_journal_stream(tmp_path: Path) -> None:
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it connected."""
    stderr_file = tmp_path / "stderr"
    with stderr_file.open("w") as stderr:
        info = os.fstat(stderr.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        result = subprocess.run(
            [sys.executable, "-m", "dmfs", "pool", "create", "--loopback", str(tmp_path),
             "--name", "p", "--size", "1K"], stderr=stderr, env=env, check=False)
    assert result.returncode == 2
    assert stderr_file.read_text().startswith("<3>size 1KiB is too small")
    # The same variable naming another file means stderr is not the journal.
    env["JOURNAL_STREAM"] = "1:1"
    result = run_cli("pool", "create", "--loopback", str(tmp_path), "--name", "p", "--size",
                     "1K", env=env)
    assert result.stderr.startswith("dmfs: error: size 1KiB is too small")


EXAMPLE = Path(__file__).parents[2] / "contrib" / "dmfs.toml.example"


def test_config_prints_every_setting_with_defaults_resolved() -> None:
    result = run_cli("config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"# {EXAMPLE}: valid"
    assert "base_image_size     10737418240  # 10GiB" in lines
    assert 'root_path           "/var/lib/dmfs/pool0"' in lines
    assert "mountpoint          -" in lines
    settings = json.loads(run_cli("config", str(EXAMPLE), "--json").stdout)
    assert settings["base_image_size"] == 10 * 1024**3
    assert settings["idle_timeout"] == 300.0
    assert settings["runtime_path"] == "/run/dmfs/pool0"


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pool0.toml"
    path.write_text('[dmfs]\npool_name = "pool0"\nbase_image_size = "10GB"\nidle_timout = 5\n')
    result = run_cli("config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (f"dmfs: error: {path}: [dmfs] idle_timout: unknown key "
                             f"(did you mean 'idle_timeout'?)\n")
    missing = run_cli("config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2
    assert "missing.toml: cannot read: No such file or directory" in missing.stderr
