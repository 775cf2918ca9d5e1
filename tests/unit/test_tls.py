"""Mutual TLS on the reflector's gRPC service, with real handshakes on 127.0.0.1: who gets in,
who is refused and what the refused client says, a renewed server certificate served without a
restart, and the identity a handler sees (``identity.of_context``).

Each test makes its own CA and certificates in ``tmp_path`` (fabric.control.pki); nothing
sleeps and then asserts: waits poll a condition (tests.waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest

from fabric.control import client, identity, pki, records, reflector, tls
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc
from tests.unit.test_control_session import CONFIG, E1, KEEPALIVE, Recorder
from tests.waiting import wait_until_async

NODE = identity.node("east", "e1")
KIND = "tree.kosmos.io/free"


def run(coro: Coroutine[Any, Any, None], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


@dataclasses.dataclass
class PKI:
    """A fabric CA and TLS directories issued by it under ``root``."""

    root: Path
    ca: pki.CA

    def client(self, name: str, who: identity.Identity = NODE, *, ca: pki.CA | None = None,
               ca_file: pki.CA | None = None, now: datetime.datetime | None = None,
               server_usage: bool = False) -> tls.TLSDir:  # fmt: skip
        """A client TLS dir: ``ca`` signs (default the fabric CA), ``ca_file`` is what it trusts."""
        signer = ca or self.ca
        key = pki.new_key()
        if server_usage:
            cert = signer.sign_server(key.public_key(), ips=["127.0.0.1"], now=now)
        else:
            cert = signer.sign_client(who, pki.make_csr(key, who), now=now)
        d = self.root / name
        pki.write_tls_dir(d, key, cert, (ca_file or self.ca).cert)
        return tls.TLSDir(d)

    def server(self, name: str = "server", dns: tuple[str, ...] = ()) -> tls.TLSDir:
        key = pki.new_key()
        d = self.root / name
        pki.write_tls_dir(d, key, self.ca.sign_server(key.public_key(), ips=["127.0.0.1"], dns_names=dns), self.ca.cert)
        return tls.TLSDir(d)


@pytest.fixture
def fabric_pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path, pki.make_ca())


@contextlib.asynccontextmanager
async def tls_reflector(server_dir: tls.TLSDir) -> AsyncIterator[tuple[reflector.Reflector, str]]:
    refl = reflector.Reflector(CONFIG, grace_period=0.3, keepalive_interval=KEEPALIVE, startup_hold=0,
                               records_startup_hold=0)  # fmt: skip
    (target,) = await refl.start(["127.0.0.1:0"], tls.server_credentials(server_dir))
    try:
        yield refl, target
    finally:
        await refl.stop(0)


def connected(refl: reflector.Reflector, key: str) -> bool:
    return any(n.key == key and n.connected for n in refl.status().nodes())


# --------------------------------------------------------------------------------------------
# Accepted
# --------------------------------------------------------------------------------------------


def test_agent_publisher_watcher_and_status_with_good_certificates(fabric_pki: PKI) -> None:
    agent_dir = fabric_pki.client("agent")
    tree_dir = fabric_pki.client("tree", identity.role("tree", "root-a"))
    reader_dir = fabric_pki.client("reader", identity.role("reader", "ops"))
    # Records are read by add-ons (a reader sees the status only: fabric/control/authz.py).
    sched_dir = fabric_pki.client("scheduler", identity.role("scheduler", "s1"))

    async def body() -> None:
        async with tls_reflector(fabric_pki.server()) as (refl, target):
            rec = Recorder()
            session = client.AgentSession(target, E1, rec, keepalive_interval=KEEPALIVE, backoff=(0.05, 0.2),
                                          tls_dir=agent_dir)  # fmt: skip
            rec.session = session
            task = asyncio.create_task(session.run())
            pub = records.RecordPublisher(target, "tree/root-a", backoff=(0.05, 0.2), tls_dir=tree_dir)
            pub.put(KIND, "leaf-1", b"4 cpu")
            pub_task = asyncio.create_task(pub.run())
            watch = records.RecordWatch(target, KIND, tls_dir=sched_dir)
            try:
                await wait_until_async(lambda: rec.count("snapshot") >= 1, 10, "the agent's snapshot over TLS")
                assert connected(refl, "east/e1")
                async for change in watch:
                    if any(r.name == "leaf-1" and r.data == b"4 cpu" for r in change.upserts):
                        break
                status = await client.get_status(target, tls_dir=reader_dir)
                assert [n.key for n in status.nodes() if n.connected] == ["east/e1"]
                # The blocking channel of CLI tools (on a thread: the server runs on this loop).
                status = await asyncio.to_thread(client.get_status_sync, target, 5.0, reader_dir)
                assert "east/e1" in [n.key for n in status.nodes()]
                listing = await asyncio.to_thread(records.list_records_sync, target, KIND, "", 5.0, sched_dir)
                assert [r.name for r in listing.records] == ["leaf-1"]
            finally:
                await watch.close()
                await pub.close()
                await session.close()
                await asyncio.gather(task, pub_task)

    run(body())


def test_unix_socket_listener_with_tls(fabric_pki: PKI, tmp_path: Path) -> None:
    """A unix socket target has no host name: the client checks pki.SERVICE_NAME, which every
    server certificate carries (pki.CA.sign_server)."""
    reader_dir = fabric_pki.client("reader", identity.role("reader", "ops"))
    sock = tmp_path / "r.sock"

    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=0.3, keepalive_interval=KEEPALIVE, startup_hold=0)
        (target,) = await refl.start([f"unix:{sock}"], tls.server_credentials(fabric_pki.server()))
        try:
            assert target == f"unix:{sock}"
            assert await client.get_status(target, tls_dir=reader_dir) is not None
        finally:
            await refl.stop(0)

    run(body())


# --------------------------------------------------------------------------------------------
# Refused, and what the client says
# --------------------------------------------------------------------------------------------


def _past() -> datetime.datetime:
    return pki.utcnow() - datetime.timedelta(days=3)


BAD = {
    "expired": (lambda p: p.client("expired", now=_past()), "expired since"),
    "wrong CA": (lambda p: p.client("foreign", ca=pki.make_ca("another CA")), "unknown CA"),
    "serverAuth only": (lambda p: p.client("server-usage", server_usage=True), "wrong usage"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_client_certificate_is_refused_and_the_client_says_why(
    fabric_pki: PKI, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, reason = BAD[case]
    bad = make(fabric_pki)

    async def body() -> None:
        async with tls_reflector(fabric_pki.server()) as (refl, target):
            with pytest.raises(client.ReflectorUnavailable) as exc:
                await client.get_status(target, timeout=5.0, tls_dir=bad)
            assert "UNAVAILABLE" in str(exc.value)
            assert str(bad.cert) in str(exc.value) and reason in str(exc.value), str(exc.value)
            # An agent with it never gets a session; its reconnect reason says the same.
            rec = Recorder()
            session = client.AgentSession(target, E1, rec, keepalive_interval=KEEPALIVE, backoff=(0.05, 0.1),
                                          tls_dir=bad)  # fmt: skip
            task = asyncio.create_task(session.run())
            try:
                await wait_until_async(lambda: session._attempts >= 2, 10, "two refused attempts")
                assert rec.count("connection") == 0 and not connected(refl, "east/e1")
            finally:
                await session.close()
                await task

    run(body())
    logged = [r.getMessage() for r in caplog.records if r.name == "fabric.control.tls"]
    assert any(str(bad.cert) in m and reason in m for m in logged), logged


def test_no_client_certificate_is_refused(fabric_pki: PKI) -> None:
    async def body() -> None:
        async with tls_reflector(fabric_pki.server()) as (_refl, target):
            creds = grpc.ssl_channel_credentials(root_certificates=fabric_pki.ca.pem)
            async with grpc.aio.secure_channel(target, creds) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await pb_grpc.FabricStub(ch).GetStatus(pb.GetStatusRequest(), timeout=5.0)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            # A plaintext client does not get in either, and is told what to pass.
            with pytest.raises(client.ReflectorUnavailable, match=r"requires mutual TLS.*pass --tls-dir"):
                await client.get_status(target, timeout=5.0, tls_dir=None)

    run(body())


def test_a_client_of_another_fabric_is_told_it_refused_the_server_certificate(fabric_pki: PKI) -> None:
    other = pki.make_ca("another fabric")
    foreign = fabric_pki.client("foreign-all", ca=other, ca_file=other)

    async def body() -> None:
        async with tls_reflector(fabric_pki.server()) as (_refl, target):
            with pytest.raises(client.ReflectorUnavailable) as exc:
                await client.get_status(target, timeout=5.0, tls_dir=foreign)
            assert f"refused the reflector's server certificate: it is not signed by the CA in {foreign.ca}" in str(
                exc.value
            )

    run(body())


# --------------------------------------------------------------------------------------------
# Renewal
# --------------------------------------------------------------------------------------------


def test_renewed_server_certificate_is_served_without_restart(fabric_pki: PKI) -> None:
    server_dir = fabric_pki.server()
    agent_dir = fabric_pki.client("agent")
    reader_dir = fabric_pki.client("reader", identity.role("reader", "ops"))
    # Only the renewed certificate names this host: a client that checks for it tells which is served.
    renewed_name = [("grpc.ssl_target_name_override", "renewed.kosmos-fabric.test")]

    async def status_as_renewed(target: str) -> bool:
        async with tls.channel(target, reader_dir, options=renewed_name) as ch:
            try:
                await pb_grpc.FabricStub(ch).GetStatus(pb.GetStatusRequest(), timeout=2.0)
            except grpc.aio.AioRpcError:
                return False
        return True

    async def body() -> None:
        async with tls_reflector(server_dir) as (refl, target):
            rec = Recorder()
            session = client.AgentSession(target, E1, rec, keepalive_interval=KEEPALIVE, tls_dir=agent_dir)
            task = asyncio.create_task(session.run())
            try:
                await wait_until_async(lambda: connected(refl, "east/e1"), 10, "the agent's session")
                assert not await status_as_renewed(target)
                key = pki.new_key()
                cert = fabric_pki.ca.sign_server(key.public_key(), ips=["127.0.0.1"],
                                                 dns_names=["renewed.kosmos-fabric.test"])  # fmt: skip
                pki.write_tls_dir(server_dir.path, key, cert, fabric_pki.ca.cert)
                assert await status_as_renewed(target)
                assert await client.get_status(target, tls_dir=reader_dir)  # plain clients too
                # The agent's session, made before, was not touched.
                assert rec.count("connection") == 1 and connected(refl, "east/e1")
            finally:
                await session.close()
                await task

    run(body())


def test_server_keeps_its_certificate_while_a_renewal_is_half_written(fabric_pki: PKI) -> None:
    server_dir = fabric_pki.server()
    reader_dir = fabric_pki.client("reader", identity.role("reader", "ops"))

    async def body() -> None:
        async with tls_reflector(server_dir) as (_refl, target):
            # A new key without its certificate yet: the pair does not match, the old one stays.
            pki.write_atomic(server_dir.key, pki.key_pem(pki.new_key()), private=True)
            assert await client.get_status(target, tls_dir=reader_dir)

    run(body())


# --------------------------------------------------------------------------------------------
# The identity a handler sees
# --------------------------------------------------------------------------------------------


class _Peek(pb_grpc.FabricServicer):
    def __init__(self) -> None:
        self.seen: list[identity.Identity | None] = []

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.GetStatusResponse:
        self.seen.append(identity.of_context(context))
        return pb.GetStatusResponse()


@pytest.mark.parametrize("who", [NODE, identity.role("tree", "root-a"), identity.role("reader", "ops")],
                         ids=str)  # fmt: skip
def test_of_context_gives_the_certificate_identity(fabric_pki: PKI, who: identity.Identity) -> None:
    client_dir = fabric_pki.client("c", who)
    server_dir = fabric_pki.server()

    async def body() -> None:
        peek = _Peek()
        server = grpc.aio.server()
        pb_grpc.add_FabricServicer_to_server(peek, server)
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(server_dir))
        plain = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with tls.channel(f"127.0.0.1:{port}", client_dir) as ch:
                await pb_grpc.FabricStub(ch).GetStatus(pb.GetStatusRequest(), timeout=5.0)
            async with tls.channel(f"127.0.0.1:{plain}", None) as ch:
                await pb_grpc.FabricStub(ch).GetStatus(pb.GetStatusRequest(), timeout=5.0)
        finally:
            await server.stop(None)
        assert peek.seen == [who, None]

    run(body())


def test_of_context_refuses_a_session_below_tls_1_3() -> None:
    class Ctx:
        def auth_context(self) -> dict[str, list[bytes]]:
            return {"transport_security_type": [b"ssl"], "ssl_tls_version": [b"TLSv1.2"],
                    "peer_uri": [NODE.uri.encode()]}  # fmt: skip

    with pytest.raises(ValueError, match=r"TLSv1\.2; the fabric requires TLSv1\.3"):
        identity.of_context(Ctx())


# --------------------------------------------------------------------------------------------
# Flags: secure by default
# --------------------------------------------------------------------------------------------


def test_neither_tls_dir_nor_insecure_is_an_error_that_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(tls.TLSError, match=r"pass --tls-dir DIR .* or --insecure"):
        tls.choose(None, False)
    with pytest.raises(tls.TLSError, match="exclude each other"):
        tls.choose(str(tmp_path), True)
    with pytest.raises(tls.TLSError, match=r"cannot read tls\.crt"):
        tls.choose(str(tmp_path), False)
    assert tls.choose(None, True) is None


def test_insecure_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    tls.announce(None)
    assert any(r.levelname == "WARNING" and "plaintext" in r.getMessage() for r in caplog.records)


def test_processes_refuse_to_start_without_tls_material(capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.agent import agent
    from fabric.control import reflector_cli
    from tools import cli
    from tree import main as tree_main

    assert reflector_cli.main(["--config", "examples/lab.yaml", "--listen", "127.0.0.1:0"]) == 2
    assert "fabric-reflector: no TLS material: pass --tls-dir DIR" in capsys.readouterr().err
    assert agent.main(["--reflector", "127.0.0.1:1", "--cluster", "east", "--node", "e1", "--underlay-ip",
                       "198.18.0.11", "--pod-cidr", "10.10.1.0/24"]) == 2  # fmt: skip
    assert "fabric-agent: no TLS material" in capsys.readouterr().err
    assert cli.main(["status", "--reflector", "127.0.0.1:1"]) == 2
    assert "no TLS material" in capsys.readouterr().err
    assert tree_main.main(["--master", "http://127.0.0.1:1", "--reflector", "127.0.0.1:1"]) == 2
    assert "kosmos-tree: --reflector: no TLS material" in capsys.readouterr().err


def test_agent_configuration_takes_tls_dir_and_insecure_from_flags_or_environment() -> None:
    from fabric.agent import config

    base = ["--reflector", "10.0.0.1:4880", "--cluster", "east", "--node", "e1", "--underlay-ip", "198.18.0.11",
            "--pod-cidr", "10.10.1.0/24"]  # fmt: skip
    assert config.load([*base, "--tls-dir", "/etc/tls"], environ={}).tls_dir == "/etc/tls"
    assert config.load(base, environ={"FABRIC_TLS_DIR": "/etc/tls"}).tls_dir == "/etc/tls"
    assert config.load([*base, "--insecure"], environ={}).insecure
    assert config.load(base, environ={"FABRIC_INSECURE": "true"}).insecure
    assert not config.load(base, environ={}).insecure
    with pytest.raises(config.ConfigError, match="FABRIC_INSECURE"):
        config.load(base, environ={"FABRIC_INSECURE": "maybe"})
