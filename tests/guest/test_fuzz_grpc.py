"""A fuzz test of the snapshots socket: what a client may send, against a model.

Random requests to every method of containerd's snapshots API, with keys,
parents, names, labels, field paths and filters a client might send: ``/`` and
``%``, dots, ``fs``, control characters, NUL, non-ASCII, keys at and past the
limits (a name of 255 bytes in the tree, 4096 bytes of text), labels at and
past containerd's 4096 bytes, unknown field paths, garbage filters, and bytes
that are no protobuf message at all.
A model of containerd's snapshotter semantics (written from the service's
contract, not from the code) says what each request must answer: success with
the model's result, or one of the status codes that apply when more than one
fault is in a request.  Every refusal logs one line.  Afterwards: the daemon
alive without a traceback, the tree equal to snapshots.json and to the model,
``dmfs check`` clean.  The seed is printed; replay with DMFS_TORTURE_SEED.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from dmfs.grpc.proto import snapshots_pb2 as api
from tests.support.snapshots_client import SnapshotsClient
from tests.support.torture import check, daemon_problems, read_snapshots, tree_matches_snapshots
from tests.support.tree import MountedTree, wait_until, write_config

Code = grpc.StatusCode
RANDOM_REQUESTS = 220
MAX_TEXT = 4096  # bytes of UTF-8: a key; a label's name and value together
NAME_MAX = 255  # bytes of a key's name in the tree
KINDS = {api.ACTIVE: "active", api.VIEW: "view", api.COMMITTED: "committed"}
#: what random keys and label names are made of
PIECES = ("a", "b", "c", "/", "%", "%2F", "%25", ".", "..", "fs", "default/1/", "sha256:",
          " ", "é", "日本", "\x01", "\n", "\x7f", "-", "_")
METHODS = "/containerd.services.snapshots.v1.Snapshots/"


@dataclass
class Snapshot:
    kind: str
    parent: str
    labels: dict[str, str] = field(default_factory=dict)


def valid_text(text: str) -> bool:
    return bool(text) and "\0" not in text and len(text.encode()) <= MAX_TEXT


def valid_new_key(key: str) -> bool:
    """Text with a name in the tree (DESIGN.md §1: ``%`` and ``/`` are written
    %25 and %2F there, a leading ``.`` %2E; at most 255 bytes; ``fs`` is every
    node's file link)."""
    name = key.replace("%", "%25").replace("/", "%2F")
    name = "%2E" + name[1:] if name.startswith(".") else name
    return valid_text(key) and key != "fs" and len(name.encode()) <= NAME_MAX


def valid_labels(labels: dict[str, str]) -> bool:
    return all(name and "\0" not in name + value
               and len(name.encode()) + len(value.encode()) <= MAX_TEXT
               for name, value in labels.items())


def stored(labels: dict[str, str]) -> dict[str, str]:
    """Labels as containerd's stores keep them: an empty value is no label."""
    return {name: value for name, value in labels.items() if value}


class Fuzzer:
    """Sends random requests and checks each answer against the model."""

    def __init__(self, client: SnapshotsClient, seed: int) -> None:
        self.client = client
        self.rng = random.Random(seed)
        self.model: dict[str, Snapshot] = {}
        self.failures: list[str] = []
        self.refusals = 0
        self.answered: dict[str, int] = {}

    # -- what to send ---------------------------------------------------------------
    def text(self) -> str:
        roll = self.rng.random()
        if roll < 0.04:
            return ""
        if roll < 0.08:
            return "k" * self.rng.choice((NAME_MAX, NAME_MAX + 1, MAX_TEXT, MAX_TEXT + 1))
        if roll < 0.10:
            return "nul\0byte"
        return "".join(self.rng.choice(PIECES) for _ in range(self.rng.randint(1, 4)))

    def key(self, existing: float = 0.8) -> str:
        """An existing key (with probability ``existing``), or a new one."""
        if self.model and self.rng.random() < existing:
            return self.rng.choice(sorted(self.model))
        return self.text()

    def parent(self) -> str:
        committed = sorted(k for k, s in self.model.items() if s.kind == "committed")
        roll = self.rng.random()
        if roll < 0.25:
            return ""
        if committed and roll < 0.9:
            return self.rng.choice(committed)
        return self.key()

    def labels(self) -> dict[str, str]:
        labels = {}
        for _ in range(self.rng.choice((0, 0, 1, 2, 3))):
            # at the limit with the longest name, past it with any, NUL: now and then
            value = self.rng.choices(("", "v", "日本", "x" * (MAX_TEXT - 26), "x" * MAX_TEXT,
                                      "nul\0"), weights=(2, 6, 2, 1, 1, 1))[0]
            labels[self.rng.choice(("team", "containerd.io/snapshot.ref", "a.b", "é",
                                    "x" * 8))] = value
        return labels

    # -- sending, and what came back ------------------------------------------------
    def send(self, method: str, request: object, allowed: set[Code],
             may_succeed: bool) -> object | None:
        """The answer when it succeeded; records a failure when the outcome is
        not one the model allows."""
        described = f"{method} {str(request)[:160]!r}"
        try:
            answer = self.client.call(method, request)
        except grpc.RpcError as refusal:
            code = refusal.code()  # type: ignore[attr-defined]
            self.answered[code.name] = self.answered.get(code.name, 0) + 1
            if code not in allowed:
                self.failures.append(f"{described}: {code.name} "
                                     f"({refusal.details()!r}); the model allows "  # type: ignore[attr-defined]
                                     f"{sorted(c.name for c in allowed) or 'success'}")
            else:
                self.refusals += 1
            return None
        self.answered["OK"] = self.answered.get("OK", 0) + 1
        if not may_succeed:
            self.failures.append(f"{described}: succeeded; the model allows only "
                                 f"{sorted(c.name for c in allowed)}")
        return answer

    def prepare_or_view(self, view: bool) -> None:
        key, parent, labels = self.key(existing=0.15), self.parent(), self.labels()
        allowed = set()
        if not valid_new_key(key) or not valid_labels(labels):
            allowed.add(Code.INVALID_ARGUMENT)
        if key in self.model:
            allowed.add(Code.ALREADY_EXISTS)
        if parent and parent not in self.model:
            allowed |= self.missing(parent)
        elif parent and self.model[parent].kind != "committed":
            allowed.add(Code.INVALID_ARGUMENT)
        method, message = ("View", api.ViewSnapshotRequest) if view else (
            "Prepare", api.PrepareSnapshotRequest)
        answer = self.send(method, message(key=key, parent=parent, labels=labels), allowed,
                           not allowed)
        if answer is not None:
            self.model[key] = Snapshot("view" if view else "active", parent, stored(labels))
            [mount] = answer.mounts  # type: ignore[attr-defined]
            read_only = "ro" in mount.options
            if read_only != view:
                self.failures.append(f"{method} {key!r}: options {list(mount.options)}")

    def commit(self) -> None:
        active = sorted(k for k, s in self.model.items() if s.kind == "active")
        key = self.rng.choice(active) if active and self.rng.random() < 0.8 else self.key()
        name, labels = self.key(existing=0.1), self.labels()
        allowed = set()
        if not valid_new_key(name) or not valid_labels(labels):
            allowed.add(Code.INVALID_ARGUMENT)
        if key not in self.model:
            allowed |= self.missing(key)
        elif self.model[key].kind != "active":
            allowed.add(Code.FAILED_PRECONDITION)
        if name in self.model:
            allowed.add(Code.ALREADY_EXISTS)
        if self.send("Commit", api.CommitSnapshotRequest(name=name, key=key, labels=labels),
                     allowed, not allowed) is not None:
            parent = self.model.pop(key).parent
            self.model[name] = Snapshot("committed", parent, stored(labels))

    def remove(self) -> None:
        leaves = sorted(k for k in self.model if not self.children(k))
        key = self.rng.choice(leaves) if leaves and self.rng.random() < 0.6 else self.key()
        allowed = set()
        if key not in self.model:
            allowed |= self.missing(key)
        elif self.children(key):
            allowed.add(Code.FAILED_PRECONDITION)
        if self.send("Remove", api.RemoveSnapshotRequest(key=key), allowed,
                     not allowed) is not None:
            del self.model[key]

    def stat(self) -> None:
        key = self.key()
        answer = self.send("Stat", api.StatSnapshotRequest(key=key), self.missing(key),
                           key in self.model)
        if answer is not None:
            self.compare(key, answer.info)  # type: ignore[attr-defined]

    def update(self) -> None:
        key = self.key()
        paths = self.rng.choice(([], ["labels"], ["labels.team"], ["labels.a.b"],
                                 ["labels.team", "labels.gone"], ["parent"], ["kind"],
                                 ["name"], ["labels", "parent"], ["labels."], ["bogus"]))
        labels = self.labels()
        allowed = self.missing(key)
        bad_path = any(p != "labels" and (not p.startswith("labels.") or p == "labels.")
                       for p in paths)
        if bad_path or (key not in self.model and not valid_labels(labels)):
            allowed.add(Code.INVALID_ARGUMENT)
        if key in self.model and not bad_path:
            new = dict(self.model[key].labels)
            if not paths or "labels" in paths:
                new = stored(labels)
            for path in paths:
                if path.startswith("labels."):
                    name = path[len("labels."):]
                    if labels.get(name):
                        new[name] = labels[name]
                    else:
                        new.pop(name, None)
            if not valid_labels(labels if (not paths or "labels" in paths) else {
                    p[len("labels."):]: labels.get(p[len("labels."):], "") for p in paths}):
                allowed.add(Code.INVALID_ARGUMENT)
        request = api.UpdateSnapshotRequest(
            info=api.Info(name=key, parent="other", labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=paths))
        answer = self.send("Update", request, allowed, not allowed)
        if answer is not None and key in self.model and not bad_path:
            self.model[key].labels = new
            self.compare(key, answer.info)  # type: ignore[attr-defined]

    def mounts(self) -> None:
        key = self.key()
        answer = self.send("Mounts", api.MountsRequest(key=key), self.missing(key),
                           key in self.model)
        if answer is not None:
            [mount] = answer.mounts  # type: ignore[attr-defined]
            if ("ro" in mount.options) != (self.model[key].kind != "active"):
                self.failures.append(f"Mounts {key!r}: options {list(mount.options)}")

    def usage(self) -> None:
        key = self.key()
        self.send("Usage", api.UsageRequest(key=key), self.missing(key), key in self.model)

    def list(self) -> None:
        """A filter whose result the model knows, or one that may be garbage."""
        simple = sorted(k for k in self.model if k.replace("/", "").replace(":", "")
                        .replace("-", "").replace("_", "").isalnum() and k.isascii())
        kind = self.rng.choice(sorted(KINDS.values()))
        known: list[tuple[list[str], Callable[[str, Snapshot], bool]]] = [
            ([], lambda k, s: True),
            ([f"kind=={kind}"], lambda k, s: s.kind == kind),
            (['labels."team"==v'], lambda k, s: s.labels.get("team") == "v"),
            (["kind==committed", "kind==view"], lambda k, s: s.kind in ("committed", "view")),
        ]
        if simple:
            chosen = self.rng.choice(simple)
            known.append(([f'parent=="{chosen}"'], lambda k, s: s.parent == chosen))
            known.append(([f'name=="{chosen}"'], lambda k, s: k == chosen))
        if self.rng.random() < 0.3:
            garbage = self.rng.choice(("kind==", "==x", "labels.", '"', "name~=(", "a,,b",
                                       "kind!=active,", "\0", "x" * 5000, "name~=.*"))
            self.send("List", api.ListSnapshotsRequest(filters=[garbage]),
                      {Code.INVALID_ARGUMENT}, True)
            return
        filters, wanted = self.rng.choice(known)
        answers = self.send("List", api.ListSnapshotsRequest(filters=filters), set(), True)
        if answers is not None:
            found = sorted(info.name for answer in answers  # type: ignore[attr-defined]
                           for info in answer.info)
            expected = sorted(k for k, s in self.model.items() if wanted(k, s))
            if found != expected:
                self.failures.append(f"List {filters}: {found[:8]} but the model has "
                                     f"{expected[:8]}")

    def garbage(self) -> None:
        """Bytes that are no request, to a method that changes nothing."""
        method = self.rng.choice(("Stat", "Usage", "Mounts", "List"))
        data = self.rng.randbytes(self.rng.randint(0, 64))
        call = (self.client.channel.unary_stream if method == "List"
                else self.client.channel.unary_unary)(METHODS + method)
        try:
            answer = call(data, timeout=60)
            if method == "List":
                list(answer)  # type: ignore[call-overload]
        except grpc.RpcError as refusal:
            code = refusal.code()  # type: ignore[attr-defined]
            if code in (Code.INTERNAL, Code.UNKNOWN, Code.UNAVAILABLE):
                self.failures.append(f"{method} of {data!r}: {code.name} "
                                     f"({refusal.details()!r})")  # type: ignore[attr-defined]

    # -- the model's answers --------------------------------------------------------
    def children(self, key: str) -> list[str]:
        return [k for k, s in self.model.items() if s.parent == key]

    def missing(self, key: str) -> set[Code]:
        if key in self.model:
            return set()
        # a key that is no valid text is no snapshot's: either answer is right
        return {Code.NOT_FOUND} | (set() if valid_text(key) else {Code.INVALID_ARGUMENT})

    def compare(self, key: str, info: api.Info) -> None:
        snapshot = self.model[key]
        seen = (KINDS.get(info.kind), info.parent, dict(info.labels))
        if seen != (snapshot.kind, snapshot.parent, snapshot.labels):
            self.failures.append(f"{key!r}: the socket says {seen}, the model "
                                 f"{(snapshot.kind, snapshot.parent, snapshot.labels)}")

    def play(self, count: int) -> None:
        actions = ([lambda: self.prepare_or_view(False)] * 6 + [lambda: self.prepare_or_view(True)]
                   + [self.commit] * 3 + [self.remove] * 2 + [self.stat] * 2
                   + [self.update] * 2 + [self.mounts, self.usage, self.list, self.garbage])
        for _ in range(count):
            self.rng.choice(actions)()


@pytest.fixture
def tree_config(thin_pool: object, scratch_dir: Path) -> Path:
    return write_config(scratch_dir, thin_pool.name,  # type: ignore[attr-defined]
                        grpc_address=str(scratch_dir / "run" / "grpc" / "snapshots.sock"))


@pytest.mark.no_udev_only  # requests and answers: the service, not the devices' events
def test_requests_answer_what_containerds_snapshotter_answers(
        tree: MountedTree, scratch_dir: Path, torture_seed: int) -> None:
    socket_path = scratch_dir / "run" / "grpc" / "snapshots.sock"
    since = len(tree.log())
    with SnapshotsClient(socket_path, timeout=60) as client:
        fuzzer = Fuzzer(client, torture_seed)
        fuzzer.play(RANDOM_REQUESTS)
        listed = sorted(info.name for info in client.list())
    problems = daemon_problems(tree, since)
    assert not fuzzer.failures and not problems, (
        f"seed {torture_seed}: {len(fuzzer.failures)} requests answered wrongly:\n"
        + "\n".join(fuzzer.failures[:25]) + "\n" + "\n".join(problems))
    assert listed == sorted(fuzzer.model) == sorted(s["name"] for s in read_snapshots(tree))
    assert not tree_matches_snapshots(tree)
    refused_lines = [line for line in tree.log()[since:].splitlines()
                     if " refused (" in line and "grpc " in line]
    assert len(refused_lines) >= fuzzer.refusals, "a refusal logged no line"
    print(f"seed {torture_seed}: {sum(fuzzer.answered.values())} requests, "
          f"answers {fuzzer.answered}, {len(fuzzer.model)} snapshots left, the longest "
          f"key {max((len(k.encode()) for k in fuzzer.model), default=0)} bytes")
    tree.unmount()
    wait_until(lambda: not os.path.exists(socket_path), 30, "the socket to go")
    result = check(tree.config)
    assert result.clean, result.describe()
