"""A fuzz test of names and extended attributes through the mount.

mkdir, rename (renameat2 with every flag) and setxattr/removexattr (with
XATTR_CREATE / XATTR_REPLACE) with names and values a script might produce:
bytes that are not UTF-8, names of 255 and 256 bytes as seen in the tree (after
percent-encoding), ``%``, ``%2F``, ``%2E``, control characters, leading dots,
label values up to and past the size limits, writes of ``user.dmfs.*``.  A
fixed list of cases comes first, then random ones from the printed seed.

A model of the tree (written from DESIGN.md §1, not from the code) says what
each case must answer: success, or one of the errnos that apply.  Where the
issue leaves a choice (bytes that are not UTF-8; control characters), EINVAL or
success are both right, and success must then show consistently.  Label sizes
answer what Linux filesystems answer: E2BIG for a value past the limit
(containerd's 4096 bytes of key and value), ERANGE for a name past 255 bytes.
Afterwards: the daemon alive, no traceback in its log, the tree equal to
snapshots.json and to the model, dmfs check clean.
"""

from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass, field

import pytest

from tests.support.torture import (
    DOCUMENTED_ERRNOS,
    check,
    daemon_problems,
    errno_name,
    pid_alive,
    read_snapshots,
    tree_matches_snapshots,
)
from tests.support.tree import MountedTree, errno_of, renameat2

NAME_MAX = 255  # bytes, as seen in the tree: DESIGN §1 answers ENAMETOOLONG past it
FUSE_NAME_MAX = 1024  # the kernel's FUSE lookup answers ENAMETOOLONG itself past this
XATTR_NAME_MAX = 255  # the kernel answers ERANGE itself for longer attribute names
XATTR_SIZE_MAX = 65536
LABEL_MAX = 4096  # containerd: a label's key and value together
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
LABEL = b"user.label."
INFO = b"user.dmfs."
INFO_FIELDS = (b"kind", b"parent", b"id", b"state", b"usage", b"created", b"updated")
RANDOM_CASES = 120
#: how a dead FUSE daemon's mount answers (in a failure message)
DEAD_MOUNT = ("answered ENOTCONN", "answered ECONNABORTED")
MAX_NODES = 24

Path = tuple[bytes, ...]  # entry names from the root
#: what random names are made of
NAME_PIECES = (b"a", b"b", b"z", b"0", b"-", b"_", b" ", b"%", b"%25", b"%2F", b"%2E", b"%2f",
               b"%2e", b"%41", b".", b"..", b"\x01", b"\n", b"\t", b"\x7f", "é".encode(),
               "日本".encode(), b"\xff", b"\xc3", b"\x80", b"fs", b"dmfs")


class NotUtf8:
    """The key of a name that is not UTF-8: EINVAL, or whatever the view made of it."""


NOT_UTF8 = NotUtf8()


def reference_key(name: bytes) -> str | NotUtf8 | None:
    """The snapshot key a directory entry name stands for (DESIGN.md §1: ``%`` and
    ``/`` are written %25 and %2F, a leading ``.`` %2E, and each key has exactly
    one name); None when no key has this name."""
    try:
        text = name.decode()
    except UnicodeDecodeError:
        return NOT_UTF8
    if not text or text.startswith("."):
        return None
    escapes = {"%25": "%", "%2F": "/", "%2E": "."}
    key, i = [], 0
    while i < len(text):
        if text[i] == "%":
            if text[i:i + 3] not in escapes:
                return None
            key.append(escapes[text[i:i + 3]])
            i += 3
        else:
            key.append(text[i])
            i += 1
    decoded = "".join(key)
    canonical = decoded.replace("%", "%25").replace("/", "%2F")
    if canonical.startswith("."):
        canonical = "%2E" + canonical[1:]
    return decoded if canonical == text else None


def has_control_characters(data: bytes) -> bool:
    return any(byte < 32 or byte == 127 for byte in data)


@dataclass
class Node:
    kind: str  # active, view, committed
    labels: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a case may answer: one of ``errnos``, or 0 when ``may_succeed``."""

    errnos: set[int]
    may_succeed: bool

    def allows(self, code: int) -> bool:
        assert self.errnos <= DOCUMENTED_ERRNOS, f"the model allows {self.errnos}"
        return (code == 0 and self.may_succeed) or code in self.errnos


def only(*codes: int) -> Outcome:
    return Outcome(set(codes), may_succeed=False)


class Model:
    """The tree as DESIGN.md §1 says it must be after each case."""

    def __init__(self) -> None:
        self.nodes: dict[Path, Node] = {}
        self.keys: dict[object, Path] = {}  # key (or the raw name, not UTF-8) -> path

    @staticmethod
    def key_of(name: bytes) -> object:
        key = reference_key(name)
        return name if key is NOT_UTF8 else key

    def exists_in(self, directory: Path, name: bytes) -> bool:
        if directory == ():
            return name == b".dmfs" or (name,) in self.nodes
        return name == b"fs" or (*directory, name) in self.nodes

    def children(self, path: Path) -> list[Path]:
        return [p for p in self.nodes if len(p) == len(path) + 1 and p[:-1] == path]

    def add(self, path: Path, kind: str) -> None:
        self.nodes[path] = Node(kind)
        self.keys[self.key_of(path[-1])] = path

    def remove(self, path: Path) -> None:
        del self.nodes[path]
        del self.keys[self.key_of(path[-1])]

    def apply_rename(self, path: Path, name: bytes) -> None:
        new = (*path[:-1], name)
        node = self.nodes[path]
        moved = {p: n for p, n in self.nodes.items() if p[:len(path)] == path}
        for old_path in moved:
            del self.nodes[old_path]
        for old_path, n in moved.items():
            self.nodes[new + old_path[len(path):]] = n
        del self.keys[self.key_of(path[-1])]
        for key, where in list(self.keys.items()):
            if where[:len(path)] == path:
                self.keys[key] = new + where[len(path):]
        self.keys[self.key_of(name)] = new
        if node.kind == "active":
            node.kind = "committed"

    # -- what each operation must answer --------------------------------------------
    def name_rules(self, name: bytes, outcome: Outcome, *, at_root: bool) -> None:
        if len(name) > NAME_MAX:
            outcome.errnos.add(errno.ENAMETOOLONG)
            outcome.may_succeed = False
        key = reference_key(name)
        if key is NOT_UTF8:
            outcome.errnos.add(errno.EINVAL)  # or success: the view may encode them
        elif key is None or (at_root and key == "fs"):
            outcome.errnos.add(errno.EINVAL)
            outcome.may_succeed = False
        elif has_control_characters(name):
            outcome.errnos.add(errno.EINVAL)  # DESIGN §1 does not forbid them: either
        if self.key_of(name) in self.keys:
            outcome.errnos.add(errno.EEXIST)
            outcome.may_succeed = False

    def mkdir(self, directory: Path, name: bytes) -> Outcome:
        if len(name) > FUSE_NAME_MAX:
            return only(errno.ENAMETOOLONG)
        if name in (b".", b"..") or self.exists_in(directory, name):
            return only(errno.EEXIST)
        outcome = Outcome(set(), may_succeed=True)
        if directory and self.nodes[directory].kind != "committed":
            outcome.errnos.add(errno.EPERM)
            outcome.may_succeed = False
        self.name_rules(name, outcome, at_root=not directory)
        return outcome

    def rename(self, source: Path, name: bytes, flags: int) -> Outcome:
        directory = source[:-1]
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            return only(errno.EINVAL)
        if len(name) > FUSE_NAME_MAX:
            return only(errno.ENAMETOOLONG)
        exists = self.exists_in(directory, name)
        if flags & RENAME_EXCHANGE:
            return only(errno.EINVAL if exists else errno.ENOENT)
        if flags & RENAME_NOREPLACE and exists:
            return only(errno.EEXIST)
        outcome = Outcome(set(), may_succeed=True)
        if exists:
            outcome.errnos.add(errno.EEXIST)
            outcome.may_succeed = False
        if flags & RENAME_WHITEOUT:
            outcome.errnos.add(errno.EINVAL)
            outcome.may_succeed = False
        if self.nodes[source].kind == "view":
            outcome.errnos.add(errno.EPERM)
            outcome.may_succeed = False
        self.name_rules(name, outcome, at_root=not directory)
        return outcome

    def attribute_exists(self, target: Path | None, name: bytes) -> bool:
        if target is None:
            return False
        if name.startswith(INFO):
            return name[len(INFO):] in INFO_FIELDS
        return name in self.nodes[target].labels

    def setxattr(self, target: Path | None, name: bytes, value: bytes, flags: int) -> Outcome:
        if flags & ~(XATTR_CREATE | XATTR_REPLACE):
            return only(errno.EINVAL)
        if not name or len(name) > XATTR_NAME_MAX:
            return only(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            return only(errno.E2BIG)
        if not name.startswith(b"user."):
            # The tree has no other namespace, and says so (ENOTSUP) to the
            # getxattr with which pyfuse3 checks XATTR_CREATE/XATTR_REPLACE too.
            return only(errno.ENOTSUP)
        exists = self.attribute_exists(target, name)
        if flags & XATTR_CREATE and exists:
            return only(errno.EEXIST)
        if flags & XATTR_REPLACE and not exists:
            return only(errno.ENODATA)
        refused = self.not_a_label(target, name)
        if refused is not None:
            return refused
        key = name[len(LABEL):]
        outcome = Outcome(set(), may_succeed=True)
        if reference_text(key) is None or reference_text(value) is None:
            outcome.errnos.add(errno.EINVAL)  # or success: the view may encode them
        if len(key) + len(value) > LABEL_MAX:
            outcome.errnos.add(errno.E2BIG)
            outcome.may_succeed = False
        return outcome

    @staticmethod
    def not_a_label(target: Path | None, name: bytes) -> Outcome | None:
        """How a change of ``name`` on ``target`` (None: not a node) is refused
        when it is no label of a node; None when it is one."""
        if target is None:
            return only(errno.ENOTSUP)
        if name.startswith(INFO):
            return only(errno.EPERM)
        if not name.startswith(LABEL) or name == LABEL:
            return only(errno.ENOTSUP)
        return None

    def removexattr(self, target: Path | None, name: bytes) -> Outcome:
        if not name or len(name) > XATTR_NAME_MAX:
            return only(errno.ERANGE)
        refused = self.not_a_label(target, name)
        if refused is not None:
            return refused
        assert target is not None
        if name in self.nodes[target].labels:
            return Outcome(set(), may_succeed=True)
        outcome = only(errno.ENODATA)
        if reference_text(name[len(LABEL):]) is None:
            outcome.errnos.add(errno.EINVAL)
        return outcome


def reference_text(data: bytes) -> str | None:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


@dataclass
class Case:
    """One operation: ``kind`` and its arguments (bytes, as a script passes them)."""

    kind: str  # mkdir, view, rename, setxattr, removexattr
    path: Path  # mkdir: the new node's path; others: the node (() = the root)
    name: bytes = b""  # rename: the new name; xattrs: the attribute
    value: bytes = b""
    flags: int = 0

    def __str__(self) -> str:
        shown = "/".join(repr(p)[2:-1] for p in self.path) or "<root>"
        extra = f" {self.name[:60]!r}{'...' if len(self.name) > 60 else ''}" if self.name else ""
        if self.value:
            extra += f" = {len(self.value)} bytes"
        return f"{self.kind} {shown[:120]}{extra} flags={self.flags}"


class Fuzzer:
    def __init__(self, tree: MountedTree, seed: int) -> None:
        self.tree = tree
        self.rng = random.Random(seed)
        self.model = Model()
        self.root = os.fsencode(tree.mountpoint)
        self.failures: list[str] = []
        self.counter = 0

    def where(self, path: Path) -> bytes:
        return os.path.join(self.root, *path) if path else self.root

    def run(self, case: Case) -> None:
        model = self.model
        if case.kind in ("mkdir", "view"):
            outcome = model.mkdir(case.path[:-1], case.path[-1])
            mode = 0o555 if case.kind == "view" else 0o755
            answer = errno_of(lambda: os.mkdir(self.where(case.path), mode))
            if answer == 0 and outcome.allows(0):
                model.add(case.path, "view" if case.kind == "view" else "active")
                self.expect_node(case, case.path)
        elif case.kind == "rename":
            outcome = model.rename(case.path, case.name, case.flags)
            new = (*case.path[:-1], case.name)
            answer = errno_of(lambda: renameat2(self.where(case.path), self.where(new),
                                                case.flags))
            if answer == 0 and outcome.allows(0):
                model.apply_rename(case.path, case.name)
                self.expect_node(case, new)
        elif case.kind == "setxattr":
            target = case.path or None
            outcome = model.setxattr(target, case.name, case.value, case.flags)
            answer = errno_of(lambda: os.setxattr(self.where(case.path), case.name,
                                                  case.value, case.flags))
            if answer == 0 and outcome.allows(0) and target is not None:
                model.nodes[target].labels[case.name] = case.value
                got = errno_of(lambda: self.check_value(case))
                if got:
                    self.fail(case, f"reading the label back: {errno_name(got)}")
        else:
            target = case.path or None
            outcome = model.removexattr(target, case.name)
            answer = errno_of(lambda: os.removexattr(self.where(case.path), case.name))
            if answer == 0 and outcome.allows(0) and target is not None:
                del model.nodes[target].labels[case.name]
        if not outcome.allows(answer):
            wanted = sorted(errno_name(c) for c in outcome.errnos)
            self.fail(case, f"answered {errno_name(answer)}, expected "
                      f"{' or '.join((['ok'] if outcome.may_succeed else []) + wanted)}")

    def check_value(self, case: Case) -> None:
        value = os.getxattr(self.where(case.path), case.name)
        if value != case.value:
            self.fail(case, f"the label reads back as {len(value)} other bytes")

    def expect_node(self, case: Case, path: Path) -> None:
        kind = errno_of(lambda: os.getxattr(self.where(path), "user.dmfs.kind"))
        if kind:
            self.fail(case, f"succeeded, but the node is not there ({errno_name(kind)})")

    def fail(self, case: Case, why: str) -> None:
        self.failures.append(f"case {self.counter}: {case}: {why}")

    def play(self, cases: list[Case]) -> bool:
        """Run cases; False once the daemon is gone (nothing after that means anything:
        the mountpoint is a plain directory again)."""
        for case in cases:
            self.counter += 1
            self.run(case)
            if not (pid_alive(self.tree.pid) and self.tree.is_mounted()) or any(
                    dead in failure for dead in DEAD_MOUNT for failure in self.failures[-1:]):
                self.failures.append(f"the daemon is gone after case {self.counter}: {case}")
                return False
        return True

    # -- random cases --------------------------------------------------------------
    def random_name(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.15:  # at the limit, as seen in the tree
            length = rng.choice([254, 255, 256, 300])
            filler = rng.choice([b"n", b"%2F", b"%25", "é".encode()])
            name = (filler * length)[:length - 1]
            return name + b"x" * (length - len(name))
        name = b"".join(rng.choice(NAME_PIECES) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.2:
            name = b"." + name
        return name

    def random_attribute(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            return LABEL + self.random_name()[:rng.choice([10, 60, 244, 245, 300])]
        if roll < 0.75:
            return INFO + rng.choice([*INFO_FIELDS, b"bogus"])
        return rng.choice([b"user.label.", b"user.label", b"user.labelx", b"user.other",
                           b"user.dmfs", b"user.dmfsx", b"trusted.x"])

    def random_value(self, name: bytes) -> bytes:
        rng = self.rng
        roll = rng.random()
        key_size = max(0, len(name) - len(LABEL))
        if roll < 0.5:
            return rng.choice([b"v", b"", "ü".encode(), b"\xff", b"a\nb", b"%2F"])
        if roll < 0.8:  # around the label limit
            return b"v" * max(0, LABEL_MAX - key_size + rng.choice([-1, 0, 1, 100]))
        return b"w" * rng.choice([XATTR_SIZE_MAX - 1, XATTR_SIZE_MAX, XATTR_SIZE_MAX + 1])

    def random_case(self) -> Case:
        rng, nodes = self.rng, list(self.model.nodes)
        committed = [p for p in nodes if self.model.nodes[p].kind == "committed"]
        roll = rng.random()
        if roll < 0.35 or not nodes:
            directory = rng.choice([(), *committed, *rng.sample(nodes, min(2, len(nodes)))])
            return Case(rng.choice(["mkdir", "mkdir", "view"]), (*directory, self.random_name()))
        if roll < 0.55:
            flags = rng.choice([0, 0, RENAME_NOREPLACE, RENAME_NOREPLACE, RENAME_EXCHANGE,
                                RENAME_WHITEOUT, RENAME_NOREPLACE | RENAME_EXCHANGE, 8])
            source = rng.choice(nodes)
            name = self.random_name()
            if rng.random() < 0.2:  # onto an existing sibling
                name = rng.choice([p[-1] for p in self.model.children(source[:-1])])
            if name in (b".", b"..", source[-1]) or (source[:-1] and name == b"fs") or (
                    not source[:-1] and name == b".dmfs"):
                name = b"renamed"  # the kernel's own answers for these depend on more
            return Case("rename", source, name, flags=flags)
        target = () if rng.random() < 0.05 else rng.choice(nodes)
        name = self.random_attribute()
        labels = list(self.model.nodes[target].labels) if target else []
        if labels and rng.random() < 0.3:
            name = rng.choice(labels)
        if roll < 0.9:
            flags = rng.choice([0, 0, 0, XATTR_CREATE, XATTR_REPLACE, 4])
            return Case("setxattr", target, name, self.random_value(name), flags)
        return Case("removexattr", target, name)

    def prune(self) -> None:
        """Remove leaves while the tree is big, so successes keep coming."""
        while len(self.model.nodes) > MAX_NODES:
            leaves = [p for p in self.model.nodes if not self.model.children(p)]
            leaf = self.rng.choice(leaves)
            answer = errno_of(lambda leaf=leaf: os.rmdir(self.where(leaf)))
            if answer:
                self.failures.append(f"rmdir of leaf {leaf!r}: {errno_name(answer)}")
                return
            self.model.remove(leaf)


def fixed_cases() -> list[Case]:
    long_label = LABEL + b"k"
    return [
        Case("mkdir", (b"base",)), Case("rename", (b"base",), b"base-c"),  # committed
        Case("mkdir", (b"act",)),
        Case("view", (b"base-c", b"look")),
        Case("mkdir", (b"bad\xff",)), Case("mkdir", (b"\xc3",)),
        Case("mkdir", (b"base-c", b"child\x80")),
        Case("mkdir", (b"x" * 255,)), Case("mkdir", (b"y" * 256,)),
        Case("mkdir", (b"w" * (FUSE_NAME_MAX + 1),)),
        Case("mkdir", (b"s" * 252 + b"%2F",)),  # 255 bytes in the tree, 253 in the key
        Case("mkdir", (b"t" * 253 + b"%2F",)),  # 256 bytes in the tree
        Case("mkdir", ("é".encode() * 127 + b"x",)), Case("mkdir", ("é".encode() * 128,)),
        Case("mkdir", (b"%",)), Case("mkdir", (b"50%",)), Case("mkdir", (b"%2F",)),
        Case("mkdir", (b"a%2Fb",)), Case("mkdir", (b"a%2fb",)), Case("mkdir", (b"%2E",)),
        Case("mkdir", (b"%2Ehidden",)), Case("mkdir", (b"x%2Ey",)), Case("mkdir", (b"%25",)),
        Case("mkdir", (b"%41",)), Case("mkdir", (b"fs",)), Case("mkdir", (b"base-c", b"fs")),
        Case("mkdir", (b".hidden",)), Case("mkdir", (b"..x",)), Case("mkdir", (b".dmfs",)),
        Case("mkdir", (b"ctl\x01",)), Case("mkdir", (b"line\nbreak",)),
        Case("mkdir", (b"tab\t",)), Case("mkdir", (b"del\x7f",)),
        Case("mkdir", (b"act", b"under-active")),
        Case("mkdir", (b"base-c", b"look", b"under-view")),
        Case("setxattr", (b"act",), b"user.label.b\xff", b"v"),
        Case("setxattr", (b"act",), b"user.label.ok", b"v\xff"),
        Case("setxattr", (b"act",), b"user.label.ctl\x01", b"\x01"),
        Case("setxattr", (b"act",), long_label, b"v" * (LABEL_MAX - 1)),  # exactly 4096
        Case("setxattr", (b"act",), long_label, b"v" * LABEL_MAX),  # 4097
        Case("setxattr", (b"act",), b"user.label.big", b"v" * XATTR_SIZE_MAX),
        Case("setxattr", (b"act",), b"user.label.huge", b"v" * (XATTR_SIZE_MAX + 1)),
        Case("setxattr", (b"act",), LABEL + b"n" * 244, b"v"),  # a 255-byte name
        Case("setxattr", (b"act",), LABEL + b"n" * 245, b"v"),  # 256 bytes
        Case("setxattr", (b"act",), b"user.dmfs.kind", b"view"),
        Case("setxattr", (b"act",), b"user.dmfs.bogus", b"x"),
        Case("setxattr", (b"act",), b"user.dmfs.kind", b"x", XATTR_CREATE),
        Case("setxattr", (b"act",), b"user.dmfs.bogus", b"x", XATTR_REPLACE),
        Case("setxattr", (b"act",), b"user.label.new", b"1", XATTR_REPLACE),
        Case("setxattr", (b"act",), b"user.label.new", b"1", XATTR_CREATE),
        Case("setxattr", (b"act",), b"user.label.new", b"2", XATTR_CREATE),
        Case("setxattr", (b"act",), b"user.label.new", b"3", XATTR_REPLACE),
        Case("setxattr", (b"act",), b"user.label.x", b"1", 4),
        Case("setxattr", (b"act",), b"user.other", b"1"),
        Case("setxattr", (b"act",), b"user.label.", b"1"),
        Case("setxattr", (), b"user.label.root", b"1"),
        Case("removexattr", (b"act",), b"user.dmfs.kind"),
        Case("removexattr", (b"act",), b"user.label.absent"),
        Case("removexattr", (b"act",), b"user.label.\xfe"),
        Case("removexattr", (b"act",), b"user.label.new"),
        Case("rename", (b"act",), b"act\xff"),  # a commit
        Case("mkdir", (b"c2",)), Case("rename", (b"c2",), b"c2-c"),
        Case("rename", (b"c2-c",), b"c2\xff"),  # a rename
        Case("mkdir", (b"act2",)), Case("rename", (b"act2",), b"base-c"),
        Case("rename", (b"act2",), b"base-c", flags=RENAME_NOREPLACE),
        Case("rename", (b"act2",), b"base-c", flags=RENAME_EXCHANGE),
        Case("rename", (b"act2",), b"nothing-here", flags=RENAME_EXCHANGE),
        Case("rename", (b"act2",), b"w", flags=RENAME_WHITEOUT),
        Case("rename", (b"act2",), b"w", flags=RENAME_NOREPLACE | RENAME_EXCHANGE),
        Case("rename", (b"act2",), b"w", flags=8),
        Case("rename", (b"act2",), b"z" * 256),
        Case("rename", (b"act2",), b"fs"), Case("rename", (b"act2",), b".dot"),
        Case("rename", (b"act2",), b"%2Edot", flags=RENAME_NOREPLACE),  # a commit
        Case("rename", (b"base-c", b"look"), b"look2"),
    ]


@pytest.mark.no_udev_only  # names and xattrs: the namespace, not the devices
def test_names_and_xattrs_answer_documented_errnos(tree: MountedTree, torture_seed: int
                                                   ) -> None:
    fuzzer = Fuzzer(tree, torture_seed)
    alive = fuzzer.play(fixed_cases())
    for _ in range(RANDOM_CASES if alive else 0):
        if not fuzzer.play([fuzzer.random_case()]):
            break
        fuzzer.prune()
    problems = daemon_problems(tree)
    assert not fuzzer.failures and not problems, (
        f"seed {torture_seed}: {len(fuzzer.failures)} of {fuzzer.counter} cases failed:\n"
        + "\n".join(fuzzer.failures[:25]) + "\n" + "\n".join(problems))
    assert not tree_matches_snapshots(tree)
    labels = {s["name"]: s["labels"] for s in read_snapshots(tree)}
    for path, node in fuzzer.model.nodes.items():
        key = reference_key(path[-1])
        if isinstance(key, str) and all(reference_text(k) is not None and
                                        reference_text(v) is not None
                                        for k, v in node.labels.items()):
            wanted = {k[len(LABEL):].decode(): v.decode() for k, v in node.labels.items()}
            assert labels[key] == wanted, f"labels of {key!r} in snapshots.json"
    tree.unmount()
    result = check(tree.config)
    assert result.clean, result.describe()
