"""The gRPC face of the reflector: the ``Fabric`` servicer that hands each RPC to the
:class:`~fabric.control.reflector.Reflector` (and turns a handler bug into INTERNAL and a crash,
see "Bugs" there; a request that does not decode into INVALID_ARGUMENT: :class:`DecodeInterceptor`),
where each RPC is authorized first (:meth:`Reflector.authorize`, the rules in
:mod:`~fabric.control.authz`; SyncNode in the reflector, with its announcement), the one place
a record publisher's identity is bound (:func:`publisher_identity`), and the listen addresses
(``HOST:PORT`` or ``unix:/path``) it binds.
"""

from __future__ import annotations

import ipaddress
import logging
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import message as pb_message

from fabric.control import authz, bootstrap, bounds, codec, relay_hub, tls
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from fabric.control.reflector import Reflector

_log = logging.getLogger(__name__)

#: HTTP/2 keepalive below the application keepalive: detects half-open TCP connections even when
#: the event loop of the other side is stuck. Clients ping at most every 10 s (client.py), so the
#: server allows pings that often. Part of :func:`server_options`.
_KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def server_options(limits: bounds.Limits) -> list[tuple[str, Any]]:
    """The gRPC options of every server that holds agent streams: the reflector, fabric-relay,
    and the bare baseline of ``bench control`` (so that the two servers measured side by side
    differ only in what the fabric does with the streams). Keepalive, then the bounds gRPC
    enforces itself (:func:`bounds.server_options`)."""
    return [*_KEEPALIVE_OPTIONS, *bounds.server_options(limits)]


class ListenError(RuntimeError):
    """A --listen address could not be bound."""



class MalformedRequest:
    """A unary request whose bytes did not decode, handed to the handler in its place (see
    :class:`DecodeInterceptor`)."""

    def __init__(self, error: str) -> None:
        self.error = error


class DecodeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Malformed request bytes of a unary-request RPC (GetStatus, WatchTopology, WatchRecords)
    are the caller's fault: the handler gets a :class:`MalformedRequest` and answers
    INVALID_ARGUMENT saying why. Without this, gRPC decodes the request before any handler runs
    and answers UNKNOWN ("Unexpected DecodeError"), logging a traceback at ERROR for every such
    request anyone sends (found by tests/unit/test_fuzz_reflector.py). Streamed requests are
    decoded as the handler reads them: the reflector catches ``DecodeError`` there itself."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def tolerant(raw: bytes) -> Any:
            try:
                return decode(raw)
            except pb_message.DecodeError as e:
                return MalformedRequest(str(e))

        return handler._replace(request_deserializer=tolerant)


async def _refuse_malformed(request: Any, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """End the RPC with INVALID_ARGUMENT when ``request`` did not decode (raises AbortError)."""
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{rpc} from {peer_name(context.peer())}: malformed request: {request.error}")  # fmt: skip


class Servicer(pb_grpc.FabricServicer):  # type: ignore[misc]
    """Adapter from the generated servicer interface to :class:`Reflector`. An exception escaping
    a handler is a bug (see "Bugs" in the module docstring): the caller gets INTERNAL and the
    reflector crashes. Left alone: ``asyncio.CancelledError`` (the caller went away, cancelled
    or hit its deadline; a BaseException, so ``except Exception`` never sees it) and gRPC's
    ``AbortError`` (an RPC ended on purpose with ``context.abort``)."""

    def __init__(self, reflector: Reflector) -> None:
        self._r = reflector

    async def _bug(self, exc: Exception, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._r.crash(exc, f"{rpc} from {peer_name(context.peer())}")
        await context.abort(grpc.StatusCode.INTERNAL, f"reflector bug in {rpc}: {exc!r} (it restarts)")

    # grpc.aio recognises streaming handlers by inspect.isasyncgenfunction: these must be async
    # generator functions themselves, not functions returning one.
    async def SyncNode(
        self, request_iterator: AsyncIterator[pb.SyncNodeRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.SyncNodeResponse | bytes]:
        """Responses as :func:`wire` writes them: a message encoded once for many sessions (a
        shared delta, a keepalive) comes as its bytes (registered by :func:`add_to_server`)."""
        try:
            with self._r.gate.stream("SyncNode", context, announce=True) as slot:
                if slot.refused is None:
                    async for msg in self._r.sync_node(request_iterator, context, slot, wire=True):
                        yield msg
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await self._bug(e, "SyncNode", context)

    # -- relay tier hook (issue 21): the whole of it lives in fabric/control/relay_hub.py --------
    async def RelayNodes(
        self, request_iterator: AsyncIterator[pb.RelayNodesRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.RelayNodesResponse]:
        """A fabric-relay's stream of many agents' SyncNode sessions (:mod:`fabric.control.relay_hub`)."""
        if self._standby(context) or not self._r.authorize(authz.RELAY_NODES, context):
            return
        try:
            with self._r.gate.stream("RelayNodes", context) as slot:
                if slot.refused is None:
                    async for msg in relay_hub.serve(self._r, request_iterator, context):
                        yield msg
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await self._bug(e, "RelayNodes", context)

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatusResponse:
        await _refuse_malformed(request, "GetStatus", context)
        if not self._r.authorize(authz.GET_STATUS, context):
            return pb.GetStatusResponse()
        try:
            return codec.status_to_pb(self._r.status())
        except Exception as e:
            await self._bug(e, "GetStatus", context)
            raise  # not reached: abort raises

    def _standby(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """True (and the call answered UNAVAILABLE naming the leader) on a standby: its topology
        has no nodes and it holds no records, so the caller is sent on to the leader."""
        if self._r.standby_reason is None:
            return False
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(self._r.standby_reason)
        return True

    async def WatchTopology(
        self, request: pb.WatchTopologyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchTopologyResponse]:
        await _refuse_malformed(request, "WatchTopology", context)
        if self._standby(context) or not self._r.authorize(authz.WATCH_TOPOLOGY, context):
            return
        try:
            with self._r.gate.stream("WatchTopology", context) as slot:
                if slot.refused is None:
                    async for msg in self._r.watch_topology(context, slot):
                        yield msg
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await self._bug(e, "WatchTopology", context)

    async def PublishRecords(
        self, request_iterator: AsyncIterator[pb.PublishRecordsRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PublishRecordsResponse]:
        if self._standby(context) or not self._r.authorize(authz.PUBLISH_RECORDS, context):
            return
        try:
            with self._r.gate.stream("PublishRecords", context) as slot:
                if slot.refused is None:
                    async for msg in self._r.publish_records(request_iterator, context):
                        yield msg
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await self._bug(e, "PublishRecords", context)

    async def WatchRecords(
        self, request: pb.WatchRecordsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchRecordsResponse]:
        await _refuse_malformed(request, "WatchRecords", context)
        if self._standby(context) or not self._r.authorize(authz.WATCH_RECORDS, context):
            return
        try:
            with self._r.gate.stream("WatchRecords", context) as slot:
                if slot.refused is None:
                    async for msg in self._r.watch_records(request, context, slot):
                        yield msg
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await self._bug(e, "WatchRecords", context)

    async def IssueCertificate(
        self, request: pb.IssueCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.IssueCertificateResponse:
        """A node certificate (:class:`fabric.control.bootstrap.Signer`, the rule in
        :func:`fabric.control.authz.issue_refusal`); a refusal is recorded like every other."""
        peer = peer_name(context.peer())
        try:
            try:
                ident = authz.identify(context)
            except authz.Unauthorized as e:
                self._r._unauthorized(f"IssueCertificate from {peer} ({e.label})", f"IssueCertificate {e.label}",
                                      e.text, e.label)  # fmt: skip
                context.set_code(grpc.StatusCode.UNAUTHENTICATED)
                context.set_details(e.text)
                return pb.IssueCertificateResponse()
            signer = self._r.signer
            if signer is None:
                context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
                context.set_details("this reflector issues no certificates (it was started without --ca-dir)")
                return pb.IssueCertificateResponse()
            members = {c.name for c in self._r.config.clusters}
            try:
                cert_pem, ca_pem = signer.issue(ident, request.node, request.csr_pem, members)
            except bootstrap.Refused as e:
                label = authz.metric_label(ident)
                self._r._unauthorized(f"IssueCertificate from {peer} ({label})", f"IssueCertificate {label}",
                                      e.text, label)  # fmt: skip
                code = grpc.StatusCode.PERMISSION_DENIED if e.authorization else grpc.StatusCode.INVALID_ARGUMENT
                context.set_code(code)
                context.set_details(e.text)
                return pb.IssueCertificateResponse()
            return pb.IssueCertificateResponse(certificate_pem=cert_pem, ca_pem=ca_pem)
        except Exception as e:
            await self._bug(e, "IssueCertificate", context)
            raise  # not reached: abort raises


def wire(msg: pb.SyncNodeResponse | bytes) -> bytes:
    """SyncNode's response serializer: bytes the reflector encoded once for many sessions go out
    as they are (the same bytes ``SerializeToString`` gives), a message is encoded here, per
    stream, as gRPC's generated serializer would."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Register the ``Fabric`` service as the generated ``add_FabricServicer_to_server`` does,
    from the same descriptor, except that SyncNode's responses go through :func:`wire`: a delta
    that thousands of agents get is encoded once, not once per stream (issue 21). The wire
    format is unchanged: clients decode the same ``SyncNodeResponse`` bytes."""
    service = pb.DESCRIPTOR.services_by_name["Fabric"]
    handlers = {}
    for m in service.methods:
        request, response = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        handlers[m.name] = _FACTORIES[(m.client_streaming, m.server_streaming)](
            getattr(servicer, m.name),
            request_deserializer=request.FromString,
            response_serializer=wire if m.name == "SyncNode" else response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def publisher_identity(declared: str, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, bool]:
    """The identity a PublishRecords session publishes as, and whether a certificate proves it:
    the one place it is bound.

    With mutual TLS it is the identity of the client certificate; a declared identity that
    differs (or a role that may not publish) raises :class:`~fabric.control.authz.Unauthorized`
    (:func:`~fabric.control.authz.publisher_refusal`); an empty declaration means "the
    certificate's". On a plaintext channel (``--insecure``) it is what the publisher declares
    in its open message, unproven. Everything after it (records stamped with the identity, the
    role-to-kinds table for proven ones) rests on this answer."""
    ident = authz.identify(context)
    refused = authz.publisher_refusal(ident, declared)
    if refused is not None:
        raise authz.Unauthorized(refused, authz.metric_label(ident))
    return (declared, False) if ident is None else (str(ident), True)



# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------


def peer_name(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` -> ``127.0.0.1:5000``; unix peers as they are."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            return peer[len(prefix) :]
    return peer or "unknown peer"


def parse_listen(addr: str) -> str:
    """Check a --listen value (``HOST:PORT``, ``[V6]:PORT`` or ``unix:/abs/path``); returns it."""
    if addr.startswith("unix:"):
        path = addr[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"--listen {addr!r}: a unix socket path must be absolute (unix:/path/sock)")
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--listen {addr!r}: expected HOST:PORT or unix:/path")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {addr!r}: port {port!r} is not a number from 0 to 65535")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if bare != "localhost":
            raise ValueError(f"--listen {addr!r}: {host!r} is not an IP address") from None
    return addr


def bind(server: grpc.aio.Server, addr: str, credentials: grpc.ServerCredentials | None = None) -> str:
    """Listen on ``addr`` (TLS with ``credentials``, else plaintext); returns the bound target."""
    if addr.startswith("unix:"):
        path = Path(addr[len("unix:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # stale socket of a previous run; a live one would be a bug of the caller
        except FileNotFoundError:
            pass
    try:
        port = server.add_insecure_port(addr) if credentials is None else tls.add_secure_port(server, addr, credentials)
    except RuntimeError as e:
        raise ListenError(f"cannot listen on {addr}: {e}") from e
    if port == 0 and not addr.startswith("unix:"):
        raise ListenError(f"cannot listen on {addr}: address in use or unavailable")
    if addr.startswith("unix:"):
        return addr
    host = addr.rpartition(":")[0]
    return f"{host}:{port}"


