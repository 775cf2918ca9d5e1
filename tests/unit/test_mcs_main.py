"""kosmos-mcs: its command line (--help, the flags' errors) and the running command against
emulated members: imports written, the clusterset DNS answering over UDP and TCP on 127.0.0.1
with the importer's own cluster IP, /metrics, and a clean exit on SIGTERM."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from scapy.layers.dns import DNS, DNSQR

from kubeemu.runner import ServerThread
from mcs import kube as mk
from mcs import main as mm
from scheduler.kube import Api
from tests.unit.test_mcs_controller import _path, _serve
from tests.unit.test_mcs_kube import install_mcs_crds
from tests.waiting import wait_until


def test_help_shows_examples_and_the_dns_choice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        mm.parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("examples:", "--member east=", "--dns-listen NAME=HOST:PORT", "kosmos.io/auto-create-mcs",
                 "mcs/<name>", "--reflector", "--leader-elect", "--auto-export-namespace-prefix", "--metrics-port"):
        assert text in out, text


@pytest.mark.parametrize(("argv", "message"), [
    (["--member", "east"], "'east' is not NAME=KUBECONFIG"),
    (["--member", "East=x"], "'East' is not a cluster name"),
    (["--member", "a=x", "--dns-listen", "a=nohost"], "'a=nohost' is not [NAME=]HOST:PORT"),
    (["--member", "a=x", "--global-cidr", "a=10.0.0.0/8"], "is not NAME:LOCAL=GLOBAL"),
    (["--member", "a=x", "--global-cidr", "a:10.0.0.0/16=172.20.0.0/24"],
     "--global-cidr 'a:10.0.0.0/16=172.20.0.0/24'"),
])
def test_bad_flags_are_refused_naming_the_value(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        mm.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    ([], "no member clusters"),
    (["--member", "a=http://127.0.0.1:1", "--member", "a=http://127.0.0.1:2"], "named twice: a"),
    (["--member", "a=http://127.0.0.1:1", "--member", "b=http://127.0.0.1:2", "--dns-listen", "127.0.0.1:53"],
     "which member does it answer for?"),
    (["--member", "a=http://127.0.0.1:1", "--dns-listen", "c=127.0.0.1:53"], "'c' is not a member"),
    (["--member", "a=http://127.0.0.1:1", "--global-cidr", "b:10.0.0.0/16=172.20.0.0/16"],
     "--global-cidr b: not a member"),
    (["--member", "a=/nonexistent/kubeconfig"], "--member a=/nonexistent/kubeconfig: cannot read the kubeconfig"),
])
def test_unusable_settings_are_refused_naming_the_value(argv: list[str], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = mm.main(["--master", "http://127.0.0.1:1", "--leader-elect=false", *argv])
    assert code in (1, 2)
    assert message in capsys.readouterr().err


def test_the_collector_runs_less_often_once_started() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, *before[1:])
        assert mm.main(["--member", "a=http://127.0.0.1:1", "--log-level", "nonsense"]) == 2
        assert gc.get_threshold()[0] == mm.GC_THRESHOLD0 > 700
    finally:
        gc.set_threshold(*before)


def test_member_and_dns_specs() -> None:
    assert mm.member_spec("east=/k/c") == mm.MemberSpec("east", "/k/c")
    assert mm.member_spec("w=http://h:1") == mm.MemberSpec("w", "http://h:1")
    assert mm.dns_spec("east=127.0.0.1:53") == ("east", "127.0.0.1", 53)
    assert mm.dns_spec("[::1]:5353") == ("", "::1", 5353)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u.bind(("127.0.0.1", port))
        return int(port)


def _query(name: str) -> bytes:
    return bytes(DNS(id=7, rd=1, qd=DNSQR(qname=name, qtype="A")))


def _udp(port: int, name: str) -> DNS:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(_query(name), ("127.0.0.1", port))
        return DNS(s.recv(4096))


def _tcp(port: int, name: str) -> DNS:
    q = _query(name)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("!H", len(q)) + q)
        head = s.recv(2)
        (n,) = struct.unpack("!H", head)
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
        return DNS(data)


@pytest.fixture
def two() -> Iterator[dict[str, Api]]:
    with contextlib.ExitStack() as stack:
        apis = {}
        for c in ("east", "west"):
            s = stack.enter_context(ServerThread(name=f"mcs-main-{c}", bookmark_interval=0.3))
            api = Api(s.url)
            install_mcs_crds(api)
            api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
            apis[c] = api
        yield apis


LEASE = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kosmos-mcs"


@pytest.mark.parametrize("elect", [False, True])
def test_the_command_imports_answers_dns_and_exits_on_sigterm(two: dict[str, Api], elect: bool) -> None:
    dns_port, metrics_port = _free_port(), _free_port()
    election = (["--leader-elect-lease-duration", "3", "--leader-elect-renew-deadline", "2",
                 "--leader-elect-retry-period", "0.5", "--identity", "mcs-test"] if elect else ["--leader-elect=false"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcs.main", "--master", two["east"].host, *election,
         "--host-member", "east", "--member", f"west={two['west'].host}", "--resync-period", "1",
         "--dns-listen", f"west=127.0.0.1:{dns_port}", "--listen", f"127.0.0.1:{metrics_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _serve(two["east"], 1)
        west = two["west"]

        def west_ip() -> str | None:
            imp = west.get_or_none(_path("ServiceImport", "web"))
            ips = (imp or {}).get("spec", {}).get("ips") or []
            return str(ips[0]) if ips else None
        ip = wait_until(west_ip, 20, "west's ServiceImport with its cluster IP")
        derived = west.get(_path("Service", mk.derived_name("web")))
        assert derived["spec"]["clusterIP"] == ip
        name = "web.shop.svc.clusterset.local"
        resp = wait_until(lambda: (r := _udp(dns_port, name)).ancount and r, 10, "the UDP answer")
        assert resp.rcode == 0 and resp.aa == 1 and [resp.an[i].rdata for i in range(resp.ancount)] == [ip]
        assert [str(_tcp(dns_port, name).an[0].rdata)] == [ip]
        assert _udp(dns_port, "nothing.shop.svc.clusterset.local").rcode == 3  # NXDOMAIN
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "fabric_mcs_passes_total" in body and 'fabric_mcs_dns_queries_total{cluster="west",rcode="0"}' in body
        if elect:
            assert two["east"].get(LEASE)["spec"]["holderIdentity"] == "mcs-test"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, err[-3000:]
    if elect:
        assert not two["east"].get(LEASE)["spec"].get("holderIdentity"), "the Lease released on SIGTERM"


def test_global_cidrs_and_families_come_from_the_cluster_object() -> None:
    obj = {"metadata": {"name": "east"}, "spec": {"clusterLinkOptions": {
        "podCIDRs": ["10.10.0.0/16", "fd10::/48"], "globalCIDRsMap": {"10.10.0.0/16": "100.64.0.0/16"}}}}
    assert mm.cluster_fabric(obj) == ((("10.10.0.0/16", "100.64.0.0/16"),), (4, 6))
    obj["spec"]["clusterLinkOptions"]["ipFamilies"] = ["IPv6"]
    assert mm.cluster_fabric(obj)[1] == (6,)
    obj["spec"]["clusterLinkOptions"]["globalCIDRsMap"] = {"10.10.0.0/16": "100.64.0.0/24"}
    with pytest.raises(ValueError, match=r"Cluster east: spec.clusterLinkOptions.globalCIDRsMap\[10.10.0.0/16\]"):
        mm.cluster_fabric(obj)


class _NoClusters:
    """A host cluster without the Cluster CRD (the lab's): every read of Clusters is a 404."""

    def __init__(self) -> None:
        self.reads = 0

    def get(self, path: str) -> dict[str, object]:
        from scheduler.kube import ApiError

        self.reads += 1
        raise ApiError(404, "NotFound", "the server could not find the requested resource", "GET", path)


def test_global_cidrs_from_the_command_line_win_and_spare_the_host() -> None:
    assert mm.global_cidr_spec("east:fd10::/48=fd20::/48") == ("east", "fd10::/48", "fd20::/48")
    host = _NoClusters()
    given = {"east": (("10.10.0.0/16", "172.20.0.0/16"),)}
    got = mm.fabric_members(host, ["east", "west"], None, given)  # type: ignore[arg-type]
    assert got["east"][0] == given["east"]
    assert got["west"][0] == ()
    assert host.reads == 1  # west has no --global-cidr: its Cluster object was looked for
    from fabric.control import api as fapi

    status = fapi.FabricStatus(epoch="e", generation=1, holding=False, clusters=())
    mm.fabric_members(host, ["east"], status, given)
    assert host.reads == 1, "every member given and the reflector answering: the host is not asked"


def _host_with_clusters(host: Api) -> None:
    """The Cluster CRD and the kosmos-system namespace in ``host``, as fabric-tool install leaves them."""
    from pathlib import Path

    from tests import crds

    crds.install(host, [Path(__file__).resolve().parents[2] / "deploy/base/host/crd-clusters.yaml"], [mm.CLUSTERS_PATH])
    host.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kosmos-system"}})


def _kubeconfig_secret(host: Api, name: str, server: str) -> None:
    """Secret kosmos-system/NAME holding a kubeconfig of ``server`` (what join --tree writes)."""
    import base64

    import yaml

    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "w",
                  "clusters": [{"name": "w", "cluster": {"server": server}}],
                  "users": [{"name": "u", "user": {"token": "t"}}],
                  "contexts": [{"name": "w", "context": {"cluster": "w", "user": "u"}}]}
    host.create("/api/v1/namespaces/kosmos-system/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "data": {"kubeconfig": base64.b64encode(yaml.safe_dump(kubeconfig).encode()).decode()}})


def _tree_cluster(host: Api, name: str, secret: str) -> None:
    host.create(mm.CLUSTERS_PATH, {"apiVersion": "kosmos.io/v1alpha1", "kind": "Cluster", "metadata": {"name": name},
                                   "spec": {"clusterLinkOptions": {"podCIDRs": ["10.1.0.0/16"]}, "clusterTreeOptions": {
                                       "enable": True,
                                       "kubeconfigSecretRef": {"namespace": "kosmos-system", "name": secret}}}})


def _http_status(url: str) -> int:
    """The status of a GET of ``url``; 0 while nothing answers (not up yet, or the waiting
    server handing its port over to the running one)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:  # URLError, a reset connection
        return 0


def test_with_no_member_yet_it_waits_alive_then_restarts_when_members_change(two: dict[str, Api]) -> None:
    """Right after install no Cluster is joined: kosmos-mcs --discover-members waits (alive, not
    ready) instead of a crash loop, takes the first member that joins, and ends (exit 0, for its
    supervisor to start it again) when the set of members changes."""
    host = two["east"]
    _host_with_clusters(host)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcs.main", "--master", host.host, "--leader-elect=false", "--discover-members",
         "--fabric-status-period", "0.3", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http_status(f"{base}/readyz") == 503, 20, "not ready while no member is joined")
        assert _http_status(f"{base}/healthz") == 200 and proc.poll() is None
        _kubeconfig_secret(host, "west-kubeconfig", two["west"].host)
        _tree_cluster(host, "west", "west-kubeconfig")
        wait_until(lambda: _http_status(f"{base}/readyz") == 200, 20, "ready once west joined and synced")
        host.request("DELETE", f"{mm.CLUSTERS_PATH}/west")
        code = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, err[-3000:]
    assert "members changed (left west)" in err, err[-3000:]


def test_members_are_discovered_as_kosmos_tree_finds_its_leaves(two: dict[str, Api],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    host = two["east"]
    _host_with_clusters(host)
    _kubeconfig_secret(host, "west-kubeconfig", two["west"].host)
    tree = {"enable": True, "kubeconfigSecretRef": {"namespace": "kosmos-system", "name": "west-kubeconfig"}}
    for name, opts in (("west", tree), ("north", {**tree, "kubeconfigSecretRef": {"namespace": "kosmos-system",
                                                                                   "name": "absent"}}),
                       ("east", tree), ("plain", None)):
        spec: dict[str, object] = {"clusterLinkOptions": {"podCIDRs": ["10.1.0.0/16"]}}
        if opts is not None:
            spec["clusterTreeOptions"] = opts
        host.create(mm.CLUSTERS_PATH, {"apiVersion": "kosmos.io/v1alpha1", "kind": "Cluster",
                                       "metadata": {"name": name}, "spec": spec})
    found = mm.discover_members(host, ["east"])
    assert [(m.name, m.api.host) for m in found] == [("west", two["west"].host)]
    assert any("member north left out: reading Secret kosmos-system/absent" in r.getMessage() for r in caplog.records)
    # Re-read while running: the same set is no change; a Cluster leaving or joining is.
    assert mm.membership_change(host, ["east"], ["east", "west"]) is None
    assert mm.membership_change(host, ["east"], ["east"]) == "members changed (joined west)"
    host.request("DELETE", f"{mm.CLUSTERS_PATH}/west")
    assert mm.membership_change(host, ["east"], ["east", "west"]) == "members changed (left west)"


def test_repeated_informer_lines_are_let_through_once_a_window() -> None:
    f = mm.RepeatFilter(window_s=3600, limit=2)

    def rec(msg: str) -> logging.LogRecord:
        return logging.LogRecord("scheduler.kube", logging.WARNING, __file__, 1, msg, None, None)
    assert [f.filter(rec(m)) for m in ("a", "a", "b", "a", "c", "a")] == [True, False, True, False, True, True]


class _Clusters:
    """A host cluster serving the given Cluster objects."""

    def __init__(self, items: list[dict[str, object]]) -> None:
        self.items = items

    def get(self, path: str) -> dict[str, object]:
        assert path == mm.CLUSTERS_PATH
        return {"items": self.items}


def test_the_global_cidrs_of_clusters_that_are_not_members_are_read_too() -> None:
    def cluster(name: str, cidrs: dict[str, str]) -> dict[str, object]:
        return {"metadata": {"name": name}, "spec": {"clusterLinkOptions": {
            "podCIDRs": list(cidrs) or ["10.9.0.0/16"], "globalCIDRsMap": cidrs}}}

    host = _Clusters([cluster("root", {"10.1.0.0/16": "100.1.0.0/16"}),
                      cluster("leaf", {"10.20.0.0/16": "100.20.0.0/16"}), cluster("plain", {})])
    others: dict[str, tuple[tuple[str, str], ...]] = {}
    got = mm.fabric_members(host, ["root"], None, None, others)  # type: ignore[arg-type]
    assert got["root"][0] == (("10.1.0.0/16", "100.1.0.0/16"),)
    assert others == {"leaf": (("10.20.0.0/16", "100.20.0.0/16"),)}, "members and unmapped clusters left out"
