"""containerd's snapshots under the names ``ctr`` shows: ``.dmfs/containerd``.

containerd's metadata layer keeps its own names and hands a proxy snapshotter
keys of the form ``<namespace>/<sequence>/<name>`` (its ``createKey``): a layer it
unpacked is committed as ``default/4/sha256:<chain id>``, the layer while it is
being unpacked is ``default/3/extract-<time>-<random> sha256:<chain id>``, the
root of container ``web`` is ``default/9/web``.  The engine stores them as they
are, so in the tree the nodes are ``default%2F4%2Fsha256:...``, nested by
parent: exact, and unreadable.  ``.dmfs/containerd/<namespace>/<name>`` is a
symlink to each such node under its containerd name (encoded as every name in
the tree is), so ``M/.dmfs/containerd/default/web/fs`` is the container's root
and ``M/.dmfs/containerd/default/sha256:<chain id>`` its image's top layer.

Which snapshot a name means: containerd's sequence numbers only grow, and one
name exists once per namespace in containerd's database; the pool may hold an
older snapshot of that name for a while (containerd's Remove drops the name at
once and leaves the snapshotter's Remove to its garbage collector), so the link
goes to the highest sequence number, the one containerd means now.

The index is derived from the keys alone (any key of that form appears, however
it was made) and rebuilt only when the engine's state version has changed, so a
lookup costs a dictionary access while nothing changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dmfs.fuse.names import NAME_MAX, encode_key
from dmfs.pool import Snapshotter

#: containerd's namespace identifiers (identifiers.Validate: alphanumerics joined
#: by single '.', '_' or '-', at most 76 characters), then its sequence number
_KEY = re.compile(r"(?P<namespace>[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*)/(?P<sequence>[0-9]+)/"
                  r"(?P<name>.+)", re.DOTALL)
MAX_NAMESPACE = 76


@dataclass(frozen=True)
class ContainerdName:
    """What containerd calls a snapshot whose key it made."""

    namespace: str
    sequence: int
    name: str


def containerd_name(key: str) -> ContainerdName | None:
    """The namespace, sequence number and name in a key of containerd's form."""
    match = _KEY.fullmatch(key)
    if match is None or len(match["namespace"]) > MAX_NAMESPACE:
        return None
    return ContainerdName(match["namespace"], int(match["sequence"]), match["name"])


class ContainerdIndex:
    """The snapshots with containerd keys, by namespace and entry name."""

    def __init__(self, engine: Snapshotter) -> None:
        self.engine = engine
        self._version: int | None = None
        #: namespace -> entry name (encoded) -> (sequence, key)
        self._entries: dict[str, dict[bytes, tuple[int, str]]] = {}

    def _current(self) -> dict[str, dict[bytes, tuple[int, str]]]:
        version = self.engine.state_version
        if version != self._version:
            self._entries = self._build()
            self._version = version
        return self._entries

    def _build(self) -> dict[str, dict[bytes, tuple[int, str]]]:
        entries: dict[str, dict[bytes, tuple[int, str]]] = {}
        pending: list[str | None] = [None]
        while pending:
            for info in self.engine.children(pending.pop()):
                pending.append(info.key)
                found = containerd_name(info.key)
                if found is None:
                    continue
                entry = encode_key(found.name).encode()
                if len(entry) > NAME_MAX:
                    continue  # no directory entry can carry it; the node still shows
                names = entries.setdefault(found.namespace, {})
                if entry not in names or names[entry][0] < found.sequence:
                    names[entry] = (found.sequence, info.key)
        return entries

    def namespaces(self) -> list[str]:
        """The containerd namespaces with at least one snapshot in the pool."""
        return sorted(self._current())

    def has_namespace(self, namespace: str) -> bool:
        return namespace in self._current()

    def entries(self, namespace: str) -> list[tuple[bytes, str]]:
        """(entry name, key) of a namespace's snapshots, by entry name."""
        names = self._current().get(namespace, {})
        return [(entry, names[entry][1]) for entry in sorted(names)]

    def key(self, namespace: str, entry: bytes) -> str | None:
        """The key the entry ``namespace/entry`` links to, if any."""
        found = self._current().get(namespace, {}).get(entry)
        return found[1] if found else None
