"""Node certificates (fabric/control/bootstrap.py): the IssueCertificate rule (authz.issue_refusal),
the reflector's signer, and an agent's first certificate and its renewals with real TLS
handshakes on 127.0.0.1 (a running session is not dropped by a renewal; a failed renewal is
retried; an unjoined cluster gets nothing).

Each test makes its own CA in ``tmp_path``; waits poll a condition (tests.waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import prometheus_client
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fabric.agent import config as agent_config
from fabric.control import api, authz, bootstrap, client, identity, pki, reflector, relay, tls
from tests.control_recorder import Recorder
from tests.unit.test_control_session import CONFIG, E1, KEEPALIVE
from tests.unit.test_tls import PKI, run
from tests.waiting import wait_until_async

BOOT_EAST = identity.role("bootstrap", "east")
NODE_E1 = identity.node("east", "e1")
MEMBERS = frozenset({"east", "west"})


@pytest.fixture
def fabric_pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path, pki.make_ca())


def csr_pem(who: identity.Identity, key: pki.PrivateKey | None = None) -> bytes:
    return pki.make_csr(key or pki.new_key(), who).public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------------------------
# The rule (pure)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "node", "members", "allowed"),
    [
        (BOOT_EAST, "e1", MEMBERS, True),
        (BOOT_EAST, "e9", MEMBERS, True),  # any node of its own cluster
        (NODE_E1, "e1", MEMBERS, True),  # a renewal
        (NODE_E1, "e2", MEMBERS, False),  # another node of its cluster
        (identity.node("west", "w1"), "e1", MEMBERS, False),  # renews only itself
        (BOOT_EAST, "e1", frozenset({"west"}), False),  # unjoined
        (NODE_E1, "e1", frozenset({"west"}), False),  # unjoined: no renewal either
        (BOOT_EAST, "Bad_Name", MEMBERS, False),
        (BOOT_EAST, "", MEMBERS, False),
        (identity.role("tree", "root"), "e1", MEMBERS, False),
        (identity.role("reader", "ops"), "e1", MEMBERS, False),
        (identity.role("admin", "ops"), "e1", MEMBERS, False),
        (None, "e1", MEMBERS, False),  # plaintext: nothing proves who asks
    ],
)
def test_issue_refusal(caller: identity.Identity | None, node: str, members: frozenset[str], allowed: bool) -> None:
    why = authz.issue_refusal(caller, node, members)
    assert (why is None) == allowed, why
    if not allowed:
        assert why


def test_bootstrap_may_call_only_issue_certificate() -> None:
    assert [rpc for rpc, roles in authz.CALLERS.items() if identity.BOOTSTRAP in roles] == [authz.ISSUE_CERTIFICATE]


# --------------------------------------------------------------------------------------------
# The signer
# --------------------------------------------------------------------------------------------


def test_signer_issues_the_node_certificate_for_the_csr_key() -> None:
    ca = pki.make_ca()
    signer = bootstrap.Signer(ca, datetime.timedelta(minutes=10))
    key = pki.new_key()
    cert_pem, ca_pem = signer.issue(BOOT_EAST, "e7", csr_pem(identity.node("east", "e7"), key), MEMBERS)
    cert = pki.load_cert(cert_pem)
    assert pki.certificate_identity(cert) == identity.node("east", "e7")
    assert pki.key_matches(key, cert)
    assert ca_pem == ca.pem
    assert pki.explain(cert_pem, ca_pem, "client") is None
    assert cert.not_valid_after - cert.not_valid_before == datetime.timedelta(minutes=10) + pki.CLOCK_SKEW


def test_signer_refuses_bad_requests() -> None:
    signer = bootstrap.Signer(pki.make_ca())
    with pytest.raises(bootstrap.Refused) as e:
        signer.issue(BOOT_EAST, "e1", b"not a csr", MEMBERS)
    assert not e.value.authorization and "not a PEM" in e.value.text
    with pytest.raises(bootstrap.Refused) as e:  # a CSR asking for another identity
        signer.issue(BOOT_EAST, "e1", csr_pem(identity.node("east", "e2")), MEMBERS)
    assert not e.value.authorization and "node/east/e2" in e.value.text
    with pytest.raises(bootstrap.Refused) as e:
        signer.issue(BOOT_EAST, "e1", b"x" * (bootstrap.MAX_CSR_BYTES + 1), MEMBERS)
    assert not e.value.authorization
    with pytest.raises(bootstrap.Refused) as e:
        signer.issue(BOOT_EAST, "e1", csr_pem(NODE_E1), frozenset({"west"}))
    assert e.value.authorization and "not a member" in e.value.text


def test_renewal_time_is_about_two_thirds_of_the_lifetime_from_receipt() -> None:
    ca = pki.make_ca()
    now = pki.utcnow()
    cert = ca.sign_client(NODE_E1, pki.new_key().public_key(), lifetime=datetime.timedelta(seconds=30), now=now)
    times = [bootstrap.renewal_time(cert, now, random.Random(seed)) for seed in range(50)]
    # notBefore is back-dated by the clock skew allowance; the plan counts from receipt (29-30 s
    # left then: certificates hold whole seconds), and 2/3 minus up to a tenth of that is 16.4-20 s.
    assert all(now + datetime.timedelta(seconds=16.4) <= t <= now + datetime.timedelta(seconds=20.01) for t in times)
    assert len(set(times)) > 1  # jittered


def test_problem_names_what_is_missing_or_wrong(fabric_pki: PKI, tmp_path: Path) -> None:
    assert "cannot read" in (bootstrap.problem(tls.TLSDir(tmp_path / "none"), NODE_E1) or "")
    good = fabric_pki.client("good", NODE_E1)
    assert bootstrap.problem(good, NODE_E1) is None
    assert "node/east/e1" in (bootstrap.problem(good, identity.node("east", "e2")) or "")
    later = pki.utcnow() + datetime.timedelta(days=2)
    assert "expired" in (bootstrap.problem(good, NODE_E1, later) or "")


def test_problem_reads_and_checks_as_the_client_channels_do(fabric_pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    """One way to read and check a client directory (tls.client_material): unchanged files are
    read once for the keeper's checks and the channels' alike, and a check at another time than
    the cached verdict's window is made again."""
    good = fabric_pki.client("good", NODE_E1)
    reads: list[tls.TLSDir] = []
    real = tls.TLSDir.read

    def read(d: tls.TLSDir) -> tuple[bytes, bytes, bytes]:
        reads.append(d)
        return real(d)

    monkeypatch.setattr(tls.TLSDir, "read", read)
    assert bootstrap.problem(good, NODE_E1) is None
    assert tls.check_own(good) is None
    assert "node/east/e1" in (bootstrap.problem(good, identity.node("east", "e2")) or "")
    assert len(reads) == 1
    before = pki.utcnow() - datetime.timedelta(days=1)  # before its notBefore (back-dated 5 min)
    assert "not yet valid" in (bootstrap.problem(good, NODE_E1, before) or "")
    assert len(reads) == 2


# --------------------------------------------------------------------------------------------
# Over the wire
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def signing_reflector(
    fabric_pki: PKI, lifetime: datetime.timedelta = datetime.timedelta(hours=1)
) -> AsyncIterator[tuple[reflector.Reflector, str]]:
    refl = reflector.Reflector(CONFIG, grace_period=0.3, keepalive_interval=KEEPALIVE, startup_hold=0,
                               records_startup_hold=0)  # fmt: skip
    refl.signer = bootstrap.Signer(fabric_pki.ca, lifetime)
    (target,) = await refl.start(["127.0.0.1:0"], tls.server_credentials(fabric_pki.server()))
    try:
        yield refl, target
    finally:
        await refl.stop(0)


def serial(d: tls.TLSDir) -> int:
    return x509.load_pem_x509_certificate(d.cert.read_bytes()).serial_number


def renewals(result: str) -> float:
    """``fabric_agent_certificate_renewals_total{result}`` of this process (the agent's metrics
    are singletons of the default registry: tests read differences)."""
    return prometheus_client.REGISTRY.get_sample_value("fabric_agent_certificate_renewals_total",
                                                       {"result": result}) or 0.0  # fmt: skip


def expiry_metric() -> float | None:
    return prometheus_client.REGISTRY.get_sample_value("fabric_agent_certificate_expiry_timestamp_seconds")


def not_after(d: tls.TLSDir) -> float:
    return x509.load_pem_x509_certificate(d.cert.read_bytes()).not_valid_after.replace(tzinfo=datetime.UTC).timestamp()


def unauthorized(refl: reflector.Reflector, label: str) -> int:
    return refl._rejections_by.get((api.RejectionReason.UNAUTHORIZED, label), 0)


@dataclasses.dataclass
class NodeAgent:
    """Node east/e1 as fabric-agent runs it with --bootstrap-dir: the bootstrap credentials
    (``boot``), the directory its CertificateKeeper writes (``own``) and a session over that."""

    boot: tls.TLSDir
    own: tls.TLSDir

    @contextlib.asynccontextmanager
    async def keeper(self, target: str, backoff: tuple[float, float]) -> AsyncIterator[bootstrap.CertificateKeeper]:
        """The keeper running, once it has written the first certificate; cancelled after."""
        keeper = bootstrap.CertificateKeeper(target, self.own, NODE_E1, self.boot, backoff=backoff)
        task = asyncio.create_task(keeper.run())
        try:
            await asyncio.wait_for(keeper.ready.wait(), 10)
            yield keeper
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def session(self, target: str) -> AsyncIterator[client.AgentSession]:
        """An agent session with the node's own certificate, once it has its snapshot; closed after."""
        rec = Recorder()
        session = client.AgentSession(target, E1, rec, keepalive_interval=KEEPALIVE, backoff=(0.05, 0.2),
                                      tls_dir=self.own)  # fmt: skip
        rec.session = session
        task = asyncio.create_task(session.run())
        try:
            await wait_until_async(lambda: rec.count("snapshot") >= 1, 10, "the agent's snapshot")
            yield session
        finally:
            await session.close()
            await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def node_agent(fabric_pki: PKI, tmp_path: Path) -> NodeAgent:
    return NodeAgent(fabric_pki.client("boot", BOOT_EAST), tls.TLSDir(tmp_path / "node"))


def test_agent_bootstraps_then_renews_without_dropping_its_session(fabric_pki: PKI, node_agent: NodeAgent) -> None:
    own = node_agent.own

    async def body() -> None:
        ok0, error0 = renewals("ok"), renewals("error")
        async with (
            signing_reflector(fabric_pki, datetime.timedelta(seconds=3)) as (_refl, target),
            node_agent.keeper(target, (0.05, 0.2)) as keeper,
        ):
            assert bootstrap.problem(own, NODE_E1) is None
            assert (own.key.stat().st_mode & 0o777) == 0o600
            assert expiry_metric() == not_after(own)  # the certificate got with the bootstrap one
            first = serial(own)
            # Renewals go with the node's own certificate: the bootstrap one is gone from now on.
            keeper.bootstrap = None
            async with node_agent.session(target) as session:
                attempts = session._attempts
                await wait_until_async(lambda: keeper.issued >= 3, 15, "two renewals")
                assert serial(own) != first
                assert bootstrap.problem(own, NODE_E1) is None
                # The session that was up before the renewals is the same one: never reconnected.
                assert session._attempts == attempts and session.connected
                assert keeper.failures == 0
                # Every request counted; the expiry is the renewed certificate's.
                assert (renewals("ok") - ok0, renewals("error") - error0) == (keeper.issued, 0)
                assert expiry_metric() == not_after(own)

    run(body(), 40)


def test_failed_renewal_is_retried_and_the_session_goes_on(fabric_pki: PKI, node_agent: NodeAgent) -> None:
    own = node_agent.own

    async def body() -> None:
        ok0, error0 = renewals("ok"), renewals("error")
        async with (
            signing_reflector(fabric_pki, datetime.timedelta(seconds=4)) as (refl, target),
            node_agent.keeper(target, (0.05, 0.1)) as keeper,
        ):
            signer, refl.signer = refl.signer, None  # the reflector stops signing for a while
            async with node_agent.session(target) as session:
                attempts = session._attempts
                expiry0 = expiry_metric()
                await wait_until_async(lambda: keeper.failures >= 2, 10, "failed renewals, retried")
                assert keeper.issued == 1 and session.connected and session._attempts == attempts
                assert (renewals("ok") - ok0, renewals("error") - error0) == (1, keeper.failures)  # each counted
                assert expiry_metric() == expiry0 == not_after(own)  # still the first certificate
                refl.signer = signer
                await wait_until_async(lambda: keeper.issued >= 2, 10, "the renewal once the reflector signs again")
                assert session._attempts == attempts
                assert renewals("ok") - ok0 == keeper.issued
                assert expiry0 is not None and expiry_metric() == not_after(own) > expiry0

    run(body(), 40)


def test_refusals_are_counted_and_an_unjoined_cluster_gets_nothing(fabric_pki: PKI, tmp_path: Path) -> None:
    boot = fabric_pki.client("boot", BOOT_EAST)
    e1 = fabric_pki.client("e1", NODE_E1)
    reader = fabric_pki.client("reader", identity.role("reader", "ops"))

    async def refused(target: str, via: tls.TLSDir, node: str) -> grpc.StatusCode:
        with pytest.raises(client.CertificateRefused) as e:
            await client.issue_certificate(target, via, csr_pem(NODE_E1), node)
        return e.value.code

    async def body() -> None:
        async with signing_reflector(fabric_pki) as (refl, target):
            assert await refused(target, e1, "e2") == grpc.StatusCode.PERMISSION_DENIED
            assert await refused(target, reader, "e1") == grpc.StatusCode.PERMISSION_DENIED
            assert await refused(target, boot, "e1-bad_name") == grpc.StatusCode.PERMISSION_DENIED
            assert unauthorized(refl, "node/east/e1") == 1 and unauthorized(refl, "reader/ops") == 1
            # Good requests before the unjoin, refused after it (bootstrap and renewal alike).
            await bootstrap.obtain(target, boot, tmp_path / "e3", identity.node("east", "e3"))
            await bootstrap.obtain(target, e1, tmp_path / "e1-renewed", NODE_E1)
            refl.set_config(dataclasses.replace(CONFIG, clusters=CONFIG.clusters[1:]))  # east unjoined
            assert await refused(target, boot, "e3") == grpc.StatusCode.PERMISSION_DENIED
            assert await refused(target, e1, "e1") == grpc.StatusCode.PERMISSION_DENIED
            assert unauthorized(refl, "bootstrap/east") == 2  # the bad name, then the unjoin
            assert any("not a member" in r.reason for r in refl.status().rejections)

    run(body())


def test_a_reflector_without_a_ca_issues_nothing(fabric_pki: PKI) -> None:
    boot = fabric_pki.client("boot", BOOT_EAST)

    async def body() -> None:
        async with signing_reflector(fabric_pki) as (refl, target):
            refl.signer = None
            with pytest.raises(client.CertificateRefused) as e:
                await client.issue_certificate(target, boot, csr_pem(NODE_E1), "e1")
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--ca-dir" in e.value.details

    run(body())


def test_agent_configuration_takes_a_bootstrap_dir_from_flag_or_environment() -> None:
    base = ["--reflector", "127.0.0.1:1", "--cluster", "east", "--node", "e1", "--underlay-ip", "198.18.0.11",
            "--pod-cidr", "10.10.1.0/24", "--tls-dir", "/d"]  # fmt: skip
    assert agent_config.load([*base, "--bootstrap-dir", "/b"], {}).bootstrap_dir == "/b"
    assert agent_config.load(base, {"FABRIC_BOOTSTRAP_DIR": "/e"}).bootstrap_dir == "/e"
    assert agent_config.load(base, {}).bootstrap_dir == ""


def test_agent_behind_a_relay_bootstraps_from_the_reflector_a_relay_says_where_to_ask(
    fabric_pki: PKI, node_agent: NodeAgent
) -> None:
    """fabric-relay carries SyncNode only: asked for a certificate it refuses, naming the flag
    that fixes it; the agent's keeper asks the reflector (``--certificates-from``) and its session,
    with the certificate it got, runs through the relay."""
    relay_server = fabric_pki.server("relay-server")
    relay_client = fabric_pki.client("relay-client", identity.role("relay", "zone-a"))

    async def body() -> None:
        async with signing_reflector(fabric_pki, datetime.timedelta(hours=1)) as (_refl, target):
            r = relay.Relay(target, upstream_tls=relay_client, backoff=(0.05, 0.2))
            (relay_target,) = await r.start(["127.0.0.1:0"], tls.server_credentials(relay_server))
            try:
                with pytest.raises(client.CertificateRefused, match="--certificates-from"):
                    await bootstrap.obtain(relay_target, node_agent.boot, node_agent.own.path, NODE_E1)
                async with node_agent.keeper(target, (0.05, 0.2)), node_agent.session(relay_target) as session:
                    assert session.connected
            finally:
                await r.stop(0)

    run(body(), 30)


def test_tls_reflector_serves_several_listen_addresses(fabric_pki: PKI, tmp_path: Path) -> None:
    """The lab's reflector listens on TCP and a unix socket with one set of server credentials."""
    reader = fabric_pki.client("reader", identity.role("reader", "ops"))

    async def body() -> None:
        refl = reflector.Reflector(CONFIG, keepalive_interval=KEEPALIVE, startup_hold=0, records_startup_hold=0)
        creds = tls.server_credentials(fabric_pki.server())
        targets = await refl.start(["127.0.0.1:0", f"unix:{tmp_path}/r.sock"], creds)
        try:
            for target in targets:
                assert (await client.get_status(target, tls_dir=reader)).clusters
        finally:
            await refl.stop(0)

    run(body())
