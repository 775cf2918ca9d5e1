"""deploy/: kosmos-tree's and kosmos-scheduler's manifests against the programs themselves.

As test_deploy_mcs.py does for kosmos-mcs: each Deployment's arguments go through the program's
own parser (the pod's environment substituted as the kubelet does) and must agree with the rest
of the manifest (mounted Secrets and ConfigMap, ports, probes, the Lease the RBAC allows, the
reflector Service). The scheduler's ConfigMap is read by ``scheduler.profile.parse_config``.

The ClusterRoles are compared with what the code does in the root cluster:

- list/watch: the informers the objects really build on the root API client (the tree manager
  with its pod sync, convert policies and shared root objects, one leaf's dependency syncer and
  Event reflector; the scheduler with its profiles), found by walking those objects, so a new
  informer fails here until the role grants it;
- the direct requests (``ROOT_REQUESTS`` / ``SCHEDULER_REQUESTS``, each naming where it is sent),
  with a guard: every resource any ``resource_path(...)`` call in tree/ or scheduler/ names must
  be in those tables or among the resources known to be the leaves' only, so a request on a new
  resource fails here until it is classified.

No root. Needs kubectl (kustomize); skipped with the reason without it.
"""

from __future__ import annotations

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
SA_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

pytestmark = pytest.mark.skipif(not Path(KUBECTL).exists(), reason="kubectl not installed (renders kustomize)")

Obj = dict[str, Any]
Need = tuple[str, str, str]  # (API group, resource[/sub], verb)


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], Obj]:
    p = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / "base")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(p.stdout) if d}


def container(objs: dict[tuple[str, str], Obj], name: str) -> Obj:
    (c,) = objs[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
    return c


def parsed_args(parser: Any, c: Obj, pod: str = "p-5d9f-abcde", namespace: str = NS, ip: str = "10.0.0.7") -> Any:
    """The container's arguments through ``parser``, $(VAR) expanded from the container's env
    as the kubelet expands them (fieldRefs: the pod's name, namespace and IP)."""
    fields = {"metadata.name": pod, "metadata.namespace": namespace, "status.podIP": ip}
    env = {e["name"]: fields[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in c.get("env", [])}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in c["args"]]
    assert not any("$(" in a for a in args), args
    spelled = {s for a in parser._actions for s in a.option_strings}
    assert all(a.split("=", 1)[0] in spelled for a in args), "flags in full (argparse takes prefixes)"
    return parser.parse_args(args)


def mount_of(objs: dict[tuple[str, str], Obj], name: str, path: str) -> tuple[Obj, Obj]:
    """The volume mount holding ``path`` (a directory or a file in it) and its volume."""
    dep = objs[("Deployment", name)]
    c = container(objs, name)
    (m,) = [m for m in c["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    (v,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == m["name"]]
    return m, v


def check_common(objs: dict[tuple[str, str], Obj], name: str, args: Any) -> None:
    """What every add-on Deployment shares with kosmos-mcs's: reflector, metrics, probes, HA, security."""
    dep = objs[("Deployment", name)]
    c = container(objs, name)
    host, port = args.reflector.rsplit(":", 1)
    svc = objs[("Service", host)]
    assert any(p["port"] == int(port) and p["name"] == "grpc" for p in svc["spec"]["ports"])
    m, v = mount_of(objs, name, args.tls_dir)
    assert v["secret"]["secretName"] == f"{name}-tls" and m["readOnly"] and m["mountPath"] == args.tls_dir
    assert args.leader_elect is not False
    assert args.leader_elect_resource_namespace == NS and args.identity == "p-5d9f-abcde"
    listen_port = int(args.listen.rsplit(":", 1)[1])
    assert args.listen.startswith("0.0.0.0:")
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["metrics"]["containerPort"] == listen_port
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": str(listen_port),
                   "prometheus.io/path": "/metrics"}
    msvc = objs[("Service", name)]
    assert msvc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert (listen_port, "metrics") in [(p["port"], p["targetPort"]) for p in msvc["spec"]["ports"]]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    pdb = objs[("PodDisruptionBudget", name)]
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"] == dep["spec"]["selector"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == name and not pod.get("hostNetwork")
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    refl = container(objs, "kosmos-fabric-reflector")
    assert c["image"] == refl["image"]


# ---------------------------------------------------------------------------------------------
# The Deployments
# ---------------------------------------------------------------------------------------------


def test_tree_deployment_args_are_what_kosmos_tree_accepts_and_agree_with_the_manifest(
    base: dict[tuple[str, str], Obj],
) -> None:
    from tree import main as tree_main

    c = container(base, "kosmos-tree")
    assert c["command"] == ["kosmos-tree"]
    args = parsed_args(tree_main.parser(), c)
    check_common(base, "kosmos-tree", args)
    assert args.leader_elect is True
    # No --root-id: the UID of kube-system, which fabric-tool install puts in the certificate.
    assert args.root_id is None
    # The kubelet server: the pod's IP (what the virtual nodes advertise), the "kubelet" port,
    # HTTPS with the mounted serving certificate, clients checked against the cluster CA.
    assert args.kubelet_address == "10.0.0.7"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["kubelet"] == args.kubelet_port == 10250
    svc_ports = {p["name"]: (p["port"], p["targetPort"]) for p in base[("Service", "kosmos-tree")]["spec"]["ports"]}
    assert svc_ports["kubelet"] == (args.kubelet_port, "kubelet")
    _m, v = mount_of(base, "kosmos-tree", args.kubelet_cert)
    assert v["secret"]["secretName"] == "kosmos-tree-kubelet-tls"
    assert mount_of(base, "kosmos-tree", args.kubelet_key)[1] == v
    assert Path(args.kubelet_cert).name == "tls.crt" and Path(args.kubelet_key).name == "tls.key"
    assert args.kubelet_client_ca == SA_CA
    # The lease the election uses is one the ClusterRole lets it create and update.
    rules = base[("ClusterRole", "kosmos-tree")]["rules"]
    assert any("leases" in r["resources"] and {"get", "create", "update"} <= set(r["verbs"]) for r in rules)


def test_scheduler_deployment_and_its_configuration(base: dict[tuple[str, str], Obj]) -> None:
    from scheduler import main as scheduler_main
    from scheduler.profile import KOSMOS_SCHEDULER, parse_config

    c = container(base, "kosmos-scheduler")
    assert c["command"] == ["kosmos-scheduler"]
    args = parsed_args(scheduler_main.parser(), c)
    check_common(base, "kosmos-scheduler", args)
    # --config is the ConfigMap's key, mounted.
    m, v = mount_of(base, "kosmos-scheduler", args.config)
    cm = base[("ConfigMap", v["configMap"]["name"])]
    text = cm["data"][args.config.removeprefix(m["mountPath"] + "/")]
    cfg = parse_config(yaml.safe_load(text), "the ConfigMap")
    # Only Kosmos' profile: the cluster's kube-scheduler keeps default-scheduler.
    assert [p.scheduler_name for p in cfg.profiles] == [KOSMOS_SCHEDULER]
    le = cfg.leader_election
    assert le.leader_elect
    role = base[("Role", "kosmos-scheduler")]
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                      "resourceNames": [args.leader_elect_resource_name or le.resource_name],
                      "verbs": ["get", "update"]}]


def test_scheduler_policy_crds_are_in_the_base_as_the_lab_installs_them(base: dict[tuple[str, str], Obj]) -> None:
    from scheduler.scheduler import OTHER_RESOURCES
    from tools.lab import schedulers

    lab = {d["metadata"]["name"]: d for d in schedulers.crd_manifests()}
    kosmos = {f"{res}.{gv.split('/')[0]}" for gv, res, _ev in OTHER_RESOURCES if gv.startswith("kosmos.io/")}
    assert set(lab) == kosmos
    for name, crd in lab.items():
        got = base[("CustomResourceDefinition", name)]
        assert got["spec"] == crd["spec"], name
        assert got["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kosmos-fabric"


# ---------------------------------------------------------------------------------------------
# RBAC against the code
# ---------------------------------------------------------------------------------------------


def granted(role: Obj) -> set[Need]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def _group(gv: str) -> str:
    return gv.rpartition("/")[0]


def informers_on(api: Any, *roots: Any) -> set[tuple[str, str]]:
    """(API group, resource) of every Informer reachable from ``roots`` through attributes,
    dicts and lists, that watches ``api``."""
    from scheduler.kube import Informer

    out: set[tuple[str, str]] = set()
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        o = todo.pop()
        if id(o) in seen or o is api:
            continue
        seen.add(id(o))
        if isinstance(o, Informer):
            if o.api is api:
                out.add((_group(o.group_version), o.resource))
            continue
        if isinstance(o, dict):
            todo += list(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            todo += list(o)
        elif hasattr(o, "__dict__") and type(o).__module__.split(".")[0] in ("tree", "scheduler"):
            todo += list(vars(o).values())
    return out


#: kosmos-tree's requests to the root other than its informers' LIST/WATCH, from the code.
ROOT_REQUESTS: dict[Need, str] = {
    ("", "namespaces", "get"): "tree/main.py root_id (kube-system's UID)",
    ("coordination.k8s.io", "leases", "get"): "scheduler/election.py; tree/vnode.py node Leases",
    ("coordination.k8s.io", "leases", "create"): "scheduler/election.py; tree/vnode.py node Leases",
    ("coordination.k8s.io", "leases", "update"): "scheduler/election.py; tree/vnode.py node Lease renewals (PUT)",
    ("coordination.k8s.io", "leases", "delete"): "tree/vnode.py a removed virtual node's Lease",
    ("", "nodes", "get"): "tree/vnode.py RootWriter.ensure",
    ("", "nodes", "create"): "tree/vnode.py RootWriter.ensure",
    ("", "nodes", "patch"): "tree/vnode.py metadata/taints",
    ("", "nodes/status", "patch"): "tree/vnode.py status, NotReady",
    ("", "nodes", "delete"): "tree/vnode.py a removed virtual node",
    ("", "pods", "get"): "tree/events.py, tree/kubelet.py, tree/podsync.py",
    ("", "pods", "delete"): "tree/podsync.py _finish",
    ("", "pods", "patch"): "tree/podsync.py a stranded copy's pin removed",
    ("", "pods/eviction", "create"): "tree/podsync.py a stranded pod re-placed",
    ("", "pods/status", "update"): "tree/podsync.py status (PUT)",
    ("", "events", "get"): "tree/events.py",
    ("", "events", "create"): "tree/events.py, tree/podsync.py",
    ("", "events", "patch"): "tree/events.py",
    ("", "secrets", "get"): "tree/leaf.py kubeconfig Secrets; tree/deps.py FreshReads",
    ("", "configmaps", "get"): "tree/deps.py FreshReads",
    ("", "serviceaccounts", "get"): "tree/deps.py FreshReads",
    ("", "persistentvolumeclaims", "get"): "tree/deps.py FreshReads",
    ("", "persistentvolumeclaims", "patch"): "tree/deps.py _bind_root_pvc (volumeName)",
    ("", "persistentvolumeclaims/status", "patch"): "tree/deps.py _bind_root_pvc",
    ("", "persistentvolumes", "get"): "tree/deps.py _get(self.root, PVS ...)",
    ("", "persistentvolumes", "create"): "tree/deps.py mirror",
    ("", "persistentvolumes", "patch"): "tree/deps.py mirror",
    ("", "persistentvolumes/status", "patch"): "tree/deps.py mirror status, Released",
    ("", "persistentvolumes", "delete"): "tree/deps.py a released mirror",
}
#: kosmos-scheduler's requests other than LIST/WATCH, from the code.
SCHEDULER_REQUESTS: dict[Need, str] = {
    ("coordination.k8s.io", "leases", "get"): "scheduler/election.py",
    ("coordination.k8s.io", "leases", "create"): "scheduler/election.py",
    ("coordination.k8s.io", "leases", "update"): "scheduler/election.py",
    ("", "pods/binding", "create"): "scheduler/scheduler.py bind",
    ("", "pods", "patch"): "scheduler/plugins/kosmos_leaffit.py PreBind pin",
    ("", "pods/status", "patch"): "scheduler/scheduler.py PodScheduled condition",
    ("", "events", "create"): "scheduler/scheduler.py FailedScheduling",
    ("", "events", "patch"): "scheduler/scheduler.py aggregated Events",
    ("", "persistentvolumes", "patch"): "scheduler/plugins/volumebinding.py PreBind claimRef",
    ("", "persistentvolumeclaims", "patch"): "scheduler/plugins/volumebinding.py PreBind selected-node",
}
#: Resources tree/ names in resource_path() only for leaf requests (logs/exec are proxied to the leaf).
LEAF_ONLY = {"pods/log", "pods/exec"}


def _call_args(text: str, start: int) -> list[str]:
    """The top-level, comma-separated arguments of the call whose "(" is at ``start``."""
    depth, args, cur = 0, [], ""
    for ch in text[start:]:
        if ch in "([{":
            depth += 1
            if depth == 1:
                continue
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                break
        if ch == "," and depth == 1:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [a for a in [*args, cur.strip()] if a]


def resource_path_resources(package: str) -> set[str]:
    """Every ``resource[/sub]`` a ``resource_path(group_version, resource, namespace, name, sub)``
    call in ``package`` names literally or by a module constant (a variable plural is skipped:
    its values are the constants, named elsewhere)."""
    import importlib

    out: set[str] = set()
    for f in sorted((REPO / package).rglob("*.py")):
        text = f.read_text()
        mod = importlib.import_module(".".join(f.relative_to(REPO).with_suffix("").parts))
        for m in re.finditer(r"\bresource_path\(", text):
            args = _call_args(text, m.end() - 1)
            if len(args) < 2 or text[max(0, m.start() - 4):m.start()] == "def ":
                continue
            token = args[1]
            if token.startswith('"'):
                res = token.strip('"')
            elif re.fullmatch(r"[A-Z_]+", token):
                res = getattr(mod, token)
            else:
                continue
            positional = [a for a in args if "=" not in a.split("(")[0]]
            subs = [a.split("=", 1)[1] for a in args if a.startswith("sub=")]
            if not subs and len(positional) >= 5:
                subs = [positional[4]]
            out.add(f"{res}/{subs[0].strip(chr(34))}" if subs and subs[0].startswith('"') else res)
    return out


def tree_needs() -> set[Need]:
    from scheduler.kube import Api
    from tree.deps import Dependencies
    from tree.events import EventReflector
    from tree.leaf import Options
    from tree.manager import TreeManager

    root, leaf = Api("http://127.0.0.1:9"), Api("http://127.0.0.1:9")
    mgr = TreeManager(root, Options(root_id="r"), leader_elect=False)
    deps = Dependencies(root, leaf, root_id="r", cluster="c", timeout=1.0, root_objects=mgr.root_objects)
    events = EventReflector(root, leaf, "r", "c")
    watched = informers_on(root, mgr, deps, events)
    return {(g, r, v) for g, r in watched for v in ("list", "watch")} | set(ROOT_REQUESTS)


def scheduler_needs() -> set[Need]:
    from scheduler.kube import Api
    from scheduler.profile import default_config
    from scheduler.scheduler import Scheduler

    api = Api("http://127.0.0.1:9")
    sched = Scheduler(api, default_config(), leader_elect=False)
    watched = informers_on(api, sched)
    return {(g, r, v) for g, r in watched for v in ("list", "watch")} | set(SCHEDULER_REQUESTS)


def test_tree_role_grants_what_the_manager_does_and_no_more(base: dict[tuple[str, str], Obj]) -> None:
    need = tree_needs()
    assert {r for _g, r, v in need if v == "watch"} >= {
        "clusters", "nodes", "pods", "configmaps", "secrets", "serviceaccounts", "persistentvolumeclaims",
        "persistentvolumes", "podconvertpolicies", "clusterpodconvertpolicies"}
    have = granted(base[("ClusterRole", "kosmos-tree")])
    assert not need - have, f"kosmos-tree does these in the root, its role does not grant them: {sorted(need - have)}"
    assert not have - need, f"granted but never used: {sorted(have - need)}"
    # The namespace read is kube-system's only.
    (ns_rule,) = [r for r in base[("ClusterRole", "kosmos-tree")]["rules"] if "namespaces" in r["resources"]]
    assert ns_rule["resourceNames"] == ["kube-system"]


def test_scheduler_role_grants_what_the_scheduler_does_and_no_more(base: dict[tuple[str, str], Obj]) -> None:
    from scheduler.scheduler import OTHER_RESOURCES

    need = scheduler_needs()
    assert {r for _g, r, v in need if v == "watch"} == {"pods", "nodes"} | {res for _gv, res, _e in OTHER_RESOURCES}
    have = granted(base[("ClusterRole", "kosmos-scheduler")]) | granted(base[("Role", "kosmos-scheduler")])
    assert not need - have, f"kosmos-scheduler does these but its roles do not grant them: {sorted(need - have)}"
    assert not have - need, f"granted but never used: {sorted(have - need)}"


def test_every_resource_the_code_requests_is_classified() -> None:
    """A request on a resource new to tree/ or scheduler/ fails here until the tables above (and
    the roles) say whether the root sees it."""
    tree = resource_path_resources("tree")
    assert {"nodes/status", "pods/status", "persistentvolumes/status", "pods/log", "pods/exec"} <= tree
    known = {r for _g, r, _v in tree_needs()} | LEAF_ONLY
    assert not tree - known, sorted(tree - known)
    sched = resource_path_resources("scheduler")
    assert {"pods/binding", "pods/status", "events", "leases"} <= sched
    assert not sched - {r for _g, r, _v in scheduler_needs()}, sorted(sched - {r for _g, r, _v in scheduler_needs()})


def test_the_derivation_sees_what_a_role_lacks(base: dict[tuple[str, str], Obj]) -> None:
    """Not a no-op: without the convert policies' rule (an informer's need) or the binding rule
    (a request's), needs are left uncovered."""
    tree_role = base[("ClusterRole", "kosmos-tree")]
    cut = {"rules": [r for r in tree_role["rules"] if "podconvertpolicies" not in r["resources"]]}
    assert ("kosmos.io", "podconvertpolicies", "watch") in tree_needs() - granted(cut)
    sched_role = base[("ClusterRole", "kosmos-scheduler")]
    cut = {"rules": [r for r in sched_role["rules"] if "pods/binding" not in r["resources"]]}
    assert ("", "pods/binding", "create") in scheduler_needs() - granted(cut)


# ---------------------------------------------------------------------------------------------
# The chart's switches and values
# ---------------------------------------------------------------------------------------------


def test_chart_switches_and_values_of_tree_and_scheduler() -> None:
    from test_deploy_manifests import chart_values, helm_template

    from scheduler import main as scheduler_main
    from tree import main as tree_main

    values = chart_values()
    tree_args = [*values["tree"]["args"], "--fabric-cluster=host"]
    config = values["scheduler"]["config"].replace("schedulerName: kosmos-scheduler", "schedulerName: leaf-aware")
    objs = {(o["kind"], o["metadata"]["name"]): o
            for o in helm_template(chart_values(tree__args=tree_args, scheduler__config=config,
                                                scheduler__args=[*values["scheduler"]["args"], "--fabric-cluster=host"],
                                                tree__replicas=3), namespace="fab")}
    assert objs[("Deployment", "kosmos-tree")]["spec"]["replicas"] == 3
    targs = parsed_args(tree_main.parser(), container(objs, "kosmos-tree"), namespace="fab")
    assert targs.fabric_cluster == "host" and targs.leader_elect_resource_namespace == "fab"
    sargs = parsed_args(scheduler_main.parser(), container(objs, "kosmos-scheduler"), namespace="fab")
    assert sargs.fabric_cluster == "host"
    from scheduler.profile import parse_config

    cm = objs[("ConfigMap", "kosmos-scheduler-config")]
    assert [p.scheduler_name for p in parse_config(yaml.safe_load(cm["data"]["config.yaml"])).profiles] == [
        "leaf-aware"]
    assert objs[("ClusterRoleBinding", "kosmos-tree")]["subjects"][0]["namespace"] == "fab"
    assert objs[("RoleBinding", "kosmos-scheduler")]["subjects"][0]["namespace"] == "fab"
    off = {(o["kind"], o["metadata"]["name"])
           for o in helm_template(chart_values(tree__enabled=False, scheduler__enabled=False))}
    assert not any(name in ("kosmos-tree", "kosmos-scheduler", "kosmos-scheduler-config") for _k, name in off)
    assert ("Deployment", "kosmos-mcs") in off
    # The CRDs stay (Helm installs crds/ whatever the values): the policies can be applied anyway.
    assert ("CustomResourceDefinition", "workloadpolicies.kosmos.io") in off
