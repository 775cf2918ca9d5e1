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
4. The certificate metrics, scraped: an agent's expiry is its certificate's notAfter and its
   requests are counted; the reflector's expiry is its server certificate's.

Revocation ("``unjoin`` revokes: that cluster's agents are refused at their next connect") is
shown with the real ``fabric-tool unjoin`` of a ``kubernetes: true`` lab, in
tests/lab/test_install_e2e.py (step 5): a plain lab's clusters come from its topology file,
which ``unjoin`` does not change. The helpers both use are in tests/lab/secutil.py.

Steps run in file order against one lab (module fixture).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from fabric import types
from fabric.control import bootstrap, client, identity, pki, tls
from tests.lab import secutil
from tests.lab.conftest import REPO, RESYNC_S, Lab, lab_running, new_lab_name
from tests.lab.test_observability_e2e import metric, scrape
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
    return secutil.reflector_target(_state(lab))


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
        reasons = secutil.announce_once(target, rogue_tls, ann)
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


def test_03_renewed_mid_session_a_10ms_ping_loses_nothing(slab: Lab) -> None:
    st = _state(slab)
    dirs = {key: labpki.node_dir(st, *key.split("/")) for key in ("east/e1", "west/w1")}
    logs = {key: st.node(key).agent.log for key in dirs}
    serials = {key: {_serial(d)} for key, d in dirs.items()}
    sessions = {key: secutil.sessions_established(log) for key, log in logs.items()}
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
    assert {key: secutil.sessions_established(log) for key, log in logs.items()} == sessions


def test_04_certificate_metrics_on_the_live_lab(slab: Lab) -> None:
    """Agents' and the reflector's certificate metrics as ``lab metrics`` scrapes them: the
    expiry is the notAfter of the certificate file in use, the agent counts its requests
    (its bootstrap exchange, then renewals every ~2/3 of 15 s)."""
    st = _state(slab)
    e1_dir = labpki.node_dir(st, "east", "e1")
    refl_dir = labpki.pki_root(st) / "reflector"

    def not_after(d: Path) -> float:
        cert = x509.load_pem_x509_certificate((d / pki.CERT_FILE).read_bytes())
        return cert.not_valid_after.replace(tzinfo=datetime.UTC).timestamp()

    def agent_expiry_matches() -> bool:  # a renewal may land between the scrape and the read
        return metric(scrape(slab, "east/e1"), "fabric_agent_certificate_expiry_timestamp_seconds") == not_after(e1_dir)

    wait_until(agent_expiry_matches, 30, "e1's expiry metric to be its certificate's notAfter")
    samples = scrape(slab, "east/e1")
    assert metric(samples, "fabric_agent_certificate_renewals_total", result="ok") >= 1, samples
    assert metric(samples, "fabric_agent_certificate_renewals_total", result="error") == 0, samples
    reflector = scrape(slab, "reflector")
    assert metric(reflector, "fabric_reflector_certificate_expiry_timestamp_seconds") == not_after(refl_dir)
