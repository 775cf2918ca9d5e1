"""Rejection reasons: every way the planner or the reflector refuses an announcement has its
class (api.RejectionReason), carried in ``Rejected.codes`` and GetStatus, and used, not the
text, as the label of ``fabric_reflector_rejections_total``."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from fabric import types
from fabric.control import admission, api, codec, reflector
from fabric.control.generated import fabric_pb2 as pb
from tests.unit.test_planner import CONFIG, E1, E2, W1, topo

R = api.RejectionReason
P2P = types.ClusterMode.P2P

#: A cluster whose pod CIDRs are discovered from its nodes (checked against the configuration).
DISC = types.ClusterConfig("disc", P2P, (), ("10.98.0.0/20",), discover_pod_cidrs=True)
DISCOVERY = dataclasses.replace(CONFIG, clusters=(*CONFIG.clusters, DISC))


def _no_p2p(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "SUPPORTED_MODES", (types.ClusterMode.GATEWAY,))


def _one_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "device_mac", lambda key, device: "02:00:00:00:00:01")


CASES: list[Any] = [
    pytest.param(dataclasses.replace(E2, name=""), None, [R.IDENTITY], id="identity"),
    pytest.param(types.NodeAnnouncement("north", "n1", "198.18.0.41", ()), None, [R.UNKNOWN_CLUSTER],
                 id="unknown-cluster"),
    pytest.param(E2, _no_p2p, [R.UNSUPPORTED_MODE], id="unsupported-mode"),
    pytest.param(dataclasses.replace(E2, underlay_ip="198.18.0.300"), None, [R.UNDERLAY], id="underlay-not-ip"),
    pytest.param(dataclasses.replace(E2, underlay_ip="224.0.0.1"), None, [R.UNDERLAY], id="underlay-multicast"),
    pytest.param(dataclasses.replace(E2, extra_underlay_ips=("198.18.0.99",)), None, [R.UNDERLAY],
                 id="underlay-two-of-a-family"),
    pytest.param(dataclasses.replace(E2, underlay_ip="2001:db8::12"), None, [R.UNDERLAY], id="underlay-no-family"),
    # The same underlay address also derives the same overlay address.
    pytest.param(dataclasses.replace(E2, underlay_ip="198.18.0.21"), None, [R.UNDERLAY_CONFLICT, R.OVERLAY_CONFLICT],
                 id="underlay-conflict"),
    pytest.param(dataclasses.replace(E2, underlay_mtu=600), None, [R.MTU], id="mtu"),
    pytest.param(dataclasses.replace(E2, pod_cidrs=("10.10.2.7/24",)), None, [R.POD_CIDR], id="pod-cidr-invalid"),
    pytest.param(dataclasses.replace(E2, pod_cidrs=("10.20.9.0/24",)), None, [R.POD_CIDR], id="pod-cidr-outside"),
    pytest.param(dataclasses.replace(E2, pod_cidrs=("10.10.2.0/24", "10.10.2.0/25")), None, [R.POD_CIDR],
                 id="pod-cidr-own-overlap"),
    pytest.param(types.NodeAnnouncement("disc", "d1", "198.18.0.51", ("10.96.0.0/24",)), None, [R.POD_CIDR],
                 id="pod-cidr-discovered-overlaps-other-cluster"),
    pytest.param(dataclasses.replace(E2, pod_cidrs=("10.10.1.128/25",)), None, [R.POD_CIDR_CONFLICT],
                 id="pod-cidr-conflict"),
    # 10.0.0.0 keeps the host bits 0: the network address of the bridge CIDR 100.64.0.0/10.
    pytest.param(dataclasses.replace(E2, underlay_ip="10.0.0.0"), None, [R.OVERLAY], id="overlay-network-address"),
    # 10.18.0.11 keeps the host bits of e1's 198.18.0.11 in 100.64.0.0/10.
    pytest.param(dataclasses.replace(E2, underlay_ip="10.18.0.11"), None, [R.OVERLAY_CONFLICT],
                 id="overlay-conflict"),
    pytest.param(E2, _one_mac, [R.MAC_CONFLICT, R.MAC_CONFLICT], id="mac-conflict"),  # with e1 and w1
]


@pytest.mark.parametrize(("ann", "patch", "want"), CASES)
def test_each_refusal_has_its_class(
    monkeypatch: pytest.MonkeyPatch,
    ann: types.NodeAnnouncement,
    patch: Callable[[pytest.MonkeyPatch], None] | None,
    want: list[api.RejectionReason],
) -> None:
    if patch is not None:
        patch(monkeypatch)
    t = topo(E1, W1, config=DISCOVERY)
    refusals = admission.announcement_refusals(t, ann)
    assert [r.reason for r in refusals] == want, refusals
    assert [r.text for r in refusals] == admission.validate_announcement(t, ann)


def test_every_class_survives_the_wire_and_an_unknown_one_is_unspecified() -> None:
    for r in R:
        msg = codec.rejected_message(f"because {r.value}", [r])
        assert msg.rejected.reason == f"because {r.value}"
        assert codec.rejection_reasons_from_pb(msg.rejected.codes) == (r,)
        assert pb.Rejected.Reason.Name(msg.rejected.codes[0]) == f"REASON_{r.name}"
    assert codec.rejection_reasons_from_pb([pb.Rejected.REASON_MTU, 999]) == (R.MTU, R.UNSPECIFIED)
    status = api.FabricStatus("e", 1, False, (), rejections=(api.Rejection("s", "a; b", (R.MTU, R.POD_CIDR)),))
    assert codec.status_from_pb(codec.status_to_pb(status)) == status


#: The identity label of refusals on a plaintext session (no certificate).
PLAINTEXT = {"identity": "insecure"}


def _rejections(reg: CollectorRegistry) -> dict[str, float]:
    out = {}
    for cls in R:
        v = reg.get_sample_value("fabric_reflector_rejections_total", {"reason": cls.value, **PLAINTEXT})
        if v is not None:
            out[cls.value] = v
    return out


def _reflector() -> tuple[reflector.Reflector, CollectorRegistry]:
    refl = reflector.Reflector(CONFIG, grace_period=5, keepalive_interval=1, startup_hold=0)
    reg = CollectorRegistry()
    reg.register(refl.collector())
    return refl, reg


def test_reflector_sends_records_and_counts_the_classes() -> None:
    async def body() -> None:
        refl, reg = _reflector()
        zero = {c.value: 0.0 for c in R if c is not R.UNSPECIFIED}
        assert _rejections(reg) == zero  # every class is a series from the start; no "other"
        assert refl._admit(E1, reflector._Session(E1.key, "p1", 0.0)) is None
        # Refusals of three classes in one announcement: each counted, in order.
        bad = dataclasses.replace(E2, underlay_ip="198.18.0.11", pod_cidrs=("10.20.9.0/24",))
        msg = refl._admit(bad, reflector._Session(bad.key, "p2", 0.0))
        assert msg is not None
        want = (R.UNDERLAY_CONFLICT, R.POD_CIDR, R.OVERLAY_CONFLICT)
        assert codec.rejection_reasons_from_pb(msg.rejected.codes) == want
        assert msg.rejected.reason == "; ".join(admission.validate_announcement(refl._pending, bad))
        (rej,) = refl.status().rejections
        assert rej.reasons == want and rej.reason == msg.rejected.reason
        assert _rejections(reg) == zero | {"underlay_conflict": 1.0, "pod_cidr": 1.0, "overlay_conflict": 1.0}

    asyncio.run(body())


class _Context:
    """The part of grpc.aio.ServicerContext that sync_node uses."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # plaintext

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def test_a_session_not_starting_with_an_announcement_is_a_protocol_refusal() -> None:
    async def body() -> None:
        refl, reg = _reflector()

        async def requests() -> AsyncIterator[pb.SyncNodeRequest]:
            yield pb.SyncNodeRequest(keepalive=codec.keepalive_message(1))

        out = [m async for m in refl.sync_node(requests(), _Context())]  # type: ignore[arg-type]
        assert [m.WhichOneof("message") for m in out] == ["rejected"]
        assert codec.rejection_reasons_from_pb(out[0].rejected.codes) == (R.PROTOCOL,)
        assert "first message must be an announcement" in out[0].rejected.reason
        assert reg.get_sample_value("fabric_reflector_rejections_total", {"reason": "protocol", **PLAINTEXT}) == 1

    asyncio.run(body())


def test_a_node_dropped_by_a_new_configuration_is_told_why() -> None:
    async def body() -> None:
        refl, reg = _reflector()
        session = reflector._Session(W1.key, "p1", 0.0)
        assert refl._admit(W1, session) is None
        refl.set_config(dataclasses.replace(CONFIG, clusters=tuple(c for c in CONFIG.clusters if c.name != "west")))
        sent = []
        while not session.queue.empty():
            sent.append(session.queue.get_nowait())
        rejected = [m for m in sent if isinstance(m, pb.SyncNodeResponse) and m.WhichOneof("message") == "rejected"]
        assert [codec.rejection_reasons_from_pb(m.rejected.codes) for m in rejected] == [(R.UNKNOWN_CLUSTER,)]
        labels = {"reason": "unknown_cluster", **PLAINTEXT}
        assert reg.get_sample_value("fabric_reflector_rejections_total", labels) == 1

    asyncio.run(body())


def test_rejection_classes_serialise_as_their_label() -> None:
    """``fabric-tool status --json`` dumps the status with json: a class is its metric label."""
    import json

    from tools.cli import status_json

    rej = api.Rejection("announcement east/e9", "bad", reasons=(api.RejectionReason.OVERLAY_CONFLICT,))
    status = api.FabricStatus("epoch", 1, False, (), rejections=(rej,))
    assert json.loads(json.dumps(status_json(status)))["rejections"][0]["reasons"] == ["overlay_conflict"]
