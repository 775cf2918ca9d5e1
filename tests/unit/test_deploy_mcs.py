"""deploy/: kosmos-mcs's manifests against kosmos-mcs itself.

The Deployment's arguments are parsed by kosmos-mcs's own parser (with the pod's environment
substituted as the kubelet does), and what they say must agree with the rest of the manifest
(the mounted certificate Secret, the metrics port, the Lease the Role names, the reflector
Service). The member-side ClusterRole is compared with what the controller really does: the
resources its informers list and watch and the ones its applier writes are read from mcs/
itself, so a new informer or a new written kind fails here until the role grants it. The
CoreDNS stub domain (deploy/mcs-coredns) is checked for the Corefile shape CoreDNS documents
(``ZONE[:PORT] { PLUGIN ... }``, ``forward FROM TO...``); there is no CoreDNS binary here.

No root. Needs kubectl (kustomize); skipped with the reason without it.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
NS = "kosmos-system"

pytestmark = pytest.mark.skipif(not Path(KUBECTL).exists(), reason="kubectl not installed (renders kustomize)")

Obj = dict[str, Any]


def kustomize(path: Path) -> dict[tuple[str, str], Obj]:
    p = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(p.stdout) if d}


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], Obj]:
    return kustomize(DEPLOY / "base")


@pytest.fixture(scope="module")
def with_dns() -> dict[tuple[str, str], Obj]:
    return kustomize(DEPLOY / "overlays" / "mcs-dns")


def container(objs: dict[tuple[str, str], Obj]) -> Obj:
    (c,) = objs[("Deployment", "kosmos-mcs")]["spec"]["template"]["spec"]["containers"]
    return c


def parsed_args(c: Obj, pod: str = "kosmos-mcs-5d9f-abcde", namespace: str = NS) -> Any:
    """The container's arguments through kosmos-mcs's parser, $(VAR) expanded from the
    container's env as the kubelet expands them (fieldRefs: the pod's name and namespace)."""
    from mcs import main as mcs_main

    fields = {"metadata.name": pod, "metadata.namespace": namespace}
    env = {e["name"]: fields[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in c.get("env", [])}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in c["args"]]
    assert not any("$(" in a for a in args), args
    return mcs_main.parser().parse_args(args)


def test_deployment_args_are_what_kosmos_mcs_accepts_and_agree_with_the_manifest(
    base: dict[tuple[str, str], Obj],
) -> None:
    dep = base[("Deployment", "kosmos-mcs")]
    c = container(base)
    assert c["command"] == ["kosmos-mcs"]
    args = parsed_args(c)
    assert args.discover_members and not args.member
    # Election: on, in the pod's namespace, on the Lease the Role lets it update, as the pod.
    assert args.leader_elect is True
    assert args.leader_elect_resource_namespace == NS
    assert args.identity == "kosmos-mcs-5d9f-abcde"
    role = base[("Role", "kosmos-mcs")]
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                      "resourceNames": [args.leader_elect_resource_name], "verbs": ["get", "update"]}]
    # The reflector is the base's reflector Service, on its gRPC port.
    host, port = args.reflector.rsplit(":", 1)
    svc = base[("Service", host)]
    assert any(p["port"] == int(port) and p["name"] == "grpc" for p in svc["spec"]["ports"])
    # --tls-dir is where the Secret with the mcs client certificate is mounted.
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == args.tls_dir]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == "kosmos-mcs-tls" and mount["readOnly"]
    # --listen's port is the "metrics" container port, the scrape annotation and the Service's target.
    listen_port = int(args.listen.rsplit(":", 1)[1])
    assert args.listen.startswith("0.0.0.0:")
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["metrics"]["containerPort"] == listen_port
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(listen_port) and ann["prometheus.io/path"] == "/metrics"
    msvc = base[("Service", "kosmos-mcs")]
    assert msvc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert [(p["port"], p["targetPort"]) for p in msvc["spec"]["ports"]] == [(listen_port, "metrics")]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # Two replicas, as the reflector; unprivileged like it.
    assert dep["spec"]["replicas"] == 2
    assert base[("PodDisruptionBudget", "kosmos-mcs")]["spec"]["minAvailable"] == 1
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kosmos-mcs"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    refl = base[("Deployment", "kosmos-fabric-reflector")]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == refl["image"]


def test_a_bad_argument_is_refused_by_the_same_parse() -> None:
    """parsed_args is not a no-op: kosmos-mcs's parser rejects a misspelt flag and a bad value.
    (It takes unambiguous abbreviations, "--discover-member", as argparse does: that the
    manifests spell every flag in full is test_deploy_manifests' test_every_flag_the_manifests_pass_exists.)"""
    good = {"args": ["--discover-members"], "env": []}
    assert parsed_args(good).discover_members
    for bad in (["--discover-membrs"], ["--reflector=kosmos-fabric-reflector"], ["--dns-listen=east=0.0.0.0"]):
        with pytest.raises(SystemExit):
            parsed_args({"args": bad, "env": []})


def test_dns_component_adds_a_responder_its_port_and_a_service_per_member(
    base: dict[tuple[str, str], Obj], with_dns: dict[tuple[str, str], Obj],
) -> None:
    assert set(with_dns) - set(base) == {("Service", "kosmos-mcs-dns-east")}
    c = container(with_dns)
    args = parsed_args(c)
    assert args.dns_listen, "the component adds --dns-listen"
    from mcs import main as mcs_main

    spelled = {s for a in mcs_main.parser()._actions for s in a.option_strings}
    assert all(a.split("=", 1)[0] in spelled for a in c["args"]), "flags in full (argparse takes prefixes)"
    by_name = {p["name"]: p for p in c["ports"]}
    assert all(len(n) <= 15 for n in by_name), "a container port name has at most 15 characters"
    dep_labels = with_dns[("Deployment", "kosmos-mcs")]["spec"]["template"]["metadata"]["labels"]
    for member, host, port in args.dns_listen:
        assert member, "one responder per member: NAME=HOST:PORT"
        assert host == "0.0.0.0" and 1024 <= port < 65536, "unprivileged port (the pod has no capabilities)"
        svc = with_dns[("Service", f"kosmos-mcs-dns-{member}")]
        assert svc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kosmos-fabric"
        assert svc["metadata"]["namespace"] == NS
        assert svc["spec"]["selector"].items() <= dep_labels.items()
        got = {(p["protocol"], p["port"], by_name[p["targetPort"]]["containerPort"],
                by_name[p["targetPort"]]["protocol"]) for p in svc["spec"]["ports"]}
        assert got == {("UDP", 53, port, "UDP"), ("TCP", 53, port, "TCP")}
    kv = pytest.importorskip("kubernetes_validate", reason="PyPI kubernetes-validate not installed")
    for key in (("Deployment", "kosmos-mcs"), *(k for k in with_dns if k not in base)):
        kv.validate(with_dns[key], "1.32.0", strict=True)  # raises naming the field
    # Everything else is the base's.
    for key, obj in base.items():
        if key != ("Deployment", "kosmos-mcs"):
            assert with_dns[key] == obj, key


# ---------------------------------------------------------------------------------------------
# The member-side ClusterRole against the controller
# ---------------------------------------------------------------------------------------------

#: Status subresources the controller writes (mcs.plan's status_updates: ServiceImport status
#: with its clusters, ServiceExport conditions; mcs.controller writes export status directly).
STATUS_WRITTEN = {("multicluster.x-k8s.io", "serviceexports/status"),
                  ("multicluster.x-k8s.io", "serviceimports/status")}


def granted(role: Obj) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def needed_in_a_member() -> set[tuple[str, str, str]]:
    """(group, resource, verb) the controller uses in a member, read from mcs/ itself."""
    from mcs import apply
    from mcs.controller import Member
    from scheduler.kube import Api

    def group(gv: str) -> str:
        return gv.rpartition("/")[0]

    m = Member("probe", Api("http://127.0.0.1:9"))
    m.watch()  # builds the informers (not started)
    out = {(group(i.group_version), i.resource, v) for i in m.informers.values() for v in ("list", "watch")}
    out |= {(group(gv), res, v) for gv, res in apply.RESOURCES.values() for v in ("create", "update", "delete")}
    out |= {(g, r, "update") for g, r in STATUS_WRITTEN}
    return out


def test_member_role_grants_what_the_controller_does_and_nothing_sensitive(base: dict[tuple[str, str], Obj]) -> None:
    role = base[("ClusterRole", "kosmos-mcs-member")]
    have = granted(role)
    need = needed_in_a_member()
    assert {r for _g, r, _v in need} >= {"serviceexports", "serviceimports", "services", "endpointslices", "namespaces"}
    missing = need - have
    assert not missing, f"kosmos-mcs does these in a member but the role does not grant them: {sorted(missing)}"
    # Beyond the need, only reads (get) of the same resources.
    extra = {(g, r, v) for g, r, v in have - need if v != "get"}
    assert not extra, sorted(extra)
    assert {r for _g, r, _v in have} <= {r for _g, r, _v in need}
    binding = base[("ClusterRoleBinding", "kosmos-mcs-member")]
    assert binding["roleRef"]["name"] == "kosmos-mcs-member"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kosmos-mcs-member", "namespace": NS}]
    assert ("ServiceAccount", "kosmos-mcs-member") in base


def test_the_derivation_sees_a_resource_the_role_lacks(base: dict[tuple[str, str], Obj]) -> None:
    """Not a no-op: dropping the EndpointSlice rule leaves needs uncovered."""
    role = base[("ClusterRole", "kosmos-mcs-member")]
    cut = {"rules": [r for r in role["rules"] if "endpointslices" not in r["resources"]]}
    assert {("discovery.k8s.io", "endpointslices", "create")} <= needed_in_a_member() - granted(cut)


# ---------------------------------------------------------------------------------------------
# The member's CoreDNS stub domain
# ---------------------------------------------------------------------------------------------


def server_blocks(corefile: str) -> list[tuple[list[str], list[list[str]]]]:
    """A Corefile's server blocks, ``KEYS { DIRECTIVE ARGS... }``, as CoreDNS's manual gives the
    syntax; a directive's own block (``plugin { ... }``) is skipped. Fails on unbalanced braces."""
    text = "\n".join(line.split("#", 1)[0] for line in corefile.splitlines())
    tokens = re.findall(r"\{|\}|\n|[^\s{}]+", text)
    blocks: list[tuple[list[str], list[list[str]]]] = []
    keys: list[str] = []
    depth = 0
    line: list[str] = []
    for t in tokens:
        if t == "{":
            if depth == 0:
                blocks.append((keys, []))
                keys = []
            elif depth == 1 and line:
                blocks[-1][1].append(line)
                line = []
            depth += 1
        elif t == "}":
            assert depth > 0, "unbalanced '}'"
            if depth == 1 and line:
                blocks[-1][1].append(line)
            line = []
            depth -= 1
        elif t == "\n":
            if depth == 1 and line:
                blocks[-1][1].append(line)
                line = []
        elif depth == 0:
            keys.append(t)
        elif depth == 1:
            line.append(t)
    assert depth == 0 and not keys, "unterminated server block"
    return blocks


def test_coredns_stub_domain_forwards_clusterset_local() -> None:
    objs = kustomize(DEPLOY / "mcs-coredns")
    cm = objs[("ConfigMap", "coredns-custom")]
    assert cm["metadata"]["namespace"] == "kube-system"
    (key, corefile), = cm["data"].items()
    assert key.endswith(".server"), "coredns-custom keys that add server blocks end in .server (AKS, k3s)"
    assert corefile == (DEPLOY / "mcs-coredns" / "clusterset.server").read_text()
    (keys, directives), = server_blocks(corefile)
    assert keys == ["clusterset.local:53"]
    (fwd,) = [d for d in directives if d[0] == "forward"]
    assert fwd[1] == "." and len(fwd) == 3
    host, port = fwd[2].rsplit(":", 1)
    ipaddress.ip_address(host)
    # The port the member's DNS forwards to is the one the responder Services listen on.
    dns = kustomize(DEPLOY / "overlays" / "mcs-dns")
    svc_ports = {p["port"] for k, o in dns.items() if k[1].startswith("kosmos-mcs-dns-") for p in o["spec"]["ports"]}
    assert svc_ports == {int(port)}


def test_server_blocks_reads_corefile_syntax() -> None:
    blocks = server_blocks(".:53 {\n  errors\n  kubernetes cluster.local {\n    pods insecure\n  }\n"
                           "  forward . /etc/resolv.conf\n}\nexample.org:5300 { whoami }\n")
    assert blocks == [([".:53"], [["errors"], ["kubernetes", "cluster.local"], ["forward", ".", "/etc/resolv.conf"]]),
                      (["example.org:5300"], [["whoami"]])]
    with pytest.raises(AssertionError):
        server_blocks("clusterset.local:53 {\n forward . 10.0.0.1\n")


# ---------------------------------------------------------------------------------------------
# The chart's kosmos-mcs values
# ---------------------------------------------------------------------------------------------


def test_chart_mcs_values_add_responders_and_switch_host_and_member_parts() -> None:
    """mcs.args / mcs.ports carry the per-member responders (the chart has no DNS Service: it
    renders the base); mcs.enabled and mcsMember.enabled split host and member installs."""
    from test_deploy_manifests import chart_values, helm_template

    values = chart_values()
    args = [*values["mcs"]["args"], "--dns-listen=west=0.0.0.0:5302"]
    ports = [*values["mcs"]["ports"], {"name": "dns-west-udp", "containerPort": 5302, "protocol": "UDP"}]
    objs = {(o["kind"], o["metadata"]["name"]): o
            for o in helm_template(chart_values(mcs__args=args, mcs__ports=ports, mcs__replicas=3), namespace="mc")}
    dep = objs[("Deployment", "kosmos-mcs")]
    assert dep["spec"]["replicas"] == 3 and dep["metadata"]["namespace"] == "mc"
    c = container(objs)
    assert [p["containerPort"] for p in c["ports"]] == [10271, 5302]
    parsed = parsed_args(c, namespace=dep["metadata"]["namespace"])
    assert parsed.dns_listen == [("west", "0.0.0.0", 5302)]
    assert parsed.leader_elect_resource_namespace == "mc"  # the pod's namespace, not a fixed one
    assert objs[("RoleBinding", "kosmos-mcs")]["subjects"][0]["namespace"] == "mc"
    host_only = {(o["kind"], o["metadata"]["name"])
                 for o in helm_template(chart_values(agent__enabled=False, mcsMember__enabled=False))}
    assert ("Deployment", "kosmos-mcs") in host_only and ("ClusterRole", "kosmos-mcs-member") not in host_only
    member_only = {(o["kind"], o["metadata"]["name"])
                   for o in helm_template(chart_values(reflector__enabled=False, mcs__enabled=False))}
    assert ("ClusterRole", "kosmos-mcs-member") in member_only
    assert not any(name == "kosmos-mcs" for _k, name in member_only)
