from __future__ import annotations

import pytest

from dmfs.fuse.names import BadName, check_new_key, decode_name, encode_key


@pytest.mark.parametrize("key", ["plain", "default/1/sha256:abc", "50%", "%2F literally",
                                 ".hidden", "..", ".", "a.b", "%25", "x/.y", "ü/ñ"])
def test_every_key_round_trips(key: str) -> None:
    name = encode_key(key)
    assert "/" not in name and not name.startswith(".")
    assert decode_name(name) == key


def test_encoding_examples() -> None:
    assert encode_key("a/b%c") == "a%2Fb%25c"
    assert encode_key(".dmfs") == "%2Edmfs"


@pytest.mark.parametrize("name", ["", ".dmfs", ".x", "50%", "%zz", "a%2fb", "a%2Eb"])
def test_names_no_key_encodes_to_are_refused(name: str) -> None:
    with pytest.raises(BadName):
        decode_name(name)


def test_reserved_and_too_long_keys() -> None:
    with pytest.raises(BadName, match="reserved"):
        check_new_key("fs")
    with pytest.raises(BadName, match="longer than 255"):
        check_new_key("/" * 100)
    check_new_key("f" * 255)
