"""Walk filters in containerd's syntax (a subset).

A filter is comma-separated clauses that must all hold (``kind==active,
labels.team==db``); several filters passed to walk match when any one holds.
A clause is ``FIELD==VALUE``, ``FIELD!=VALUE``, ``FIELD~=REGEX`` or just
``FIELD`` (present and non-empty).  Fields: ``name``, ``kind``, ``parent``,
``labels.<key>``.  Values may be double-quoted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dmfs.pool.errors import InvalidArgument

_CLAUSE = re.compile(r'^\s*([A-Za-z_][\w.\-/]*)\s*(?:(==|!=|~=)\s*(.*?))?\s*$')
FIELDS = ("name", "kind", "parent")


@dataclass(frozen=True)
class Clause:
    field: str
    operator: str | None
    value: str

    def holds(self, fields: Mapping[str, str | None]) -> bool:
        actual = fields.get(self.field)
        if self.operator is None:
            return bool(actual)
        if self.operator == "==":
            return actual == self.value
        if self.operator == "!=":
            return actual != self.value
        return actual is not None and re.search(self.value, actual) is not None


def _split(text: str) -> list[str]:
    """Split on commas outside double quotes."""
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_filter(text: str) -> list[Clause]:
    clauses = []
    for part in _split(text):
        match = _CLAUSE.match(part)
        if not match:
            raise InvalidArgument(f"bad filter clause {part!r} in {text!r}")
        field, operator, value = match.group(1), match.group(2), match.group(3) or ""
        if field not in FIELDS and not field.startswith("labels."):
            raise InvalidArgument(f"unknown filter field {field!r} (name, kind, parent, "
                                  "labels.<key>)")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if operator == "~=":
            try:
                re.compile(value)
            except re.error as error:
                raise InvalidArgument(f"bad regular expression {value!r}: {error}") from None
        clauses.append(Clause(field, operator, value))
    return clauses


def compile_filters(filters: Sequence[str]) -> Callable[[Mapping[str, str | None]], bool]:
    """A predicate over a snapshot's fields: any filter matches (none = all)."""
    parsed = [parse_filter(text) for text in filters if text.strip()]
    if not parsed:
        return lambda fields: True
    return lambda fields: any(all(c.holds(fields) for c in clauses) for clauses in parsed)
