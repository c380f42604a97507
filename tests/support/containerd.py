"""A real containerd daemon inside the test guest, and an image built without network.

:class:`Containerd` starts Debian's containerd (1.6) for a test with its root and
state on a tmpfs (overlayfs, which containerd's plugins probe, cannot use the
guest's overlay root as an upper dir), cgroup2 mounted for runc, and a config
naming dmfs's socket as the proxy snapshotter ``dmfs`` and, optionally,
containerd's own devmapper snapshotter on a second pool for comparisons.  It
waits for the daemon's socket to accept connections (never a sleep), and
:meth:`Containerd.stop` leaves no task, shim, mount or process behind,
whatever the test did.

:func:`build_image` writes an OCI image archive (oci-layout, index, manifest,
config, uncompressed tar layers) whose first layer is a busybox rootfs from
Debian's ``busybox-static``, for ``ctr images import``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import signal
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.loop_pool import LoopPool, loop_pool
from tests.support.torture import read_snapshots
from tests.support.tree import MountedTree, wait_until, write_config

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
BUSYBOX = Path("/bin/busybox")
NAMESPACE = "default"
#: the proxy plugin's name: `ctr ... --snapshotter dmfs`
DMFS_SNAPSHOTTER = "dmfs"
DEVMAPPER_SNAPSHOTTER = "devmapper"
NATIVE_SNAPSHOTTER = "native"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CTR_TIMEOUT = 300.0
#: plugins a test never uses: CRI alone takes seconds to start in the guest
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")


class CtrError(AssertionError):
    """A ctr command that failed; the message has its command line and stderr."""

    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"{' '.join(argv)} exited {result.returncode}:\n"
                         f"{result.stderr.strip() or result.stdout.strip()}")
        self.result = result


def tomlish(value: object) -> str:
    """A Python value as TOML (strings, numbers, booleans, lists of strings)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(tomlish(v) for v in value) + "]"
    return json.dumps(str(value))  # TOML basic strings escape as JSON does


@dataclass
class DevmapperSettings:
    """containerd's own devmapper snapshotter on a pool of its own."""

    pool_name: str
    root_path: Path
    base_image_size: str = "64MB"


def ensure_cgroup2() -> None:
    """runc needs the cgroup2 hierarchy, which nothing in the guest mounts.  It
    is the guest's own (systemd would mount it), so it stays mounted."""
    with open("/proc/self/mountinfo") as mounts:
        if any(line.split()[4] == str(CGROUP_ROOT) and " - cgroup2 " in line
               for line in mounts):
            return
    subprocess.run(["mount", "-t", "cgroup2", "none", str(CGROUP_ROOT)], check=True,
                   capture_output=True)


@dataclass
class Containerd:
    """A containerd daemon of a test's own, in ``workdir`` (on a tmpfs)."""

    workdir: Path
    #: proxy snapshotters: name -> socket address
    proxies: dict[str, Path] = field(default_factory=dict)
    devmapper: DevmapperSettings | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Path:
        return self.workdir / "containerd.sock"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    def config_text(self) -> str:
        lines = [
            "version = 2",
            f"root = {tomlish(self.root)}",
            f"state = {tomlish(self.state)}",
            f"disabled_plugins = {tomlish(list(DISABLED_PLUGINS))}",
            "[grpc]", f"  address = {tomlish(self.address)}",
            "[ttrpc]", f"  address = {tomlish(str(self.address) + '.ttrpc')}",
            "[debug]", '  level = "debug"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {tomlish(self.workdir / 'opt')}",
        ]
        if self.devmapper is not None:
            lines += ['[plugins."io.containerd.snapshotter.v1.devmapper"]',
                      f"  pool_name = {tomlish(self.devmapper.pool_name)}",
                      f"  root_path = {tomlish(self.devmapper.root_path)}",
                      f"  base_image_size = {tomlish(self.devmapper.base_image_size)}"]
        for name, address in self.proxies.items():
            lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"',
                      f"  address = {tomlish(address)}"]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the daemon; returns once its socket accepts connections."""
        assert self.process is None, "containerd is already running"
        ensure_cgroup2()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config_path)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: self._serving() or self.process.poll() is not None,
                       START_TIMEOUT, "containerd's socket")
            if self.process.poll() is not None:
                raise AssertionError(f"containerd exited {self.process.returncode}:\n"
                                     f"{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _serving(self) -> bool:
        return socket_answers(self.address)

    def stop(self) -> None:
        """Remove every task and container, stop the daemon, then end whatever
        it left (shims, their containers) and unmount what is under its root."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.remove_all_containers()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self._end_leftover_shims()
        self._unmount_leftovers()

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def remove_all_containers(self) -> None:
        """Kill and delete every task, then delete every container (all namespaces)."""
        for namespace in self.ctr("namespaces", "ls", "-q", namespace=None).stdout.split():
            for task in self.ctr("tasks", "ls", "-q", namespace=namespace).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=namespace,
                         check=False)
                self.ctr("tasks", "delete", "--force", task, namespace=namespace,
                         check=False)
            for container in self.ctr("containers", "ls", "-q",
                                      namespace=namespace).stdout.split():
                self.ctr("containers", "delete", container, namespace=namespace,
                         check=False)

    def _end_leftover_shims(self) -> None:
        """A shim outlives containerd (it is a daemon of its own): end those
        started for this daemon, found by its socket address on their command line."""
        marker = os.fsencode(str(self.address))
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in argv and b"containerd-shim-runc-v2" in argv[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def _unmount_leftovers(self) -> None:
        prefixes = (str(self.workdir) + "/",)
        with open("/proc/self/mountinfo") as mounts:
            points = [line.split()[4] for line in mounts]
        for point in sorted((p for p in points if p.startswith(prefixes)), key=len,
                            reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)

    # ------------------------------------------------------------------ ctr
    def ctr(self, *args: str, namespace: str | None = NAMESPACE, check: bool = True,
            timeout: float = CTR_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this daemon (in ``namespace``; None: ctr's own choice)."""
        argv = [CTR, "--address", str(self.address)]
        if namespace is not None:
            argv += ["--namespace", namespace]
        argv += list(args)
        result = subprocess.run(argv, capture_output=True, text=True, check=False,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise CtrError(argv, result)
        return result

    def snapshots(self, snapshotter: str, *args: str, check: bool = True
                  ) -> subprocess.CompletedProcess[str]:
        """``ctr snapshots --snapshotter NAME ARGS``."""
        return self.ctr("snapshots", "--snapshotter", snapshotter, *args, check=check)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class Stack:
    """dmfs serving a pool (tree and socket) and a containerd using it as ``dmfs``."""

    pool: LoopPool
    tree: MountedTree
    socket: Path
    containerd: Containerd
    image: Image

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr(*args, check=check)

    def restart_dmfs(self) -> None:
        """Start the tree's daemon again (after a stop or a kill) and wait for
        its socket, as a service manager would."""
        self.tree.mount()
        wait_until(lambda: socket_answers(self.socket), 30, "dmfs's socket")


def collect_garbage(stack: Stack, done: Callable[[], bool] = lambda: True,
                    what: str = "the collection", *, attempts: int = 4,
                    patience: float = 10) -> None:
    """Make containerd collect dmfs now, until ``done()``: what a user does (README,
    "With containerd"): any removal through containerd schedules a collection.

    One removal may not be enough: a collection that meets a snapshot removed in
    the tree meanwhile (NotFound) stops there, and containerd's scheduler skips
    a removal made while a collection runs; both wait for the next removal."""
    for _ in range(attempts):
        stack.containerd.snapshots(DMFS_SNAPSHOTTER, "prepare", "gc-kick")
        stack.containerd.snapshots(DMFS_SNAPSHOTTER, "rm", "gc-kick")
        try:
            wait_until(lambda: done() and not [
                s for s in read_snapshots(stack.tree) if s["name"].endswith("/gc-kick")],
                patience, what)
            return
        except AssertionError:
            continue
    raise AssertionError(f"{attempts} collections by containerd did not bring {what}")


def socket_answers(path: Path) -> bool:
    """Whether a unix socket at ``path`` accepts connections now."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def dmfs_socket(workdir: Path) -> Path:
    """Where the stack's dmfs serves containerd: in a directory dmfs makes itself
    (mode 0750; it refuses to serve from one that every user may enter)."""
    return workdir / "grpc" / "snapshots.sock"


@contextlib.contextmanager
def containerd_stack(workdir: Path, *, layers: int = 2, **dmfs_settings: object
                     ) -> Iterator[Stack]:
    """A fresh pool, dmfs mounted on it with ``grpc_address`` set, containerd
    with the proxy plugin ``dmfs`` pointing there, and the test image; all torn
    down on exit in reverse order (containerd first: it holds dmfs's devices
    mounted while its containers run)."""
    workdir.mkdir(parents=True, exist_ok=True)
    image = build_image(workdir / "image", layers=layers)
    address = dmfs_socket(workdir)
    with loop_pool(workdir, data_mib=1024) as pool:
        config = write_config(workdir, pool.name, grpc_address=str(address), **dmfs_settings)
        tree = MountedTree(config, workdir / "mnt", workdir / "run")
        try:
            tree.mount()
            wait_until(lambda: socket_answers(address), 30, "dmfs's socket")
            with Containerd(workdir / "containerd", proxies={DMFS_SNAPSHOTTER: address}
                            ) as daemon:
                yield Stack(pool, tree, address, daemon, image)
        finally:
            tree.cleanup()



@contextlib.contextmanager
def scratch_containerd_stack(prefix: str, *, layers: int = 2) -> Iterator[Stack]:
    """:func:`containerd_stack` in a fresh directory of /dev/shm (mode 0755: the
    container's processes, not root, reach its files), removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm"))
    workdir.chmod(0o755)
    try:
        with containerd_stack(workdir, layers=layers) as stack:
            yield stack
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


# ---------------------------------------------------------------------- the image
OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
#: a fixed time for every tar entry: the same inputs give the same digests
EPOCH = 1_700_000_000


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


@dataclass(frozen=True)
class Image:
    """An image archive and what containerd will derive from it."""

    archive: Path
    name: str
    #: the uncompressed digests of the layers, bottom first
    diff_ids: tuple[str, ...]
    #: the files each layer adds (paths without a leading /), bottom first
    layer_files: tuple[tuple[str, ...], ...]

    @property
    def chain_ids(self) -> tuple[str, ...]:
        """The snapshot names containerd commits the layers as, bottom first:
        chain(1) = diff(1), chain(n) = sha256(chain(n-1) + " " + diff(n))."""
        chains: list[str] = []
        for diff_id in self.diff_ids:
            chains.append(diff_id if not chains
                          else digest(f"{chains[-1]} {diff_id}".encode()))
        return tuple(chains)


class _Layer:
    """A tar layer being written in memory, with deterministic headers."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.tar = tarfile.TarFile(fileobj=self.buffer, mode="w", format=tarfile.PAX_FORMAT)
        self.files: list[str] = []

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, EPOCH
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    def directory(self, name: str, mode: int = 0o755) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))
        self.files.append(name)

    def symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)
        self.files.append(name)

    def close(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


def busybox_layer() -> _Layer:
    """A rootfs with busybox-static and a link per applet, plus a file that the
    next layer whites out."""
    layer = _Layer()
    for directory, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755),
                            ("proc", 0o555), ("root", 0o700), ("sys", 0o555),
                            ("tmp", 0o1777)):
        layer.directory(directory, mode)
    layer.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in sorted(set(applets) - {"busybox"}):
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    layer.file("etc/group", b"root:x:0:\n")
    layer.file("etc/removed-later", b"the second layer whites this out\n")
    return layer


def build_image(directory: Path, layers: int = 2, name: str = "docker.io/dmfs/busybox:test"
                ) -> Image:
    """An OCI archive in ``directory``: a busybox layer, then ``layers - 1`` layers
    that each add ``/layers/<n>`` (the second also removes ``/etc/removed-later``
    with a whiteout), so that importing it commits a chain of ``layers`` snapshots."""
    assert layers >= 1
    blobs: dict[str, bytes] = {}
    diff_ids, layer_files, descriptors = [], [], []
    for number in range(1, layers + 1):
        if number == 1:
            layer = busybox_layer()
        else:
            layer = _Layer()
            layer.directory("layers")
            layer.file(f"layers/{number}", f"layer {number}\n".encode())
            if number == 2:
                layer.file("etc/.wh.removed-later", b"")
        files = tuple(layer.files)
        data = layer.close()
        diff_ids.append(digest(data))
        layer_files.append(files)
        blobs[digest(data)] = data
        descriptors.append({"mediaType": LAYER_TYPE, "digest": digest(data),
                            "size": len(data)})
    arch = oci_architecture()
    config = json.dumps({
        "architecture": arch, "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"dmfs test layer {n}"}
                    for n in range(1, layers + 1)],
    }, sort_keys=True).encode()
    blobs[digest(config)] = config
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest(config), "size": len(config)},
        "layers": descriptors,
    }, sort_keys=True).encode()
    blobs[digest(manifest)] = manifest
    index = json.dumps({
        "schemaVersion": 2, "mediaType": INDEX_TYPE,
        "manifests": [{"mediaType": MANIFEST_TYPE, "digest": digest(manifest),
                       "size": len(manifest),
                       "platform": {"architecture": arch, "os": "linux"},
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name":
                                           name.rsplit(":", 1)[-1]}}],
    }, sort_keys=True).encode()
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / f"image-{layers}.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", json.dumps(OCI_LAYOUT).encode())
        add("index.json", index)
        for blob_digest, data in blobs.items():
            add(f"blobs/sha256/{blob_digest.removeprefix('sha256:')}", data)
    return Image(archive, name, tuple(diff_ids), tuple(layer_files))
