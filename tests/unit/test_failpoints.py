"""DMFS_FAILPOINT: the spec parser, what an armed point does, and that every
failpoint in the code is declared once (read from the tuple, so new names count)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dmfs.pool import failpoints
from dmfs.pool.dm import DmError
from dmfs.pool.failpoints import FAILPOINTS, Action, FailpointSpecError, failpoint, parse

PACKAGE = Path(failpoints.__file__).resolve().parents[1]
CALL = re.compile(r"""\bfailpoint\(\s*["']([^"']+)["']""")
#: DeviceTable.create places the two failpoints its caller names
#: (``failpoints=("prepare:after-intent", "prepare:after-create-snap")``)
PAIR = re.compile(r"""\bfailpoints=\(\s*["']([^"']+)["'],\s*["']([^"']+)["']\)""")


def armed(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(failpoints, "_armed", parse(text))


def test_a_bare_name_or_kill_kills() -> None:
    assert parse("fs:mount") == {"fs:mount": Action(None)}
    assert parse("fs:mount=kill") == {"fs:mount": Action(None)}
    assert parse("fs:mount").get("fs:mount").kills  # type: ignore[union-attr]


def test_stop_stops() -> None:
    action = parse("commit:after-record=stop*1")["commit:after-record"]
    assert action == Action(None, 1, signal.SIGSTOP)
    assert action.stops and not action.kills


def test_errno_names_and_counts() -> None:
    assert parse("fs:mount=EIO*1, dm:suspend=EBUSY,journal:fsync=ENOSPC*3,") == {
        "fs:mount": Action(errno.EIO, 1), "dm:suspend": Action(errno.EBUSY),
        "journal:fsync": Action(errno.ENOSPC, 3)}
    assert parse("commit:after-intent*2") == {"commit:after-intent": Action(None, 2)}
    assert parse("") == {}


@pytest.mark.parametrize(("text", "says"), [
    ("no:such-point", "unknown failpoint 'no:such-point'"),
    ("fs:mount=EWHAT", "neither 'kill', 'stop' nor an errno name"),
    ("fs:mount=eio", "neither 'kill', 'stop' nor an errno name"),
    ("fs:mount=errorcode", "neither 'kill', 'stop' nor an errno name"),
    ("fs:mount=", "neither 'kill', 'stop' nor an errno name"),
    ("fs:mount=EIO*0", "at least 1"),
    ("fs:mount=EIO*x", "at least 1"),
    ("fs:mount=EIO*", "at least 1"),
    ("fs:mount,fs:mount=EIO", "given twice"),
])
def test_bad_specs_are_errors_that_say_why(text: str, says: str) -> None:
    with pytest.raises(FailpointSpecError, match=re.escape(says)):
        parse(text)


def test_an_unknown_name_lists_the_declared_ones() -> None:
    with pytest.raises(FailpointSpecError) as error:
        parse("fs:mout=EIO")
    assert all(name in str(error.value) for name in FAILPOINTS)


def test_unarmed_points_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failpoints, "_armed", None)
    for name in FAILPOINTS:
        failpoint(name)
    armed(monkeypatch, "fs:umount=EIO")
    failpoint("fs:mount")  # armed is another one


def test_a_raise_point_raises_the_errno_then_stops_after_its_count(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    armed(monkeypatch, "fs:mount=EIO*2,fs:umount=EBUSY")
    for _ in range(2):
        with pytest.raises(OSError) as error:
            failpoint("fs:mount")
        assert type(error.value) is OSError
        assert error.value.errno == errno.EIO
        assert error.value.strerror == "injected fault at fs:mount"
    failpoint("fs:mount")  # inert after two
    failpoint("fs:mount")
    for _ in range(5):  # no count: every time
        with pytest.raises(OSError, match="injected fault at fs:umount") as error:
            failpoint("fs:umount")
        assert error.value.errno == errno.EBUSY
    assert caplog.text.count("failpoint fs:mount: raising EIO") == 2


def test_a_call_site_chooses_the_exception_type(monkeypatch: pytest.MonkeyPatch) -> None:
    armed(monkeypatch, "dm:suspend=ENXIO")
    with pytest.raises(DmError) as error:
        failpoint("dm:suspend", lambda code, text: DmError(code, "suspend", "dev", text))
    assert error.value.errno == errno.ENXIO
    assert "injected fault at dm:suspend" in str(error.value)


def test_the_driver_layer_raises_what_the_driver_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """dm:suspend gives a DmError (the engine maps those), fs:* and journal:* OSErrors."""
    from dmfs.pool.thinpool import ThinPool

    class NoDriver:
        def suspend(self, name: str) -> None:
            raise AssertionError("the driver must not be reached")

    armed(monkeypatch, "dm:suspend=EIO")
    with pytest.raises(DmError) as error:
        ThinPool(NoDriver(), "pool").suspend("pool-snap-1")  # type: ignore[arg-type]
    assert error.value.errno == errno.EIO and error.value.device == "pool-snap-1"


def test_journal_fsync_point(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dmfs.pool.journal import Journal

    journal = Journal(tmp_path)
    journal.open()
    try:
        armed(monkeypatch, "journal:fsync=EIO*1")
        journal.append({"type": "x"}, durable=False)  # no fsync: no fault
        with pytest.raises(OSError) as error:
            journal.append({"type": "y"}, durable=True)
        assert error.value.errno == errno.EIO
        journal.append({"type": "z"}, durable=True)  # the count is spent
    finally:
        journal.close()


def test_fs_points(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dmfs.pool import fs

    armed(monkeypatch, "fs:mount=ENOSPC*1,fs:umount=EBUSY*1")
    with pytest.raises(OSError) as error:
        fs.mount("/dev/null", tmp_path, "ext4")
    assert error.value.errno == errno.ENOSPC and "injected" in str(error.value)
    with pytest.raises(OSError) as error:
        fs.umount(tmp_path)
    assert error.value.errno == errno.EBUSY and "injected" in str(error.value)


def run_python(code: str, spec: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DMFS_FAILPOINT"}
    if spec is not None:
        env["DMFS_FAILPOINT"] = spec
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=False, cwd=PACKAGE.parent)


def test_the_environment_is_read_at_import_and_kill_is_sigkill() -> None:
    code = ("import logging; logging.basicConfig()\n"
            "from dmfs.pool.failpoints import failpoint\n"
            "failpoint('prepare:after-intent'); print('passed the first')\n"
            "failpoint('commit:after-intent'); print('survived')\n")
    result = run_python(code, "commit:after-intent")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout == "passed the first\n"
    assert "failpoint commit:after-intent: killing the process" in result.stderr
    assert run_python(code, None).stdout.endswith("survived\n")


def test_stop_is_sigstop_and_the_process_goes_on_when_continued() -> None:
    code = ("import logging; logging.basicConfig()\n"
            "from dmfs.pool.failpoints import failpoint\n"
            "print('before', flush=True)\n"
            "failpoint('commit:after-record'); print('after', flush=True)\n")
    env = {**os.environ, "DMFS_FAILPOINT": "commit:after-record=stop"}
    with subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=PACKAGE.parent) as child:
        assert child.stdout is not None and child.stderr is not None
        assert child.stdout.readline() == "before\n"
        # the process stops itself: waitpid reports it stopped, not exited
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        os.kill(child.pid, signal.SIGCONT)
        assert child.stdout.read() == "after\n"
        assert "failpoint commit:after-record: stopping the process" in child.stderr.read()
        assert child.wait(timeout=60) == 0


def test_a_bad_variable_stops_the_program_at_import() -> None:
    result = run_python("import dmfs.pool.snapshotter", "commit:after-intnet")
    assert result.returncode == 1
    assert "FailpointSpecError: DMFS_FAILPOINT: unknown failpoint 'commit:after-intnet'" in (
        result.stderr)


def test_an_undeclared_name_at_a_call_site_is_an_error(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    armed(monkeypatch, "fs:mount")
    with pytest.raises(FailpointSpecError, match="not declared"):
        failpoint("fs:mount-typo")


def call_sites() -> dict[str, list[str]]:
    """Every failpoint("...") call in the package: name -> files."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "failpoints.py":
            continue
        text = path.read_text()
        names = [*CALL.findall(text), *(name for pair in PAIR.findall(text) for name in pair)]
        for name in names:
            found.setdefault(name, []).append(str(path.relative_to(PACKAGE.parent)))
    return found


def test_every_failpoint_in_the_code_is_declared_and_every_declared_one_is_placed() -> None:
    sites = call_sites()
    assert set(sites) - set(FAILPOINTS) == set(), "failpoint() calls with undeclared names"
    assert set(FAILPOINTS) - set(sites) == set(), "declared failpoints that nothing calls"
    assert len(FAILPOINTS) == len(set(FAILPOINTS))
    twice = {name: files for name, files in sites.items() if len(files) > 1}
    assert not twice, f"a name marks one place in the code: {twice}"


def test_raise_points_sit_in_the_layers_the_issue_names() -> None:
    sites = call_sites()
    assert sites["fs:mount"] == ["dmfs/pool/fs.py"]
    assert sites["fs:umount"] == ["dmfs/pool/fs.py"]
    assert sites["dm:suspend"] == ["dmfs/pool/thinpool.py"]
    assert sites["journal:fsync"] == ["dmfs/pool/journal.py"]
