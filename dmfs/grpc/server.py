"""Serving the snapshots service on its unix socket, in the daemon that serves the tree.

grpc.aio runs in a thread of its own, with its own asyncio loop; each request
becomes a trio task of the daemon's one trio run (in the nursery of
:func:`snapshots_api`), which calls the engine as the tree does, and its answer
goes back to the asyncio loop.  Neither loop ever blocks on the other: a
request is handed to trio with ``TrioToken.run_sync_soon`` and its answer to
asyncio with ``call_soon_threadsafe``, so requests run concurrently, as
containerd sends them, and the engine's locks order them exactly as they order
the tree's.

Why this bridge: measured in the test guest by ``bench/grpc_ops.py`` (a Stat
round trip from a client process, p50 / p95 over 500 requests, Python and
containerd's Go client alike): 3.7 / 4.7 ms, against 4.0 / 5.1 ms for grpc's
threaded server whose handlers block in ``trio.from_thread.run`` (which also
holds one worker thread per request in flight), and 3.1 / 3.9 ms for grpc.aio
answering from its own thread without trio at all.  grpc itself is the cost
(a bare unix-socket echo between two processes takes 0.06 ms there); the hop to
trio adds about 0.6 ms.  grpc's server options change nothing measurable there;
its listener does (``dmfs.grpc.GRPC_EXPERIMENTS``, set before grpc is imported).

A request never takes the daemon down: every handler is wrapped in the
service's boundary (:mod:`dmfs.grpc.errors`), and what escapes it (a bug in
this module) is answered by grpc itself with UNKNOWN.  Requests are decoded
here, not by grpc, so that bytes that are no request (garbage, invalid UTF-8
in a string) are refused like any bad request: INVALID_ARGUMENT and one log
line; one larger than grpc's 4 MiB limit is refused by grpc
(RESOURCE_EXHAUSTED).  On stop, the server stops taking requests, lets those in flight
finish (their engine calls always do: the engine does not cut a sequence
short), and removes its socket; then the tree and the engine stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import trio
from google.protobuf.message import DecodeError

from dmfs.grpc.address import prepare_socket_path, secure_socket
from dmfs.grpc.errors import Refusal, refuse
from dmfs.grpc.proto import snapshots_pb2 as api
from dmfs.grpc.service import ChangeListener, SnapshotsService
from dmfs.pool import Snapshotter

log = logging.getLogger(__name__)

#: every RPC and the SnapshotsService method that answers it
RPCS = {"Prepare": "prepare", "View": "view", "Mounts": "mounts", "Commit": "commit",
        "Remove": "remove", "Stat": "stat", "Update": "update", "List": "list",
        "Usage": "usage", "Cleanup": "cleanup"}
#: the RPCs whose answer is a stream (the method returns its messages as a list)
STREAMING = frozenset({"List"})
#: seconds requests in flight get to finish when the daemon stops
STOP_GRACE = 10.0

Handler = Callable[[Any], Awaitable[Any]]
#: hands a request's answer (value, or error) back to the thread that waits for it
Deliver = Callable[[Any, "BaseException | None"], None]


class TrioPort:
    """Calls from another thread's asyncio loop into trio tasks, blocking neither."""

    def __init__(self, token: trio.lowlevel.TrioToken, nursery: trio.Nursery) -> None:
        self._token = token
        self._nursery = nursery

    async def call(self, handler: Handler, request: Any) -> Any:
        """``await handler(request)`` in a new trio task; its result or error here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def deliver(value: Any, error: BaseException | None) -> None:  # trio thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, future, value, error)

        try:
            self._token.run_sync_soon(self._spawn, handler, request, deliver)
        except trio.RunFinishedError:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "dmfs is stopping") from None
        return await future

    def _spawn(self, handler: Handler, request: Any, deliver: Deliver) -> None:
        # Runs as a trio callback, where an exception would end the whole run.
        try:
            self._nursery.start_soon(self._run, handler, request, deliver)
        except RuntimeError:  # the nursery is closed: the service is stopping
            deliver(None, Refusal(grpc.StatusCode.UNAVAILABLE, "dmfs is stopping"))

    @staticmethod
    async def _run(handler: Handler, request: Any, deliver: Deliver) -> None:
        try:
            value = await handler(request)
        except Exception as error:  # the handler's boundary made it a Refusal, mostly
            deliver(None, error)
        except BaseException:  # cancelled: the daemon is stopping
            deliver(None, Refusal(grpc.StatusCode.UNAVAILABLE, "dmfs is stopping"))
            raise
        else:
            deliver(value, None)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the call was cancelled (the client went away)
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


SERVICE = api.DESCRIPTOR.services_by_name["Snapshots"]


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def rpc_handlers(service: SnapshotsService, port: TrioPort) -> grpc.GenericRpcHandler:
    """grpc.aio's handlers of every RPC, handing each request to the service
    through the port.  They take the request's bytes and decode them themselves,
    so that bytes that are no such message (garbage, invalid UTF-8 in a string)
    get INVALID_ARGUMENT and one log line, like any refused request."""
    handlers = {}
    for rpc, method in RPCS.items():
        request_type = getattr(api, SERVICE.methods_by_name[rpc].input_type.name)
        handler = getattr(service, method)
        if rpc in STREAMING:
            handlers[rpc] = grpc.unary_stream_rpc_method_handler(
                _streaming(port, rpc, request_type, handler), response_serializer=_serialize)
        else:
            handlers[rpc] = grpc.unary_unary_rpc_method_handler(
                _unary(port, rpc, request_type, handler), response_serializer=_serialize)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


def decode(rpc: str, request_type: Any, data: bytes) -> Any:
    """The request message in ``data``; a Refusal (INVALID_ARGUMENT) if it is not one."""
    try:
        return request_type.FromString(data)
    except DecodeError as error:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, rpc, "(request)",
                     f"the request is not a {request_type.DESCRIPTOR.full_name}: "
                     f"{error}") from None


def _unary(port: TrioPort, rpc: str, request_type: Any, handler: Handler
           ) -> Callable[..., Awaitable[Any]]:
    async def answer(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await port.call(handler, decode(rpc, request_type, data))
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
    return answer


def _streaming(port: TrioPort, rpc: str, request_type: Any, handler: Handler
               ) -> Callable[..., AsyncIterator[Any]]:
    async def answer(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            messages = await port.call(handler, decode(rpc, request_type, data))
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
        for message in messages:
            yield message
    return answer


class _ServerThread:
    """grpc.aio's server and its asyncio loop, in a thread of their own."""

    def __init__(self, handlers: grpc.GenericRpcHandler, path: Path, admin_gid: int | None,
                 token: trio.lowlevel.TrioToken) -> None:
        self._handlers = handlers
        self._path = path
        self._admin_gid = admin_gid
        self._token = token
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self.ready = trio.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="dmfs-grpc", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # reported to the trio side, which raises it
            self.failure = error
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self.ready.set)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = grpc.aio.server(handlers=[self._handlers])
        server.add_insecure_port(f"unix:{self._path}")
        secure_socket(self._path, self._admin_gid)
        await server.start()
        self._token.run_sync_soon(self.ready.set)
        await self._stopping.wait()
        await server.stop(STOP_GRACE)

    def stop(self) -> None:
        """Ask the server to stop (from any thread); :attr:`thread` ends when it has."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(stopping.set)


@contextlib.asynccontextmanager
async def snapshots_api(engine: Snapshotter, path: Path, admin_gid: int | None,
                        changed: ChangeListener | None = None) -> AsyncIterator[None]:
    """Serve containerd's snapshots API on the unix socket ``path`` while the
    context is open; on exit, stop taking requests and finish those in flight.
    ``changed`` hears of each Commit and Remove (:class:`SnapshotsService`)."""
    await trio.to_thread.run_sync(prepare_socket_path, path, admin_gid)
    async with trio.open_nursery() as requests:
        port = TrioPort(trio.lowlevel.current_trio_token(), requests)
        service = SnapshotsService(engine, changed) if changed else SnapshotsService(engine)
        server = _ServerThread(rpc_handlers(service, port), path, admin_gid,
                               trio.lowlevel.current_trio_token())
        server.thread.start()
        try:
            with trio.CancelScope(shield=True):
                await server.ready.wait()
            if server.failure is not None:
                raise server.failure
            log.info("serving containerd's snapshots API on %s", path)
            yield
        finally:
            with trio.CancelScope(shield=True):
                server.stop()
                # A worker thread waits, so that trio goes on serving the requests in
                # flight meanwhile.
                await trio.to_thread.run_sync(server.thread.join)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                log.info("stopped serving the snapshots API on %s", path)
