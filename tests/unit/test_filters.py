"""Walk filters: containerd's grammar and its meaning for snapshots (dmfs.pool.filters)."""

from __future__ import annotations

import pytest

from dmfs.pool.errors import InvalidArgument
from dmfs.pool.filters import compile_filters, parse_filter, snapshot_fields

#: (name, kind, parent, labels), the way containerd's snapshots look in dmfs
SNAPSHOTS = [
    ("default/1/sha256:aaa", "committed", None,
     {"containerd.io/snapshot.ref": "sha256:aaa", "team": "db"}),
    ("default/2/sha256:bbb", "committed", "default/1/sha256:aaa",
     {"containerd.io/snapshot.ref": "sha256:bbb", "a.b": "dotted"}),
    ("default/3/extract-1 sha256:ccc", "active", "default/2/sha256:bbb",
     {"containerd.io/snapshot/uncompressed": "sha256:ddd", "empty": ""}),
    ("look", "view", "default/2/sha256:bbb", {}),
    ("work", "active", None, {"team": "web", "very complex label": "something"}),
]


def names(*filters: str) -> list[str]:
    matches = compile_filters(filters)
    return [name for name, kind, parent, labels in SNAPSHOTS
            if matches(snapshot_fields(name, kind, parent, labels))]


ALL = [snapshot[0] for snapshot in SNAPSHOTS]


@pytest.mark.parametrize(("filters", "expected"), [
    ((), ALL),
    (("",), ALL),
    (("", "kind==view"), ALL),  # an empty filter holds for everything
    (("name",), ALL),  # name, kind and parent are always present
    (("parent",), ALL),
    (("kind==active",), ["default/3/extract-1 sha256:ccc", "work"]),
    (("kind!=active",), ["default/1/sha256:aaa", "default/2/sha256:bbb", "look"]),
    (("name==work",), ["work"]),
    (("name==default/1/sha256:aaa",), ["default/1/sha256:aaa"]),
    (('name=="default/3/extract-1 sha256:ccc"',), ["default/3/extract-1 sha256:ccc"]),
    (('parent==""',), ["default/1/sha256:aaa", "work"]),
    (("parent==default/2/sha256:bbb",), ["default/3/extract-1 sha256:ccc", "look"]),
    (("labels.team",), ["default/1/sha256:aaa", "work"]),
    (("labels.empty",), ["default/3/extract-1 sha256:ccc"]),  # present, if empty
    (("labels.team==db",), ["default/1/sha256:aaa"]),
    (("labels.team!=db",), ALL[1:]),  # an absent label is != anything
    (('labels.team!=""',), ["default/1/sha256:aaa", "work"]),
    (("labels.a.b==dotted",), ["default/2/sha256:bbb"]),  # dots join a label's key
    (('labels."a.b"',), ["default/2/sha256:bbb"]),
    (('labels."very complex label"==something',), ["work"]),
    (('labels."containerd.io/snapshot.ref"==sha256:bbb',), ["default/2/sha256:bbb"]),
    # the filter containerd's metadata store makes for remote snapshotters
    (('labels."containerd.io/snapshot.ref"==sha256:bbb,parent=="default/1/sha256:aaa"',),
     ["default/2/sha256:bbb"]),
    (('labels."containerd.io/snapshot/uncompressed"',), ["default/3/extract-1 sha256:ccc"]),
    (("name==work,labels.team",), ["work"]),  # comma: all must hold
    (("name==work,labels.team==db",), []),
    (("kind==view", "labels.team==web"), ["look", "work"]),  # filters: any may hold
    (("name~=^default/[12]/",), ["default/1/sha256:aaa", "default/2/sha256:bbb"]),
    (("name~=/sha256:[ab]+$/",), ["default/1/sha256:aaa", "default/2/sha256:bbb"]),
    (("name~=|^w|",), ["work"]),
    (('name~="k$"',), ["look", "work"]),
    (("name~=/^\\\\w+$/",), ["look", "work"]),  # \\ in a quoted expression: one backslash
    (("name~=/[abc]{0,1}\"\\//",), []),  # an escaped quote inside: valid, matches nothing
    (("labels.team~=^$",), ["default/2/sha256:bbb", "default/3/extract-1 sha256:ccc",
                            "look"]),  # an absent label is matched as the empty value
    ((" name == work , kind==active ",), ["work"]),  # blanks around tokens
])
def test_filters_select_as_containerd_does(filters: tuple[str, ...],
                                           expected: list[str]) -> None:
    assert names(*filters) == expected


@pytest.mark.parametrize(("quoted", "value"), [
    (r'"a\"b"', 'a"b'), (r'"back\\slash"', "back\\slash"), (r'"tab\there"', "tab\there"),
    (r'"\x41\101\u00e9\U0001F600"', "AAé\U0001F600"), ('"ünï"', "ünï"), ('"a,b c"', "a,b c"),
    (r'"\xc3\xa9"', "é"),  # \x is one byte, as in Go: two make one UTF-8 character
])
def test_quoted_values_take_gos_escapes(quoted: str, value: str) -> None:
    [selector] = parse_filter(f"name=={quoted}")
    assert selector.value == value


@pytest.mark.parametrize("text", [
    "   ",  # only the empty filter matches everything
    "name=work",  # not an operator
    "name===work",
    "name==",
    "name==,kind==view",
    "name==work,",
    ",name==work",
    "name==a b",  # a value ends at a blank
    "name==/work/",  # / and | quote only regular expressions
    "labels.",
    "labels.ns/key==value",  # a key with / must be quoted
    "labels.|key|",
    'labels."unterminated',
    'name=="unterminated',
    'name=="a\nb"',
    r'name=="\q"',  # unknown escape
    r'name=="\x4"',
    r'name=="\400"',  # more than a byte
    r'name=="\ud800"',  # a surrogate
    r'name=="\xff"',  # no UTF-8 text
    r"name~=/\d/",  # in a quoted expression, \d must be \\d (as in containerd)
    "name~=(",  # an expression that does not compile
    "color==blue",  # no such field (containerd: never present)
    '"color"',
    "?labels.a",
])
def test_bad_filters_are_invalid_arguments(text: str) -> None:
    with pytest.raises(InvalidArgument, match="bad filter"):
        compile_filters([text])


def test_a_bad_filter_among_good_ones_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        compile_filters(["kind==view", "name=="])


def test_the_message_shows_where_the_filter_went_wrong() -> None:
    with pytest.raises(InvalidArgument) as raised:
        compile_filters(["kind==view,labels.ns/key"])
    assert ">|/key" in str(raised.value)
