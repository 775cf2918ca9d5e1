"""A bug in the reflector crashes it (DESIGN.md); expected conditions do not.

A handler bug ends the RPC with INTERNAL, never UNAVAILABLE (which tells agents to retry and
hides the bug), sets ``Reflector.crashed`` and makes ``_serve`` stop and ``main`` exit 1. An
agent going away, a cancelled call and a malformed message from the agent are not bugs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fabric import types
from fabric.control import client, codec, reflector, reflector_cli
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc
from tests.unit.test_planner import CONFIG, E1
from tests.waiting import wait_until_async

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class _Context:
    """The part of grpc.aio.ServicerContext that Reflector.sync_node uses."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # plaintext

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def _reflector() -> reflector.Reflector:
    return reflector.Reflector(CONFIG, grace_period=5, keepalive_interval=1, startup_hold=0)


async def _session(refl: reflector.Reflector, *after: pb.SyncNodeRequest, hang: bool = True) -> _Context:
    """Run one SyncNode for E1: announce, send ``after``, then stay (``hang``) or go away; return
    the context once the reflector ended the stream."""
    forever = asyncio.Event()

    async def requests() -> AsyncIterator[pb.SyncNodeRequest]:
        yield pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(E1)))
        for r in after:
            yield r
        if hang:
            await forever.wait()

    ctx = _Context()

    async def drain() -> None:
        async for _msg in refl.sync_node(requests(), ctx):  # type: ignore[arg-type]
            pass

    await asyncio.wait_for(drain(), 5)
    return ctx


APPLIED = pb.SyncNodeRequest(applied=pb.Applied(version=1))


def test_bug_while_reading_requests_is_internal_and_crashes(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        refl = _reflector()
        bug = TypeError("'NoneType' object is not subscriptable")

        def on_applied(session: Any, version: int) -> None:
            raise bug

        monkeypatch.setattr(refl, "_on_applied", on_applied)
        ctx = await _session(refl, APPLIED)
        assert ctx.code == grpc.StatusCode.INTERNAL, (ctx.code, ctx.details)
        assert "not subscriptable" in ctx.details
        assert refl.crashed is bug
        assert await asyncio.wait_for(refl.wait_crashed(), 1) is bug

    asyncio.run(body())


def test_malformed_message_from_the_agent_is_its_fault_not_a_bug() -> None:
    async def body() -> None:
        refl = _reflector()
        ctx = await _session(refl, pb.SyncNodeRequest(peer_report=pb.PeerReport(unreachable=["no-slash"])))
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT, (ctx.code, ctx.details)
        assert "malformed message from agent" in ctx.details and "no-slash" in ctx.details
        assert refl.crashed is None

    asyncio.run(body())


def test_agent_going_away_is_not_a_bug() -> None:
    async def body() -> None:
        refl = _reflector()
        ctx = await _session(refl, APPLIED, hang=False)
        assert ctx.code is None  # an ordinary end of the stream
        assert refl.crashed is None

    asyncio.run(body())


def test_over_grpc_handler_bug_is_internal_and_cancel_is_not_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        refl = _reflector()
        (target,) = await refl.start(["127.0.0.1:0"])
        try:
            # A client that cancels its SyncNode: the reflector carries on.
            async with grpc.aio.insecure_channel(target) as ch:
                call = pb_grpc.FabricStub(ch).SyncNode(_announce_then_wait())
                assert (await asyncio.wait_for(call.read(), 5)).WhichOneof("message") == "keepalive"
                call.cancel()
                await wait_until_async(lambda: not refl.status().nodes()[0].connected, 5, "the agent gone")
            assert refl.crashed is None

            # A bug in a unary handler: INTERNAL to the caller, and the reflector crashes.
            def status() -> None:
                raise KeyError("east")

            monkeypatch.setattr(refl, "status", status)
            with pytest.raises(client.ReflectorUnavailable, match=r"INTERNAL: reflector bug in GetStatus: KeyError"):
                await client.get_status(target)
            assert isinstance(refl.crashed, KeyError)
        finally:
            await refl.stop(0)

    asyncio.run(body())


def test_over_grpc_bug_in_sync_node_itself_is_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        refl = _reflector()
        (target,) = await refl.start(["127.0.0.1:0"])

        def admit(ann: types.NodeAnnouncement, session: Any) -> None:
            raise AttributeError("'_NodeRecord' object has no attribute 'ann'")

        monkeypatch.setattr(refl, "_admit", admit)
        try:
            async with grpc.aio.insecure_channel(target) as ch:
                call = pb_grpc.FabricStub(ch).SyncNode(_announce_then_wait())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await asyncio.wait_for(call.read(), 5)
                assert info.value.code() == grpc.StatusCode.INTERNAL
                assert "reflector bug in SyncNode: AttributeError" in (info.value.details() or "")
            assert isinstance(refl.crashed, AttributeError)
        finally:
            await refl.stop(0)

    asyncio.run(body())


def test_serve_stops_on_a_bug_and_main_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        refl = _reflector()
        serving = asyncio.create_task(reflector_cli.serve_until_stopped(refl, ["127.0.0.1:0"]))
        await wait_until_async(lambda: refl._server is not None, 5, "serving")
        assert not serving.done()
        refl.crash(RuntimeError("planted"), "a test")
        async with asyncio.timeout(5):  # stopped by the bug, no signal needed
            await serving
        assert refl._server is None

    asyncio.run(body())

    async def crashing_serve(refl: reflector.Reflector, listen: Any, credentials: Any = None) -> None:
        refl.crash(RuntimeError("planted"), "a test")

    monkeypatch.setattr(reflector_cli, "serve_until_stopped", crashing_serve)
    assert reflector_cli.main(["--config", str(EXAMPLES / "lab.yaml"), "--listen", "127.0.0.1:0", "--insecure"]) == 1


async def _announce_then_wait() -> AsyncIterator[pb.SyncNodeRequest]:
    yield pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(E1)))
    await asyncio.Event().wait()
