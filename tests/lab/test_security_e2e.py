"""Issue 20's acceptance on a real, secure-by-default lab (examples/lab.yaml: east e1 e2, west w1 w2).

The lab runs the real steps (tools/lab/labpki.py): a CA at install, a bootstrap credential per
cluster at join, agents exchanging it for their own certificates, which the reflector signs
with a short lifetime here (``--node-cert-lifetime``) so they renew during the tests.

1. A process holding a valid certificate of cluster east (got with east's bootstrap credential,
   as a leaked credential would give it) announcing west's pod CIDR, east's live node e1, or
   e1's pod CIDR is rejected, and no node's kernel state changes (routes, neighbours and FDB of
   every node namespace, read from the kernel before and after).
2. No certificate, an expired one, one of another CA: refused.
3. Certificates renewed mid-session: a 10 ms ping between clusters loses no packet, and the
   agents' sessions are not re-established.
4. Revocation: west taken out of the reflector's configuration (what ``unjoin`` does to it; a
   plain lab's clusters come from its topology file, so the test rewrites the file the lab's
   reflector reads and restarts it, and removes west's bootstrap credential as ``unjoin``
   does): west's sessions end, a valid certificate of w1 is refused at its next connect and
   gets no new certificate, and neither does the bootstrap credential.

Steps run in file order against one lab (module fixture).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from fabric import types
from fabric.control import bootstrap, client, identity, pki, tls
from tests.lab.conftest import REPO, RESYNC_S, Lab, lab_running, new_lab_name
from tests.waiting import wait_until
from tools.lab import labpki
from tools.lab.state import load_state

LIFETIME_S = 15


@pytest.fixture(scope="module")
def slab() -> Iterator[Lab]:
    up = ("--resync-period", str(RESYNC_S), "--grace-period", "30", "--timeout", "90",
          "--node-cert-lifetime", str(LIFETIME_S))  # fmt: skip
    with lab_running(Lab(new_lab_name(), REPO / "examples" / "lab.yaml"), *up) as running:
        yield running


def _state(lab: Lab) -> Any:
    st = load_state(lab.name)
    assert st is not None
    return st


def _target(lab: Lab) -> str:
    return f"unix:{_state(lab).reflector_socket}"


def kernel(lab: Lab) -> dict[str, Any]:
    """Every node namespace's routes (all tables, both families, but the kernel's own), fabric
    neighbours and FDB, as the kernel reports them."""
    out: dict[str, Any] = {}
    for node in _state(lab).nodes():
        ns = node.netns
        # The kernel's own routes (of addresses; an IPv6 link-local one appears when DAD ends) are
        # left out: what an agent writes is every other route.
        routes = [r for r in (*lab.ipj(ns, "route", "show", "table", "all"),
                              *lab.ipj(ns, "-6", "route", "show", "table", "all")) if r.get("protocol") != "kernel"]
        neigh = [{k: n.get(k) for k in ("dst", "dev", "lladdr")} for n in lab.ipj(ns, "neigh", "show")
                 if str(n.get("dev", "")).startswith("vx-")]  # fmt: skip
        fdb_out = subprocess.run(["bridge", "-n", ns, "-j", "fdb", "show"], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
        fdb = [e for e in json.loads(fdb_out or "[]") if str(e.get("ifname", "")).startswith("vx-")]
        out[node.key] = {
            "routes": sorted(json.dumps({k: v for k, v in r.items() if k not in ("expires", "cache")}, sort_keys=True)
                             for r in routes),
            "neigh": sorted(json.dumps(n, sort_keys=True) for n in neigh),
            "fdb": sorted(json.dumps({k: e.get(k) for k in ("mac", "dst", "ifname")}, sort_keys=True) for e in fdb),
        }
    return out


class _Handler:
    """What a rogue client's session hears."""

    def __init__(self) -> None:
        self.rejected: list[str] = []
        self.snapshots = 0

    async def on_snapshot(self, state: types.NodeState, version: int) -> None:
        self.snapshots += 1

    async def on_delta(self, delta: types.StateDelta, version: int) -> None:
        pass

    async def on_connection(self, connected: bool, reason: str) -> None:
        pass

    async def on_rejected(self, reason: str) -> None:
        self.rejected.append(reason)


def announce_once(target: str, tls_dir: tls.TLSDir, ann: types.NodeAnnouncement) -> list[str]:
    """Run a session announcing ``ann`` until its first rejection; the rejection texts."""
    handler = _Handler()

    async def body() -> None:
        session = client.AgentSession(target, ann, handler, keepalive_interval=1.0, backoff=(0.2, 0.5),
                                      tls_dir=tls_dir)  # fmt: skip
        task = asyncio.create_task(session.run())
        try:
            async with asyncio.timeout(20):
                while not handler.rejected and handler.snapshots == 0:
                    await asyncio.sleep(0.05)
        finally:
            await session.close()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(body())
    assert handler.snapshots == 0, f"{ann.key} was admitted"
    return handler.rejected


def test_01_a_certificate_of_cluster_a_cannot_take_others_traffic(slab: Lab, tmp_path: Path) -> None:
    st = _state(slab)
    target = _target(slab)
    # A valid east certificate, the way a leaked bootstrap credential of east would give it.
    rogue = identity.node("east", "rogue")
    asyncio.run(bootstrap.obtain(target, tls.TLSDir(labpki.bootstrap_path(st, "east")), tmp_path / "rogue", rogue))
    rogue_tls = tls.TLSDir(tmp_path / "rogue")
    e1, w1 = st.node("east/e1"), st.node("west/w1")
    assert e1 is not None and w1 is not None
    wait_until(slab.all_in_sync, 60, "the lab in sync")
    before = kernel(slab)
    attempts = {
        "west's pod CIDR": types.NodeAnnouncement("east", "rogue", "198.18.0.99", tuple(w1.pod_cidrs)),
        "east's live node e1": types.NodeAnnouncement("east", "e1", e1.underlay_ip, tuple(e1.pod_cidrs)),
        "e1's pod CIDR": types.NodeAnnouncement("east", "rogue", "198.18.0.99", tuple(e1.pod_cidrs)),
    }
    for what, ann in attempts.items():
        reasons = announce_once(target, rogue_tls, ann)
        assert reasons, f"{what}: not rejected"
    wait_until(slab.all_in_sync, 60, "the lab in sync")
    after = kernel(slab)
    changed = {(node, table): (sorted(set(before[node][table]) - set(after[node][table])),
                               sorted(set(after[node][table]) - set(before[node][table])))
               for node in before for table in before[node] if before[node][table] != after[node][table]}  # fmt: skip
    assert not changed, f"kernel state changed (gone, new): {changed}"
    assert set(slab.nodes()) == {"east/e1", "east/e2", "west/w1", "west/w2"}
    assert all(n["connected"] for n in slab.nodes().values())


def test_02_no_expired_or_foreign_certificate_is_refused(slab: Lab, tmp_path: Path) -> None:
    st = _state(slab)
    target = _target(slab)
    ca = pki.CA.load(labpki.ca_dir(st))
    reader = identity.role("reader", "test")

    def issued(name: str, signer: pki.CA, now: datetime.datetime | None = None) -> tls.TLSDir:
        key = pki.new_key()
        cert = signer.sign_client(reader, key.public_key(), lifetime=datetime.timedelta(hours=1), now=now)
        pki.write_tls_dir(tmp_path / name, key, cert, ca.cert)
        return tls.TLSDir(tmp_path / name)

    good = issued("good", ca)
    expired = issued("expired", ca, pki.utcnow() - datetime.timedelta(days=2))
    foreign = issued("foreign", pki.make_ca("another CA"))
    assert client.get_status_sync(target, 5.0, good).clusters  # the control: this path works
    for what, d, says in (("no certificate", None, "plaintext"), ("expired", expired, "expired"),
                          ("another CA", foreign, "unknown CA")):  # fmt: skip
        with pytest.raises(client.ReflectorUnavailable) as e:
            client.get_status_sync(target, 5.0, d)
        assert says in str(e.value) or (d is None and "UNAVAILABLE" in str(e.value)), f"{what}: {e.value}"


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate((path / pki.CERT_FILE).read_bytes()).serial_number


def _established(log: str) -> int:
    return len(re.findall(r"session to reflector \S+ established", Path(log).read_text(errors="replace")))


def test_03_renewed_mid_session_a_10ms_ping_loses_nothing(slab: Lab) -> None:
    st = _state(slab)
    dirs = {key: labpki.node_dir(st, *key.split("/")) for key in ("east/e1", "west/w1")}
    logs = {key: st.node(key).agent.log for key in dirs}
    serials = {key: {_serial(d)} for key, d in dirs.items()}
    sessions = {key: _established(log) for key, log in logs.items()}
    count = 3 * LIFETIME_S * 100  # 10 ms apart: long enough for two renewals of each
    dst_ip = slab.pods()["west/w1/p0"]["ip"]
    ping = subprocess.Popen(
        ["ip", "netns", "exec", slab.pods()["east/e1/p0"]["netns"], "ping", "-n", "-q", "-i", "0.01", "-c",
         str(count), "-W", "1", dst_ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def renewed_twice() -> bool:
        for key, d in dirs.items():
            serials[key].add(_serial(d))
        return all(len(s) >= 3 for s in serials.values())

    try:
        wait_until(renewed_twice, 3 * LIFETIME_S, "two renewals of e1's and w1's certificates during the ping",
                   interval=0.2)  # fmt: skip
    finally:
        out, _ = ping.communicate(timeout=3 * LIFETIME_S + 30)
    summary = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert summary is not None, out
    assert summary.group(1) == summary.group(2) == str(count), out
    # The sessions that were up before the renewals were never re-established.
    assert {key: _established(log) for key, log in logs.items()} == sessions


def test_04_a_removed_cluster_is_refused_at_its_next_connect_and_gets_no_certificate(
    slab: Lab, tmp_path: Path
) -> None:
    st = _state(slab)
    target = _target(slab)
    boot_copy = tmp_path / "bootstrap-west"
    shutil.copytree(labpki.bootstrap_path(st, "west"), boot_copy)
    # What unjoin does to the reflector (west leaves its configuration) and to west's credential.
    doc = yaml.safe_load(st.topology_copy.read_text())
    doc["clusters"] = [c for c in doc["clusters"] if c["name"] != "west"]
    st.topology_copy.write_text(yaml.safe_dump(doc, sort_keys=False))
    labpki.remove_bootstrap(st, "west")
    slab.lab("stop-reflector")
    slab.lab("start-reflector", "--no-wait")

    w1 = st.node("west/w1")
    assert w1 is not None

    def west_gone() -> bool:
        return not any(k.startswith("west/") and n.get("connected") for k, n in slab.nodes().items())

    wait_until(west_gone, 60, "no west session after the reflector restarted without west")
    assert all(n["connected"] for k, n in slab.nodes().items() if k.startswith("east/"))
    # A still valid certificate of w1 (the agent's own ones are short-lived here and cannot be
    # renewed any more, so the test issues one as the CA would): its next connect is refused by
    # membership, not by expiry, and it gets no new certificate; nor does the bootstrap credential.
    ca = pki.CA.load(labpki.ca_dir(st))
    key = pki.new_key()
    w1_id = identity.node("west", "w1")
    pki.write_tls_dir(tmp_path / "w1", key, ca.sign_client(w1_id, key.public_key()), ca.cert)
    own = tls.TLSDir(tmp_path / "w1")
    assert bootstrap.problem(own, w1_id) is None
    reasons = announce_once(target, own, types.NodeAnnouncement("west", "w1", w1.underlay_ip, tuple(w1.pod_cidrs)))
    assert reasons and "west" in reasons[0], reasons
    for via in (own, tls.TLSDir(boot_copy)):
        with pytest.raises(client.CertificateRefused) as e:
            asyncio.run(bootstrap.obtain(target, via, tmp_path / "w1-new", w1_id))
        assert "not a member" in e.value.details
