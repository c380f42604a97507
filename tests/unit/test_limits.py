"""Which keys a new snapshot may have: text, and a name in the tree."""

from __future__ import annotations

import pytest

from dmfs.pool import InvalidArgument, encode_key
from dmfs.pool.limits import check_key


@pytest.mark.parametrize("key", ["a", "default/12/sha256:" + "f" * 64, ".hidden", "%", "é",
                                 "/" * 85, "k" * 255, "日本" * 42, "fs/x", "x/fs"])
def test_keys_with_a_name_in_the_tree_are_taken(key: str) -> None:
    assert check_key(key) == key
    assert len(encode_key(key).encode()) <= 255


@pytest.mark.parametrize(("key", "says"), [
    ("", "non-empty"),
    ("a\0b", "NUL"),
    ("\udcff", "not valid UTF-8"),
    ("fs", "reserved: every node in the tree has an entry of that name"),
    ("k" * 256, "a name of 256 bytes in the tree, more than 255"),
    ("/" * 86, "a name of 258 bytes in the tree"),  # each '/' is %2F there
    ("." + "k" * 253, "a name of 256 bytes"),  # a leading '.' is %2E
    ("k" * 5000, "5000 bytes, more than 4096"),
])
def test_keys_without_one_are_refused_with_a_sentence(key: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says.replace(".", r"\.")):
        check_key(key, "snapshot key")
