"""Walk filters in containerd's syntax (its ``filters`` package, as of 1.6).

A filter is comma-separated selectors that must all hold (``kind==active,
labels.team==db``); of several filters passed to walk, any one may hold (an
empty filter holds for everything, and so does an empty list).  A selector is
``FIELDPATH``, ``FIELDPATH==VALUE``, ``FIELDPATH!=VALUE`` or ``FIELDPATH~=REGEX``:

- a field path is fields joined by ``.``; a field is letters, digits and ``_``,
  or a double-quoted string, as label keys with other characters need:
  ``labels."containerd.io/snapshot.ref"``.  Label keys with dots may also be
  written unquoted: ``labels.a.b`` is the label ``a.b``;
- a value runs to the next comma or blank, or is a double-quoted string (Go's
  escapes: ``\\"``, ``\\n``, ``\\x41``, ``\\u00e9``...); a regular expression may
  also be quoted with ``/`` or ``|`` (``name~=/^sha256:/``), in which a ``\\``
  is an escape as well (``\\\\d`` for ``\\d``);
- the fields, as containerd's snapshot stores define them: ``name``, ``kind``
  (``active``, ``view``, ``committed``) and ``parent`` (empty without one) are
  always present; ``labels.<key>`` is present when the snapshot has that label.
  A bare field path holds when present; ``==`` when present and equal; ``!=``
  when not equal (so an absent label is ``!=`` anything but the empty value);
  ``~=`` when the expression matches somewhere in the value (empty if absent).

Where dmfs differs from containerd, it refuses rather than guesses, so that a
typo gets an error instead of an empty answer: a field path that names no field
(containerd: never present), and a regular expression that does not compile
(containerd: logs and never matches) are InvalidArgument.  Blanks around
operators, commas and dots are allowed everywhere (containerd refuses some).
Expressions are Python's ``re``, which agrees with Go's RE2 on the expressions
containerd's clients send (anchors, classes, alternation, repetition).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dmfs.pool.errors import InvalidArgument

#: the fields a path may start with (the rest of the path matters for labels only)
FIELDS = ("name", "kind", "parent", "labels")
OPERATORS = ("==", "!=", "~=")

#: a snapshot's fields as a filter sees them: path -> (value, present)
Adaptor = Callable[[tuple[str, ...]], tuple[str, bool]]

_FIELD_CHARACTER = re.compile(r"[A-Za-z0-9_]")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\"}
_NUMERIC_ESCAPES = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}


@dataclass(frozen=True)
class Selector:
    """One ``FIELDPATH[OPERATOR VALUE]``; ``operator`` None tests presence."""

    path: tuple[str, ...]
    operator: str | None = None
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def holds(self, field: Adaptor) -> bool:
        value, present = field(self.path)
        if self.operator is None:
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


class _Parser:
    """One filter's text, read left to right (the grammar is containerd's)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0

    def fail(self, why: str) -> InvalidArgument:
        shown = f"{self.text[:self.position]} >|{self.text[self.position:]}"
        return InvalidArgument(f"bad filter {self.text!r}: {why} (at {shown!r})")

    def _skip_blanks(self) -> None:
        while self.position < len(self.text) and self.text[self.position].isspace():
            self.position += 1

    def peek(self) -> str:
        """The next character after blanks ('' at the end)."""
        self._skip_blanks()
        return self.text[self.position:self.position + 1]

    def selectors(self) -> list[Selector]:
        found = [self.selector()]
        while True:
            following = self.peek()
            if not following:
                return found
            if following != ",":
                raise self.fail(f"unexpected {following!r}, expected ',' or the end")
            self.position += 1
            found.append(self.selector())

    def selector(self) -> Selector:
        path = self.fieldpath()
        if path[0] not in FIELDS:
            raise self.fail(f"unknown field {path[0]!r} (fields: name, kind, parent, "
                            "labels.<key>)")
        if self.peek() in ("", ","):
            return Selector(path)
        operator = self.operator()
        value = self.value(regex=operator == "~=")
        if operator != "~=":
            return Selector(path, operator, value)
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise self.fail(f"bad regular expression {value!r}: {error}") from None
        return Selector(path, operator, value, pattern)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.peek() == ".":
            self.position += 1
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        first = self.peek()
        if first == '"':
            return self.quoted()
        start = self.position
        while (self.position < len(self.text)
               and _FIELD_CHARACTER.match(self.text[self.position])):
            self.position += 1
        if self.position == start:
            raise self.fail("expected a field name or a quoted string")
        return self.text[start:self.position]

    def operator(self) -> str:
        self._skip_blanks()
        start = self.position
        while self.position < len(self.text) and self.text[self.position] in "=!~":
            self.position += 1
        operator = self.text[start:self.position]
        if operator not in OPERATORS:
            self.position = start
            raise self.fail("expected an operator (==, != or ~=)" if not operator
                            else f"unsupported operator {operator!r}")
        return operator

    def value(self, *, regex: bool) -> str:
        first = self.peek()
        if first == '"' or (regex and first in "/|"):
            return self.quoted()
        if first in ("", ",", ".") or first in "=!~/|":
            raise self.fail("expected a value or a quoted string")
        start = self.position
        while (self.position < len(self.text) and self.text[self.position] != ","
               and not self.text[self.position].isspace()):
            self.position += 1
        return self.text[start:self.position]

    def quoted(self) -> str:
        """A string from its quote to the same quote again, with Go's escapes."""
        quote = self.text[self.position]
        self.position += 1
        out = bytearray()
        while True:
            if self.position >= len(self.text) or self.text[self.position] == "\n":
                raise self.fail("quoted string not terminated")
            char = self.text[self.position]
            self.position += 1
            if char == quote:
                break
            if char != "\\":
                out += char.encode()
                continue
            out += self._escape(quote)
        try:
            return out.decode()
        except UnicodeDecodeError:
            raise self.fail("a quoted string's escapes make no UTF-8 text") from None

    def _escape(self, quote: str) -> bytes:
        """The bytes of one escape (after its backslash), as Go's strconv reads it."""
        code = self.text[self.position:self.position + 1]
        self.position += 1
        if code in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[code].encode()
        if code == quote:
            return quote.encode()
        if code and code in "01234567":  # three octal digits: one byte
            digits = self.text[self.position - 1:self.position + 2]
            self.position += 2
            if not re.fullmatch(r"[0-7]{3}", digits) or int(digits, 8) > 255:
                raise self.fail(f"bad octal escape \\{digits}")
            return bytes([int(digits, 8)])
        if code in _NUMERIC_ESCAPES:  # \xHH: one byte; \uHHHH, \UHHHHHHHH: a character
            base, length = _NUMERIC_ESCAPES[code]
            digits = self.text[self.position:self.position + length]
            self.position += length
            if not re.fullmatch(rf"[0-9A-Fa-f]{{{length}}}", digits):
                raise self.fail(f"bad escape \\{code}{digits}")
            number = int(digits, base)
            if code == "x":
                return bytes([number])
            if number > 0x10FFFF or 0xD800 <= number <= 0xDFFF:
                raise self.fail(f"escape \\{code}{digits} is not a character")
            return chr(number).encode()
        raise self.fail(f"unknown escape \\{code}")


def parse_filter(text: str) -> list[Selector]:
    """One filter's selectors (all must hold); InvalidArgument if it does not parse.
    The empty filter has none: it holds for everything."""
    if text == "":
        return []
    parser = _Parser(text)
    return parser.selectors()


def compile_filters(filters: Sequence[str]) -> Callable[[Adaptor], bool]:
    """A predicate over a snapshot's fields: any filter holds (no filter: all do)."""
    parsed = [parse_filter(text) for text in filters]
    if not parsed or any(not selectors for selectors in parsed):
        return lambda field: True
    return lambda field: any(all(s.holds(field) for s in selectors) for selectors in parsed)


def snapshot_fields(name: str, kind: str, parent: str | None,
                    labels: dict[str, str]) -> Adaptor:
    """What a filter sees of a snapshot (containerd's snapshot adaptor)."""
    def field(path: tuple[str, ...]) -> tuple[str, bool]:
        first = path[0]
        if first == "name":
            return name, True
        if first == "kind":
            return kind, True
        if first == "parent":
            return parent or "", True
        key = ".".join(path[1:])
        if key in labels:
            return labels[key], True
        return "", False
    return field
