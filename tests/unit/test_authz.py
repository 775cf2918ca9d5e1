"""Authorization at the reflector (issue 20 item 3): the pure rules of fabric.control.authz, and
the reflector's handlers driven with a test double of the gRPC context whose ``auth_context()``
holds what a TLS peer's has (the certificates themselves are the TLS work's; here only the
identity they prove matters). Plaintext sessions (no identity) keep the rules that need none."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from fabric import types
from fabric.control import admission, api, authz, bounds, codec, identity, reflector, reflector_service
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.identity import Identity
from tests.unit.test_planner import CONFIG, E1, E2, W1
from tests.waiting import wait_until_async
from tree import forge

R = api.RejectionReason
NODE_E1 = identity.node("east", "e1")
NODE_E2 = identity.node("east", "e2")

# --------------------------------------------------------------------------------------------
# The pure rules
# --------------------------------------------------------------------------------------------


def test_a_node_certificate_announces_only_its_own_node() -> None:
    assert authz.announcement_refusals(NODE_E1, E1) == []
    other_cluster = dataclasses.replace(E1, cluster="west")
    for ident, ann in [(NODE_E2, E1), (identity.node("west", "e1"), E1), (NODE_E1, other_cluster)]:
        (r,) = authz.announcement_refusals(ident, ann)
        assert r.reason is R.UNAUTHORIZED
        assert f"announcement of node {ann.cluster}/{ann.name} by {ident}" in r.text
        assert f"only its own node ({ident.cluster}/{ident.node})" in r.text


@pytest.mark.parametrize("role", [identity.TREE, identity.SCHEDULER, identity.READER, identity.ADMIN])
def test_only_node_certificates_announce(role: str) -> None:
    (r,) = authz.announcement_refusals(identity.role(role, "x"), E1)
    assert r.reason is R.UNAUTHORIZED
    assert ("may not call SyncNode" if role != identity.READER else "status only") in r.text


def test_a_plaintext_session_is_not_refused_by_identity() -> None:
    assert authz.announcement_refusals(None, E1) == []
    assert all(authz.rpc_refusal(None, rpc) is None for rpc in authz.CALLERS)
    assert authz.publisher_refusal(None, "anything/at-all") is None
    assert authz.metric_label(None) == "insecure"


#: Who may call what: (role, rpcs allowed). The table of the module docstring.
ALLOWED = {
    identity.NODE: {authz.SYNC_NODE, authz.GET_STATUS, authz.WATCH_TOPOLOGY, authz.WATCH_RECORDS,
                    authz.ISSUE_CERTIFICATE},
    identity.TREE: {authz.GET_STATUS, authz.WATCH_TOPOLOGY, authz.WATCH_RECORDS, authz.PUBLISH_RECORDS},
    identity.SCHEDULER: {authz.GET_STATUS, authz.WATCH_TOPOLOGY, authz.WATCH_RECORDS, authz.PUBLISH_RECORDS},
    identity.ADMIN: {authz.GET_STATUS, authz.WATCH_TOPOLOGY, authz.WATCH_RECORDS, authz.PUBLISH_RECORDS},
    identity.READER: {authz.GET_STATUS},
    identity.MCS: {authz.GET_STATUS, authz.WATCH_RECORDS},
    identity.BOOTSTRAP: {authz.ISSUE_CERTIFICATE},
    identity.RELAY: {authz.RELAY_NODES},
}


@pytest.mark.parametrize("role", sorted(identity.ROLES))
def test_each_role_calls_only_its_rpcs(role: str) -> None:
    ident = identity.node("c1", "n1") if role == identity.NODE else identity.role(role, "c1")
    allowed = {rpc for rpc in authz.CALLERS if authz.rpc_refusal(ident, rpc) is None}
    assert allowed == ALLOWED[role]
    for rpc in set(authz.CALLERS) - allowed:
        why = authz.rpc_refusal(ident, rpc)
        assert why is not None and str(ident) in why and rpc in why


def test_a_publisher_publishes_as_its_certificate() -> None:
    tree = identity.role("tree", "root-a")
    assert authz.publisher_refusal(tree, "tree/root-a") is None
    assert authz.publisher_refusal(tree, "") is None  # empty: the certificate's
    why = authz.publisher_refusal(tree, "tree/root-b")
    assert why is not None and "declares identity 'tree/root-b'" in why and "tree/root-a" in why
    why = authz.publisher_refusal(NODE_E1, "node/east/e1")
    assert why is not None and "may not call PublishRecords" in why


@pytest.mark.parametrize(
    ("publisher", "kind", "allowed"),
    [
        ("tree/root-a", forge.RECORD_KIND, True),  # the tree's one kind today
        ("tree/root-a", "scheduler.kosmos.io/quota", False),
        ("tree/root-a", "tree.kosmos.io.evil/x", False),  # the group, not a prefix of its name
        ("scheduler/s1", "scheduler.kosmos.io/quota", True),
        ("scheduler/s1", forge.RECORD_KIND, False),
        ("admin/ops", "anything.example/x", True),
        ("reader/ops", forge.RECORD_KIND, False),
        ("node/east/e1", forge.RECORD_KIND, False),
    ],
)
def test_a_role_publishes_only_its_kinds(publisher: str, kind: str, allowed: bool) -> None:
    why = authz.kind_refusal(publisher, kind)
    assert (why is None) == allowed, why
    if not allowed:
        assert why is not None and repr(publisher.partition("/")[0]) in why


def test_once_log_logs_each_identity_and_reason_once_and_stays_bounded() -> None:
    log = bounds.OnceLog(limit=2)
    assert log.first("node/c/a", R.UNAUTHORIZED)
    assert not log.first("node/c/a", R.UNAUTHORIZED)
    assert log.first("node/c/a", R.POD_CIDR)  # another reason
    assert log.first("node/c/b", R.UNAUTHORIZED)  # past the limit: forgets, logs again later
    assert log.first("node/c/a", R.UNAUTHORIZED)


# --------------------------------------------------------------------------------------------
# The handlers, with a TLS peer's auth context
# --------------------------------------------------------------------------------------------


class _Context:
    """The part of grpc.aio.ServicerContext the handlers use; ``auth_context`` as a TLS peer's
    (``ident``), a plaintext one's (None), or a TLS peer's without an identity (``uris=[]``)."""

    def __init__(self, ident: Identity | None, uris: Sequence[bytes] | None = None) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._auth: Mapping[str, Sequence[bytes]] = {}
        if ident is not None or uris is not None:
            sans = [ident.uri.encode()] if ident is not None else list(uris or ())
            self._auth = {"transport_security_type": [b"ssl"], "x509_subject_alternative_name": sans,
                          "x509_common_name": [b"stray"]}  # fmt: skip

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return self._auth

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def _reflector() -> tuple[reflector.Reflector, CollectorRegistry]:
    # Agents here send no keepalives: a long interval keeps their sessions up on a slow machine.
    refl = reflector.Reflector(CONFIG, grace_period=5, keepalive_interval=30, startup_hold=0)
    reg = CollectorRegistry()
    reg.register(refl.collector())
    return refl, reg


def _count(reg: CollectorRegistry, reason: str, ident: str) -> float | None:
    return reg.get_sample_value("fabric_reflector_rejections_total", {"reason": reason, "identity": ident})


class _Agent:
    """One SyncNode stream: announces ``ann``, then stays until :meth:`leave`; the reflector's
    messages collect in ``got``."""

    def __init__(self, refl: reflector.Reflector, ann: types.NodeAnnouncement, ctx: _Context) -> None:
        self.got: list[pb.SyncNodeResponse] = []
        self.ctx = ctx
        self._gone = asyncio.Event()

        async def requests() -> AsyncIterator[pb.SyncNodeRequest]:
            yield pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(ann)))
            await self._gone.wait()

        async def run() -> None:
            async for msg in refl.sync_node(requests(), ctx):  # type: ignore[arg-type]
                self.got.append(msg)

        self.task = asyncio.create_task(run())

    def kinds(self) -> list[str]:
        return [m.WhichOneof("message") or "" for m in self.got]

    async def synced(self) -> None:
        await wait_until_async(lambda: "end_of_snapshot" in self.kinds(), 5, "no END_OF_SNAPSHOT")

    async def refused(self) -> tuple[api.RejectionReason, ...]:
        """The classes of the Rejected it got (the stream then ends)."""
        await asyncio.wait_for(self.task, 5)
        assert self.kinds() == ["rejected"], self.kinds()
        return codec.rejection_reasons_from_pb(self.got[0].rejected.codes)

    async def leave(self) -> None:
        self._gone.set()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def test_a_certificate_announcing_another_node_is_refused_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        refl, reg = _reflector()
        caplog.set_level(logging.INFO, logger="fabric.control.reflector")
        for _ in range(3):  # an agent retrying
            assert await _Agent(refl, E1, _Context(NODE_E2)).refused() == (R.UNAUTHORIZED,)
        assert _count(reg, "unauthorized", "node/east/e2") == 3
        assert [r for r in caplog.records if "rejected" in r.getMessage()].__len__() == 1
        (rej,) = refl.status().rejections
        assert rej.reasons == (R.UNAUTHORIZED,) and "only its own node (east/e2)" in rej.reason
        assert "node/east/e2" in rej.source
        assert not refl._nodes  # nothing joined

    asyncio.run(body())


def test_a_plaintext_refusal_is_logged_every_time_as_before(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        refl, reg = _reflector()
        caplog.set_level(logging.INFO, logger="fabric.control.reflector")
        bad = dataclasses.replace(E1, pod_cidrs=("10.20.9.0/24",))
        for _ in range(2):
            assert await _Agent(refl, bad, _Context(None)).refused() == (R.POD_CIDR,)
        assert _count(reg, "pod_cidr", "insecure") == 2
        assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 2

    asyncio.run(body())


def test_a_tls_peer_without_an_identity_and_a_non_node_role_cannot_announce() -> None:
    async def body() -> None:
        refl, reg = _reflector()
        assert await _Agent(refl, E1, _Context(None, uris=[])).refused() == (R.UNAUTHORIZED,)
        assert _count(reg, "unauthorized", "unidentified") == 1
        assert await _Agent(refl, E1, _Context(identity.role("admin", "ops"))).refused() == (R.UNAUTHORIZED,)
        assert _count(reg, "unauthorized", "admin/ops") == 1
        assert not refl._nodes

    asyncio.run(body())


def test_hijack_attempts_change_no_other_agents_plan() -> None:
    """A certificate of east/e2 tries: a live node's name (east/e1), a pod CIDR of another
    cluster (west's), e1's pod CIDR. Each is refused with its class, and e1 and w1 keep their
    sessions, plans and versions; nothing is sent to them but keepalives. (That no agent's
    kernel state changes is shown in the lab once the TLS work is merged.)"""

    async def body() -> None:
        refl, reg = _reflector()
        e1, w1 = _Agent(refl, E1, _Context(NODE_E1)), _Agent(refl, W1, _Context(identity.node("west", "w1")))
        await e1.synced()
        await w1.synced()
        await wait_until_async(lambda: refl._flush_handle is None, 5, "the joins to be flushed")
        sessions = {k: rec.session for k, rec in refl._nodes.items()}
        plans = {k: refl._planner.state(k) for k in refl._nodes}
        versions = {k: rec.planned_version for k, rec in refl._nodes.items()}
        generation = refl.generation
        seen = {id(a): len(a.got) for a in (e1, w1)}
        attempts = [
            (E1, (R.UNAUTHORIZED,)),  # e1 is live: its name is not e2's to take
            # west's pod CIDR: outside east's, and w1's.
            (dataclasses.replace(E2, pod_cidrs=W1.pod_cidrs[:1]), (R.POD_CIDR, R.POD_CIDR_CONFLICT)),
            (dataclasses.replace(E2, pod_cidrs=E1.pod_cidrs), (R.POD_CIDR_CONFLICT,)),  # first holder wins
        ]
        for ann, want in attempts:
            assert await _Agent(refl, ann, _Context(NODE_E2)).refused() == want
        await asyncio.sleep(0)  # a flush would have been scheduled by now (none is)
        assert refl._flush_handle is None and refl.generation == generation
        assert {k: rec.session for k, rec in refl._nodes.items()} == sessions
        assert all(s is not None and not s.closed for s in sessions.values())
        assert {k: refl._planner.state(k) for k in refl._nodes} == plans
        assert {k: rec.planned_version for k, rec in refl._nodes.items()} == versions
        for a in (e1, w1):
            assert set(a.kinds()[seen[id(a)] :]) <= {"keepalive"}
        (last,) = [r for r in refl.status().rejections if r.source.startswith("announcement east/e2 ")]
        assert last.reasons == (R.POD_CIDR_CONFLICT,)
        assert "overlaps pod CIDR 10.10.1.0/24 of node east/e1" in last.reason
        assert _count(reg, "pod_cidr_conflict", "node/east/e2") == 2
        assert _count(reg, "unauthorized", "node/east/e2") == 1
        # The right certificate with a valid announcement still joins.
        e2 = _Agent(refl, E2, _Context(NODE_E2))
        await e2.synced()
        for a in (e1, w1, e2):
            await a.leave()

    asyncio.run(body())


def test_an_unjoined_cluster_is_dropped_and_refused_at_its_next_connect() -> None:
    async def body() -> None:
        refl, reg = _reflector()
        west = identity.node("west", "w1")
        w1 = _Agent(refl, W1, _Context(west))
        await w1.synced()
        refl.set_config(dataclasses.replace(CONFIG, clusters=tuple(c for c in CONFIG.clusters if c.name != "west")))
        await asyncio.wait_for(w1.task, 5)
        assert "rejected" in w1.kinds()
        assert _count(reg, "unknown_cluster", "node/west/w1") == 1
        assert await _Agent(refl, W1, _Context(west)).refused() == (R.UNKNOWN_CLUSTER,)
        assert _count(reg, "unknown_cluster", "node/west/w1") == 2
        assert not refl._nodes

    asyncio.run(body())


# -- the other RPCs ----------------------------------------------------------------------------


async def _first(stream: AsyncIterator[Any]) -> list[Any]:
    """The first message of a stream (or none, when it ends at once); then closes it."""
    it = aiter(stream)
    try:
        return [await asyncio.wait_for(anext(it), 5)]
    except StopAsyncIteration:
        return []
    finally:
        await it.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("ident", "code"),
    [
        (identity.role("reader", "ops"), grpc.StatusCode.PERMISSION_DENIED),
        (identity.role("bootstrap", "east"), grpc.StatusCode.PERMISSION_DENIED),
        (None, None),  # plaintext: as before
        (identity.role("scheduler", "s1"), None),
        (NODE_E1, None),
    ],
)
def test_watches_are_for_agents_and_add_ons_not_readers(ident: Identity | None, code: grpc.StatusCode | None) -> None:
    async def body() -> None:
        refl, reg = _reflector()
        svc = reflector_service.Servicer(refl)
        for call in (
            lambda ctx: svc.WatchTopology(pb.WatchTopologyRequest(), ctx),
            lambda ctx: svc.WatchRecords(pb.WatchRecordsRequest(kind=""), ctx),
        ):
            ctx = _Context(ident)
            got = await _first(call(ctx))
            assert ctx.code == code
            assert (got == []) == (code is not None)  # refused: nothing sent; else its snapshot
            if code is not None:
                assert "status only" in ctx.details or "may not call" in ctx.details
        if code is not None:
            assert _count(reg, "unauthorized", authz.metric_label(ident)) == 2

    asyncio.run(body())


def test_a_certificate_without_an_identity_is_unauthenticated() -> None:
    async def body() -> None:
        refl, reg = _reflector()
        ctx = _Context(None, uris=[])
        assert await _first(reflector_service.Servicer(refl).WatchTopology(pb.WatchTopologyRequest(), ctx)) == []
        assert ctx.code == grpc.StatusCode.UNAUTHENTICATED
        assert "stray: expected exactly one kosmos-fabric: URI" in ctx.details
        assert _count(reg, "unauthorized", "unidentified") == 1

    asyncio.run(body())


@pytest.mark.parametrize(
    ("ident", "allowed"), [(identity.role("reader", "ops"), True), (identity.role("bootstrap", "east"), False)]
)
def test_status_is_for_every_role_but_bootstrap(ident: Identity, allowed: bool) -> None:
    async def body() -> None:
        refl, reg = _reflector()
        ctx = _Context(ident)
        out = await reflector_service.Servicer(refl).GetStatus(pb.GetStatusRequest(), ctx)
        assert (ctx.code is None) == allowed
        assert (out.epoch == refl.epoch) == allowed
        assert _count(reg, "unauthorized", str(ident)) == (None if allowed else 1)

    asyncio.run(body())


class _Publisher:
    """A PublishRecords stream: ``send`` a request, get its answer."""

    def __init__(self, refl: reflector.Reflector, ctx: _Context, declared: str) -> None:
        self.ctx = ctx
        self._out: asyncio.Queue[pb.PublishRecordsRequest | None] = asyncio.Queue()
        self._out.put_nowait(pb.PublishRecordsRequest(open=pb.PublishOpen(identity=declared)))

        async def requests() -> AsyncIterator[pb.PublishRecordsRequest]:
            while (req := await self._out.get()) is not None:
                yield req

        self.stream = aiter(reflector_service.Servicer(refl).PublishRecords(requests(), ctx))  # type: ignore[arg-type]

    async def next(self) -> pb.PublishRecordsResponse | None:
        try:
            return await asyncio.wait_for(anext(self.stream), 5)
        except StopAsyncIteration:
            return None

    async def put(self, kind: str) -> pb.PublishRecordsResponse | None:
        self._out.put_nowait(pb.PublishRecordsRequest(put=pb.Record(kind=kind, name="n1", version=1, data=b"x")))
        return await self.next()

    async def close(self) -> None:
        self._out.put_nowait(None)
        await self.stream.aclose()  # type: ignore[attr-defined]


def test_a_publisher_is_its_certificate_and_publishes_only_its_kinds() -> None:
    async def body() -> None:
        refl, reg = _reflector()
        tree = identity.role("tree", "root-a")
        # Another identity declared: refused before anything is held.
        other = _Publisher(refl, _Context(tree), "tree/root-b")
        assert await other.next() is None
        assert other.ctx.code == grpc.StatusCode.PERMISSION_DENIED
        assert "declares identity 'tree/root-b'" in other.ctx.details
        assert _count(reg, "unauthorized", "tree/root-a") == 1
        # A reader may not publish at all.
        reader = _Publisher(refl, _Context(identity.role("reader", "ops")), "reader/ops")
        assert await reader.next() is None and reader.ctx.code == grpc.StatusCode.PERMISSION_DENIED
        # Declared nothing: publishes as the certificate; its own kind yes, the scheduler's no.
        pub = _Publisher(refl, _Context(tree), "")
        opened = await pub.next()
        assert opened is not None and opened.opened.identity == "tree/root-a"
        ok = await pub.put(forge.RECORD_KIND)
        assert ok is not None and ok.ack.revision == 1, ok
        no = await pub.put("scheduler.kosmos.io/quota")
        assert no is not None and codec.record_refusal_from_pb(no.ack.refused) is api.RecordRefusalReason.POLICY
        assert "role 'tree' publishes only kinds tree.kosmos.io/*" in no.ack.reason
        assert _count(reg, "unauthorized", "tree/root-a") == 2  # the declaration, then this put
        assert any("may not publish kind 'scheduler.kosmos.io/quota'" in r.reason for r in refl.status().rejections)
        await pub.close()
        # Plaintext: declared, unproven, any kind (as before; the extra policy hook still applies).
        plain = _Publisher(refl, _Context(None), "tree/root-c")
        opened = await plain.next()
        assert opened is not None and opened.opened.identity == "tree/root-c"
        ok = await plain.put("scheduler.kosmos.io/quota")
        assert ok is not None and ok.ack.revision == 2, ok
        await plain.close()
        refl.records.close_all("test over", grpc.StatusCode.UNAVAILABLE)

    asyncio.run(body())


def test_the_rejection_metric_has_every_class_for_plaintext_from_the_start() -> None:
    _refl, reg = _reflector()
    for cls in R:
        want = None if cls is R.UNSPECIFIED else 0.0
        assert _count(reg, cls.value, "insecure") == want
    assert admission.Refusal(R.UNAUTHORIZED, "x").reason.value == "unauthorized"


def test_the_identity_label_of_refusals_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A leaked bootstrap credential of east mints a certificate for any node name of east:
    refused identities must not grow the metric's series without end. The first ``limit`` keep
    their label, later ones count as "other"; plaintext and unidentified keep theirs; the log
    still names each identity once."""
    assert authz.MAX_IDENTITY_LABELS == 1000  # the documented default

    async def body() -> None:
        refl, reg = _reflector()
        refl._rejection_labels = authz.IdentityLabels(limit=3)
        caplog.set_level(logging.INFO, logger="fabric.control.reflector")
        minted = [identity.node("east", f"n{i}") for i in range(10)]
        for ident in [*minted, *minted]:  # each announces east/e1: not its own node
            assert await _Agent(refl, E1, _Context(ident)).refused() == (R.UNAUTHORIZED,)
        assert await _Agent(refl, E1, _Context(None, uris=[])).refused() == (R.UNAUTHORIZED,)
        samples = [s for m in reg.collect() if m.name == "fabric_reflector_rejections"
                   for s in m.samples if s.name == "fabric_reflector_rejections_total" and s.value]  # fmt: skip
        by_identity = {s.labels["identity"]: s.value for s in samples}
        assert by_identity == {"node/east/n0": 2, "node/east/n1": 2, "node/east/n2": 2, "other": 14,
                               "unidentified": 1}  # fmt: skip
        assert len(refl._rejections_by) == 5  # the table behind the metric is bounded too
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected")]
        assert len(logged) == 11 and any("node/east/n9" in m for m in logged)

    asyncio.run(body())


def test_identity_labels_keep_the_first_and_the_fixed_ones() -> None:
    labels = authz.IdentityLabels(limit=2)
    assert [labels(x) for x in ("node/a/1", "node/a/2", "node/a/3", "node/a/1", "insecure", "unidentified")] == [
        "node/a/1", "node/a/2", "other", "node/a/1", "insecure", "unidentified"]  # fmt: skip
