"""``fabric-tool bench control-tls`` (mutual TLS on vs off): the certificates it issues are the ones
the reflector admits, the rounds alternate which variant runs first, the figures are oriented as
every benchmark's (baseline / ours for times, so the issue's aim reads "ratio >= 0.8"), the
certificate-exchange hook, and a tiny end-to-end run over real TLS channels."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import pytest

from fabric.control import authz, identity, pki, tls
from tools.bench import common as bc
from tools.bench import suite as bench
from tools.bench.control import agents, tlsmat
from tools.bench.control import tls_bench as tb
from tools.bench.control.driver import Phase
from tools.bench.control.shapes import JOINER, Shape

pytestmark = pytest.mark.unit


def _read(d: Path) -> tuple[bytes, bytes]:
    return (d / pki.CERT_FILE).read_bytes(), (d / pki.CA_FILE).read_bytes()


def test_each_agent_gets_a_node_certificate_for_exactly_its_own_announcement(tmp_path: Path) -> None:
    shape = Shape("gateway", 250)
    indexes = [0, 1, 249, JOINER]
    issued = tlsmat.issue(tmp_path, shape, indexes)
    assert issued.certificates == len(indexes) + 2  # plus the server's and the reader's
    assert issued.sign_s >= 0 and issued.write_s >= 0 and "6 certificates" in issued.note()
    idents = {}
    for i in indexes:
        d = tlsmat.agent_dir(tmp_path, i)
        cert, ca = _read(d)
        assert pki.explain(cert, ca, "client") is None
        tls.TLSDir(d).read()  # key and certificate match
        who = pki.certificate_identity(pki.load_cert(cert))
        ann = shape.announcement(i)
        assert who == identity.node(ann.cluster, ann.name)
        assert authz.announcement_refusals(who, ann) == []
        idents[i] = who
    # One agent's certificate may not announce another's node: each agent really needs its own.
    assert authz.announcement_refusals(idents[0], shape.announcement(1))
    server_cert, ca = _read(tmp_path / tlsmat.SERVER_DIR)
    assert pki.explain(server_cert, ca, "server") is None
    reader_cert, _ = _read(tmp_path / tlsmat.READER_DIR)
    reader = pki.certificate_identity(pki.load_cert(reader_cert))
    assert reader.role == identity.READER
    assert authz.rpc_refusal(reader, authz.GET_STATUS) is None


def test_the_certificate_exchange_hook_gives_the_pre_issued_directory_or_plaintext(tmp_path: Path) -> None:
    assert asyncio.run(agents.node_credentials(None, 3)) is None
    got = asyncio.run(agents.node_credentials(tmp_path, 3))
    assert got == tls.TLSDir(tlsmat.agent_dir(tmp_path, 3))


def test_the_bootstrap_material_is_a_bootstrap_certificate_of_the_agents_cluster_and_a_ca_dir(tmp_path: Path) -> None:
    shape = Shape("gateway", 20)
    issued = tlsmat.issue(tmp_path, shape, [0, JOINER], bootstrap=[JOINER])
    assert issued.certificates == 5
    cert, ca = _read(tlsmat.bootstrap_dir(tmp_path, JOINER))
    assert pki.explain(cert, ca, "client") is None
    who = pki.certificate_identity(pki.load_cert(cert))
    assert who == identity.role(identity.BOOTSTRAP, shape.announcement(JOINER).cluster)
    # A bootstrap certificate announces nothing: only the exchanged node certificate does.
    assert authz.announcement_refusals(who, shape.announcement(JOINER))
    assert pki.CA.load(tmp_path / tlsmat.CA_DIR).pem == ca


def test_rounds_alternate_which_variant_runs_first() -> None:
    assert [tb.order(r) for r in range(4)] == [(False, True), (True, False), (False, True), (True, False)]
    assert all(sorted(tb.order(r)) == [False, True] for r in range(5))


def _phase(join_ms: list[float], cpu: float, start_ms: float) -> Phase:
    return Phase(bringup_s=2.0, bringup_cpu_per_agent_ms=1.0, join_ms=[join_ms], leave_ms=[join_ms], cpu_ms=[cpu],
                 start_to_sync_ms=[start_ms, start_ms + 10], connect_ms=[start_ms / 2])  # fmt: skip


def test_figures_put_tls_as_ours_and_plaintext_as_the_baseline_lower_is_better() -> None:
    shape = Shape("gateway", 1000)
    report = bc.Report()
    tls_phases = [_phase([100.0, 200.0, 250.0], 20.0, 300.0)] * 3
    plain_phases = [_phase([100.0, 150.0, 200.0], 10.0, 150.0)] * 3
    tb.figures(report, shape, tls_phases, plain_phases)
    p99 = report.figures["join_fanout_p99_gateway_n1000"]
    assert p99["median"] == 250.0 and p99["baseline_median"] == 200.0
    assert p99["ratio"] == pytest.approx(0.8)  # plaintext / TLS: higher is better
    assert report.figures["server_cpu_per_change_gateway_n1000"]["ratio"] == pytest.approx(0.5)
    start = report.figures["agent_start_to_in_sync_gateway_n1000"]
    assert (start["median"], start["baseline_median"]) == (305.0, 155.0)  # the median of each round's joins
    assert report.units["bringup_cpu_per_agent_gateway_n1000"] == "ms"
    assert "agent_start_to_in_sync_exchange_gateway_n1000" not in report.figures  # no exchanging joins
    exchanged = [dataclasses.replace(ph, start_to_sync_exchange_ms=[400.0, 420.0]) for ph in tls_phases]
    tb.figures(report, shape, exchanged, plain_phases)
    ex = report.figures["agent_start_to_in_sync_exchange_gateway_n1000"]
    assert (ex["median"], ex["baseline_median"]) == (410.0, 155.0)  # against the plaintext start
    assert "0.80, met" in tb.aim_note(report, shape)
    worse = bc.Report()
    tb.figures(worse, shape, [_phase([100.0, 400.0], 20.0, 300.0)], plain_phases)
    assert "NOT met" in tb.aim_note(worse, shape)


def test_control_tls_tiny_run_over_real_tls_channels(tmp_path: Path) -> None:
    """Ten agents with their own node certificates against a reflector with --tls-dir and --ca-dir,
    and the same without TLS: every figure of both sides has numbers, the joiner's exchanging
    start among them (an agent refused by the reflector's authorization, a refused exchange, or a
    handshake that fails, fails the run)."""
    out = tmp_path / "tls.json"
    assert bench.main(["control-tls", "--tiny", "--repeat", "1", "--n", "10", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())["control-tls"]
    for metric in ("join_fanout_p50", "join_fanout_p99", "server_cpu_per_change", "bringup",
                   "agent_start_to_in_sync", "agent_connect", "agent_start_to_in_sync_exchange"):  # fmt: skip
        fig = doc[metric + "_gateway_n10"]
        assert fig["median"] > 0 and fig["baseline_median"] > 0, metric
        assert fig["ratio"] is not None and math.isfinite(fig["ratio"]), metric
    notes = "\n".join(doc["notes"])
    assert "14 certificates" in notes and "round 1/1 (plaintext first" in notes
    assert "with the certificate exchange)" in notes and "NOT measured" not in notes
