"""``fabric-tool install / join / unjoin / uninstall``: the fabric on Kubernetes, one command a step.

The objects come from ``deploy/base`` (one source of truth with ``kubectl apply -k``): the
kustomizations there are read by :func:`load_kustomization`, which understands exactly the
features they use (``resources``, ``namespace``, ``labels``) and refuses anything else.

What each step does, in order:

- ``install`` (host cluster): the Namespace, the Cluster CRD (waits until it is served), the
  reflector's RBAC, its Deployment and Service. With ``--lab NAME`` the reflector is the lab's
  process instead of a Deployment: it is restarted with ``--topology-source=kubernetes`` and a
  kubeconfig holding only the host context, in the lab's underlay namespace, reaching the
  emulated API server (root namespace, 127.0.0.1) through ``--kube-netns``.
- ``join CLUSTER`` (host + member): the Cluster resource in the host. Without ``--pod-cidr`` it
  has no ``podCIDRs`` (discovery mode): its pod CIDRs are the union of those its agents announce
  (each reads its Node's ``spec.podCIDRs``), so a node added to the member later is routed
  without another join; with ``--pod-cidr`` they are fixed and every node's must lie inside.
  Its service CIDRs (unless given) come from the member's ServiceCIDR objects. The member's
  current Node pod CIDRs serve only the conflict check against the other Clusters before
  anything is written. Then the agent into the member (``deploy/base/member`` with the ConfigMap naming the
  cluster and the reflector; a lab: the lab's agents of that cluster are started). Waits, with
  progress, until the Cluster is accepted and every Node of the member is in sync in its status.
  The Cluster's underlay settings (``defaultNICName``, ``nicNodeNames``, ``autodetectionMethod``)
  are copied into that ConfigMap too: the agents choose their underlay from them at start-up
  and, running in the member, cannot read the host's Cluster. So a ``kubectl patch`` of them in
  the host takes effect at the next ``join`` (which keeps the patched values unless its own
  flags give others, rewrites the ConfigMap and, through a digest annotation on the pod
  template, rolls the agents); until then the agents keep the underlay they started with.
- ``unjoin CLUSTER``: deletes the Cluster, waits until the reflector no longer plans the
  cluster's nodes and every remaining node applied its plan without them; then removes the
  agent from the member (a lab: stops the cluster's agents and runs ``fabric-agent --cleanup``
  on each of its nodes, so no fabric object is left in them).
- ``uninstall``: refuses while Clusters exist (unless ``--force``), then deletes what install
  created, last first; a lab gets its file-configured reflector back.

Every step is idempotent (``unchanged`` / ``absent`` when there is nothing to do) and
``--dry-run`` prints the objects and actions without changing anything.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import ipaddress
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from fabric import crd
from fabric.control import api
from tools import lab, nsutil

_log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
NAMESPACE = "kosmos-system"
REFLECTOR_NAME = "kosmos-fabric-reflector"
#: Kinds without a namespace among the ones deploy/base uses.
CLUSTER_SCOPED = frozenset({"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"})
#: What the lab runs as processes instead of objects (its reflector and agents).
LAB_SKIPPED_KINDS = frozenset({"Deployment", "DaemonSet", "Service"})
_KUSTOMIZE_KEYS = frozenset({"apiVersion", "kind", "namespace", "labels", "resources"})
DEFAULT_TIMEOUT_S = 120.0

Progress = Callable[[str], None]


class InstallError(Exception):
    """A step failed; the message names the object or cluster involved."""

    exit_code = 1


class InstallUsageError(InstallError):
    exit_code = 2


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


def load_kustomization(path: Path) -> list[dict[str, Any]]:
    """The objects of a kustomization directory (or a single YAML file), in resource order."""
    if path.is_file():
        return [d for d in yaml.safe_load_all(path.read_text()) if d]
    kfile = path / "kustomization.yaml"
    try:
        doc = yaml.safe_load(kfile.read_text())
    except OSError as e:
        raise InstallError(f"{kfile}: cannot read the kustomization: {e.strerror}") from e
    unknown = set(doc) - _KUSTOMIZE_KEYS
    if unknown:
        raise InstallError(f"{kfile}: keys {sorted(unknown)} are not understood by fabric-tool (only "
                           f"{sorted(_KUSTOMIZE_KEYS)}); keep deploy/base simple or render it with kubectl")
    labels: dict[str, str] = {}
    for entry in doc.get("labels") or []:
        if set(entry) - {"pairs"}:
            raise InstallError(f"{kfile}: labels entries with {sorted(set(entry) - {'pairs'})} are not supported")
        labels.update(entry.get("pairs") or {})
    objs: list[dict[str, Any]] = []
    for res in doc.get("resources") or []:
        objs += load_kustomization(path / res)
    ns = doc.get("namespace")
    for obj in objs:
        meta = obj.setdefault("metadata", {})
        if labels:
            meta["labels"] = {**(meta.get("labels") or {}), **labels}
        if ns and obj.get("kind") not in CLUSTER_SCOPED:
            meta["namespace"] = ns
    return objs


def host_objects(for_lab: bool) -> list[dict[str, Any]]:
    """Namespace, CRD, reflector RBAC (and, outside a lab, its Deployment and Service)."""
    objs = load_kustomization(DEPLOY / "base" / "namespace.yaml") + load_kustomization(DEPLOY / "base" / "host")
    return [o for o in objs if not (for_lab and o.get("kind") in LAB_SKIPPED_KINDS)]


#: Pod-template annotation of the agent DaemonSet: a digest of its ConfigMap's data. The agent
#: reads the ConfigMap through environment variables, which a running pod never re-reads; a
#: join that changes the data changes this annotation, and the DaemonSet rolls its pods.
CONFIG_DIGEST_ANNOTATION = "kosmos.io/agent-config-digest"


def agent_underlay_data(spec: crd.ClusterSpec) -> dict[str, str]:
    """The Cluster's underlay settings as the agent's ConfigMap carries them (``nicNodeNames``
    flattened to ``NODE=IFNAME,...``, the form of ``fabric-agent --nic-override``); the DaemonSet
    passes them as FABRIC_AUTODETECTION_METHOD, FABRIC_UNDERLAY_INTERFACE, FABRIC_NIC_OVERRIDE."""
    return {
        "autodetectionMethod": spec.autodetection_method,
        "defaultNICName": spec.default_nic,
        "nicNodeNames": ",".join(f"{node}={nic}" for node, nic in spec.nic_overrides),
    }


def member_objects(cluster: str, reflector: str, underlay: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The agent's objects for one member, the ConfigMap naming its cluster and reflector (and,
    given ``underlay`` from :func:`agent_underlay_data`, the Cluster's underlay settings)."""
    objs = load_kustomization(DEPLOY / "base" / "namespace.yaml") + load_kustomization(DEPLOY / "base" / "member")
    data: dict[str, str] = {}
    for o in objs:
        if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == "kosmos-fabric-agent":
            o["data"] = data = {**(o.get("data") or {}), "cluster": cluster, "reflector": reflector, **(underlay or {})}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    for o in objs:
        if o.get("kind") == "DaemonSet" and o["metadata"]["name"] == "kosmos-fabric-agent":
            meta = o["spec"]["template"].setdefault("metadata", {})
            meta["annotations"] = {**(meta.get("annotations") or {}), CONFIG_DIGEST_ANNOTATION: digest}
    return objs


def describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{meta.get('name')}"


# --------------------------------------------------------------------------------------------
# API access
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """One cluster to talk to: a kubeconfig and a context in it (None: its current context)."""

    kubeconfig: str | None
    context: str | None

    def __str__(self) -> str:
        return f"context {self.context or '(current)'} of {self.kubeconfig or '~/.kube/config'}"


class Kube:
    """A small apply/delete/get layer over the dynamic client, errors naming the object."""

    def __init__(self, target: Target) -> None:
        from kubernetes import config, dynamic

        self.target = target
        try:
            self.client = config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=target.kubeconfig, context=target.context)
        except (config.ConfigException, OSError) as e:
            raise InstallUsageError(f"{target}: cannot use it: {e}") from e
        self.dyn: Any = dynamic.DynamicClient(self.client)  # type: ignore[no-untyped-call]

    def _resource(self, api_version: str, kind: str) -> Any:
        from kubernetes.dynamic import exceptions

        try:
            return self.dyn.resources.get(api_version=api_version, kind=kind)
        except exceptions.ResourceNotFoundError:
            self.dyn.resources.invalidate_cache()  # a CRD created a moment ago
            try:
                return self.dyn.resources.get(api_version=api_version, kind=kind)
            except exceptions.ResourceNotFoundError:
                raise InstallError(f"{self.target}: the API server does not serve {kind} ({api_version})") from None

    def serves(self, obj: dict[str, Any]) -> bool:
        try:
            self._resource(obj["apiVersion"], obj["kind"])
            return True
        except InstallError:
            return False

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        from kubernetes.dynamic import exceptions

        res = self._resource(api_version, kind)
        try:
            out: dict[str, Any] = res.get(name=name, namespace=namespace).to_dict()
            return out
        except exceptions.NotFoundError:
            return None
        except exceptions.DynamicApiError as e:
            raise InstallError(f"{self.target}: cannot read {kind} {name}: {_reason(e)}") from e

    def list(self, api_version: str, kind: str) -> list[dict[str, Any]]:
        from kubernetes.dynamic import exceptions

        try:
            items: list[dict[str, Any]] = self._resource(api_version, kind).get().to_dict().get("items") or []
            return items
        except exceptions.DynamicApiError as e:
            raise InstallError(f"{self.target}: cannot list {kind}: {_reason(e)}") from e

    def apply(self, obj: dict[str, Any], replace_spec: bool = False) -> str:
        """Create ``obj`` or bring the live one to it: ``created``, ``configured`` or ``unchanged``.

        Labels and annotations are merged; other top-level fields are replaced (``spec`` of a
        Cluster wholesale with ``replace_spec``, so fields dropped from a join go away)."""
        from kubernetes.dynamic import exceptions

        meta = obj["metadata"]
        res = self._resource(obj["apiVersion"], obj["kind"])
        live = self.get(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        try:
            if live is None:
                res.create(body=obj, namespace=meta.get("namespace"))
                return "created"
            if not _differs(live, obj):
                return "unchanged"
            if replace_spec:
                body = copy.deepcopy(live)
                body.pop("status", None)
                for k, v in obj.items():
                    if k != "metadata":
                        body[k] = v
                lm = body["metadata"]
                for k in ("labels", "annotations"):
                    if meta.get(k):
                        lm[k] = {**(lm.get(k) or {}), **meta[k]}
                res.replace(body=body, namespace=meta.get("namespace"))
            else:
                res.patch(body=obj, name=meta["name"], namespace=meta.get("namespace"),
                          content_type="application/merge-patch+json")  # fmt: skip
            return "configured"
        except exceptions.DynamicApiError as e:
            raise InstallError(f"{self.target}: cannot apply {describe(obj)}: {_reason(e)}") from e

    def delete(self, obj: dict[str, Any]) -> str:
        from kubernetes.dynamic import exceptions

        meta = obj["metadata"]
        try:
            res = self._resource(obj["apiVersion"], obj["kind"])
        except InstallError:
            return "absent"  # its CRD is gone already
        try:
            res.delete(name=meta["name"], namespace=meta.get("namespace"))
            return "deleted"
        except exceptions.NotFoundError:
            return "absent"
        except exceptions.DynamicApiError as e:
            raise InstallError(f"{self.target}: cannot delete {describe(obj)}: {_reason(e)}") from e


def _reason(e: Any) -> str:
    body = getattr(e, "body", None)
    with contextlib.suppress(ValueError, TypeError):
        return str(json.loads(body or "").get("message"))
    return f"{getattr(e, 'status', '?')} {getattr(e, 'reason', e)}"


def _differs(live: dict[str, Any], want: dict[str, Any]) -> bool:
    for k, v in want.items():
        if k == "metadata":
            for mk in ("labels", "annotations"):
                have = (live.get("metadata") or {}).get(mk) or {}
                if any(have.get(a) != b for a, b in (v.get(mk) or {}).items()):
                    return True
        elif k not in ("apiVersion", "kind") and live.get(k) != v:
            return True
    return False


def _wait(pred: Callable[[], Any], timeout_s: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise InstallError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval)


def _print_objects(objs: Sequence[dict[str, Any]], verb: str) -> None:
    for o in objs:
        print(f"# would {verb} {describe(o)}")
    if verb == "apply":
        print(yaml.safe_dump_all(objs, sort_keys=False), end="")


# --------------------------------------------------------------------------------------------
# The lab's side: where its kubeconfig is, which context is the host, its reflector
# --------------------------------------------------------------------------------------------


def _lab_state(name: str) -> lab.LabState:
    state = lab.load_state(name)
    if state is None:
        raise InstallUsageError(f"no lab {name!r} is running (fabric-tool lab up ... --name {name})")
    if not state.kubernetes:
        raise InstallUsageError(f"lab {name} runs no Kubernetes API servers (its topology lacks 'kubernetes: true')")
    return state


def _install_record(state: lab.LabState) -> Path:
    return state.state_dir / "fabric-install.json"


def _lab_host(state: lab.LabState) -> str | None:
    try:
        host = json.loads(_install_record(state).read_text()).get("host_context")
    except (OSError, ValueError):
        return None
    return host if isinstance(host, str) else None


def _reflector_args(state: lab.LabState, host: lab.ClusterRecord, kubeconfig: Path, hold: float) -> list[str]:
    """The lab reflector's topology source once installed: the host's Cluster resources."""
    assert host.apiserver is not None
    return [
        "--topology-source", "kubernetes",
        "--kubeconfig", str(kubeconfig),
        # The emulated API servers listen on 127.0.0.1 of the machine; the reflector lives in
        # the lab namespace. Only its Kubernetes client threads enter the servers' namespace.
        "--kube-netns", f"/proc/{host.apiserver.pid}/ns/net",
        "--status-lease", f"{NAMESPACE}/{REFLECTOR_NAME}",
        "--status-lease-identity", f"lab-{state.name}",
        "--startup-hold", f"{hold:g}",
    ]  # fmt: skip


def _restart_lab_reflector(state: lab.LabState, args: list[str] | None, progress: Progress) -> None:
    """Run the lab's reflector with source ``args`` (None: the lab's own topology file); the lab
    keeps them in its state, so ``lab start-reflector`` later starts the same reflector."""
    rec = state.reflector
    if rec is not None and rec.running():
        if state.reflector_args == args:
            progress(f"lab {state.name}: the reflector already runs with this topology source (pid {rec.pid})")
            return
        nsutil.terminate([(rec.pid, rec.start)], grace_s=10.0)
        state.reflector = None
    state.reflector_args = args
    new = lab.start_reflector(state)
    progress(f"lab {state.name}: reflector restarted (pid {new.pid}, log {new.log})")
    lab.wait_reflector(state, time.monotonic() + 30.0, progress)


# --------------------------------------------------------------------------------------------
# install / uninstall
# --------------------------------------------------------------------------------------------


def install(host: Target, *, lab_name: str | None = None, dry_run: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
            progress: Progress = _progress) -> int:
    state = _lab_state(lab_name) if lab_name else None
    objs = host_objects(for_lab=state is not None)
    if dry_run:
        _print_objects(objs, "apply")
        if state is not None:
            print(f"# would restart the reflector of lab {state.name} with --topology-source=kubernetes "
                  f"(host context {host.context})")
        return 0
    kube = Kube(host)
    for obj in objs:
        if state is not None and not kube.serves(obj):
            # The lab's emulated API server has no RBAC (it authorizes nothing either).
            progress(f"install: {describe(obj)} skipped: the lab's API server does not serve {obj['kind']}")
            continue
        progress(f"install: {describe(obj)} {kube.apply(obj)}")
        if obj["kind"] == "CustomResourceDefinition":
            _wait(lambda: _served(kube), timeout_s, f"{crd.PLURAL}.{crd.GROUP} to be served by {host}")
    if state is None:
        progress(f"install: done; the reflector runs as Deployment {NAMESPACE}/{REFLECTOR_NAME} in {host}")
        return 0
    with lab.locked(state.name):
        state = _lab_state(state.name)
        hc = next((c for c in state.clusters if c.name == host.context), None)
        if hc is None or hc.apiserver is None or not hc.apiserver.running():
            raise InstallUsageError(f"lab {state.name}: --context {host.context} is not a cluster of the lab with a "
                                    f"running API server ({', '.join(c.name for c in state.clusters)})")
        # The reflector gets a kubeconfig with the host only, as a ServiceAccount would.
        kc = yaml.safe_load(state.kubeconfig.read_text())
        kc["contexts"] = [c for c in kc["contexts"] if c["name"] == hc.name]
        kc["clusters"] = [c for c in kc["clusters"] if c["name"] == hc.name]
        kc["users"] = [u for u in kc["users"] if u["name"] == kc["contexts"][0]["context"]["user"]]
        kc["current-context"] = hc.name
        path = state.state_dir / "reflector-kubeconfig"
        path.write_text(yaml.safe_dump(kc, sort_keys=False))
        path.chmod(0o600)
        _install_record(state).write_text(json.dumps({"host_context": hc.name}) + "\n")
        lab.mount_bpffs(state)
        # A first install holds nothing back (no Cluster can have nodes yet); a reinstall waits
        # for the nodes the Cluster statuses list, as a restarted Deployment would.
        clusters = kube.list(crd.API_VERSION, crd.KIND)
        hold = (state.grace_period_s or 30.0) if clusters else 0.0
        _restart_lab_reflector(state, _reflector_args(state, hc, path, hold), progress)
    progress(f"install: done; lab {state.name}'s reflector reads Cluster resources from {hc.name}")
    return 0


def _served(kube: Kube) -> bool:
    return kube.serves({"apiVersion": crd.API_VERSION, "kind": crd.KIND})


def uninstall(host: Target, *, lab_name: str | None = None, dry_run: bool = False, force: bool = False,
              progress: Progress = _progress) -> int:
    state = _lab_state(lab_name) if lab_name else None
    objs = list(reversed(host_objects(for_lab=state is not None)))
    if dry_run:
        _print_objects(objs, "delete")
        return 0
    kube = Kube(host)
    left = [c["metadata"]["name"] for c in kube.list(crd.API_VERSION, crd.KIND)] if _served(kube) else []
    if left and not force:
        raise InstallError(f"Clusters {', '.join(sorted(left))} are still joined in {host}: unjoin them first "
                           "(or --force, which leaves their members' agents and dataplanes as they are)")
    if state is not None:
        with lab.locked(state.name):
            state = _lab_state(state.name)
            _restart_lab_reflector(state, None, progress)
            with contextlib.suppress(FileNotFoundError):
                _install_record(state).unlink()
            with contextlib.suppress(FileNotFoundError):
                (state.state_dir / "reflector-kubeconfig").unlink()
    for obj in objs:
        if state is not None and not kube.serves(obj):
            continue
        progress(f"uninstall: {describe(obj)} {kube.delete(obj)}")
    return 0


# --------------------------------------------------------------------------------------------
# join / unjoin
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JoinOptions:
    network_type: str | None = None
    ip_families: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    service_cidrs: tuple[str, ...] = ()
    global_cidrs: tuple[tuple[str, str], ...] = ()
    gateways: tuple[str, ...] = ()
    default_nic: str | None = None
    autodetection_method: str | None = None
    #: ``(node, interface)`` pairs for ``nicNodeNames``; None: keep the live Cluster's.
    nic_overrides: tuple[tuple[str, str], ...] | None = None


def discover_cidrs(member: Kube) -> tuple[list[str], list[str]]:
    """The member's pod CIDRs now (its Nodes' ``spec.podCIDRs``, collapsed: for the conflict
    check and progress only, never written) and service CIDRs (its ServiceCIDR objects when the
    API serves them)."""
    pods: list[str] = []
    for node in member.list("v1", "Node"):
        spec = node.get("spec") or {}
        pods += spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    nets = [ipaddress.ip_network(c, strict=False) for c in pods]
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    collapsed = [str(n) for n in ipaddress.collapse_addresses(v4)] + [str(n) for n in ipaddress.collapse_addresses(v6)]
    services: list[str] = []
    with contextlib.suppress(InstallError):
        for sc in member.list("networking.k8s.io/v1", "ServiceCIDR"):
            services += (sc.get("spec") or {}).get("cidrs") or []
    return collapsed, services


def cluster_object(name: str, opts: JoinOptions, pods: Sequence[str], services: Sequence[str]) -> dict[str, Any]:
    link: dict[str, Any] = {}
    if opts.network_type:
        link["networkType"] = opts.network_type
    if opts.ip_families:
        link["ipFamilies"] = list(opts.ip_families)
    if pods:
        link["podCIDRs"] = list(pods)
    if services:
        link["serviceCIDRs"] = list(services)
    if opts.global_cidrs:
        link["globalCIDRsMap"] = dict(opts.global_cidrs)
    if opts.gateways:
        link["gatewayCandidates"] = list(opts.gateways)
    if opts.default_nic:
        link["defaultNICName"] = opts.default_nic
    if opts.autodetection_method:
        link["autodetectionMethod"] = opts.autodetection_method
    if opts.nic_overrides:
        by_nic: dict[str, list[str]] = {}
        for node, nic in opts.nic_overrides:
            by_nic.setdefault(nic, []).append(node)
        link["nicNodeNames"] = [{"interfaceName": nic, "nodeName": nodes} for nic, nodes in by_nic.items()]
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name},
            "spec": {"clusterLinkOptions": link}}


def keep_live_underlay(obj: dict[str, Any], opts: JoinOptions, live: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the live Cluster's ``defaultNICName``, ``autodetectionMethod`` and
    ``nicNodeNames`` where the join gave none of its own.

    These settings act in the member (the agents choose their underlay from them at start-up;
    the agents cannot read the host's Cluster), so join is what carries them there: a
    ``kubectl patch`` of them in the host is kept by the next join, which writes it into the
    member's ConfigMap and so rolls the agents. Every other field is the join's alone, as before
    (join replaces the spec)."""
    have = ((live.get("spec") or {}).get("clusterLinkOptions") or {})
    link = dict(obj["spec"]["clusterLinkOptions"])
    given = {"defaultNICName": opts.default_nic, "autodetectionMethod": opts.autodetection_method,
             "nicNodeNames": opts.nic_overrides}  # fmt: skip
    for key, flag in given.items():
        if flag is None and key in have:
            link[key] = copy.deepcopy(have[key])
    return {**obj, "spec": {**obj["spec"], "clusterLinkOptions": link}}


def _cond(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            out: dict[str, Any] = c
            return out
    return {}


def join(name: str, host: Target, member: Target, opts: JoinOptions, *, lab_name: str | None = None,
         reflector: str | None = None, dry_run: bool = False, wait: bool = True,
         timeout_s: float = DEFAULT_TIMEOUT_S, progress: Progress = _progress) -> int:
    state = _lab_state(lab_name) if lab_name else None
    if state is not None and not any(c.name == name for c in state.clusters):
        names = ", ".join(c.name for c in state.clusters)
        raise InstallUsageError(f"lab {state.name} has no cluster {name!r} ({names})")
    if state is None and not reflector and not dry_run:
        raise InstallUsageError("join outside a lab needs --reflector HOST:PORT (how the member's agents reach "
                                "the reflector Service)")
    mkube = Kube(member)
    pods, services = list(opts.pod_cidrs), list(opts.service_cidrs)
    found_pods, found_svcs = discover_cidrs(mkube)
    if pods:
        progress(f"join {name}: pod CIDRs fixed by --pod-cidr: {', '.join(pods)} (every node's must lie inside)")
    else:
        progress(f"join {name}: pod CIDRs discovered from the nodes' announcements (discovery mode; the "
                 f"member's Nodes have {', '.join(found_pods) or 'none yet'})")
    if not services and found_svcs:
        services = found_svcs
        progress(f"join {name}: service CIDRs from the member's ServiceCIDRs: {', '.join(services)}")
    obj = cluster_object(name, opts, pods, services)
    try:
        spec = crd.parse_cluster(obj)
    except crd.ClusterSpecError as e:
        raise InstallUsageError(f"Cluster {name}: {e}") from e
    member_objs = [] if state is not None else member_objects(name, reflector or "REFLECTOR:4880",
                                                              agent_underlay_data(spec))  # fmt: skip
    if dry_run:
        _print_objects([obj], "apply")
        _print_objects(member_objs, "apply")
        if state is not None:
            print(f"# would start the lab agents of cluster {name} that are not running")
        return 0
    hkube = Kube(host)
    if not _served(hkube):
        raise InstallUsageError(f"{host}: no Cluster CRD; run 'fabric-tool install' first")
    live = hkube.get(crd.API_VERSION, crd.KIND, name)
    if live is not None:
        obj = keep_live_underlay(obj, opts, live)
        try:
            spec = crd.parse_cluster(obj)
        except crd.ClusterSpecError as e:
            raise InstallUsageError(f"Cluster {name} (underlay settings kept from the live object): {e}") from e
        if state is None:
            member_objs = member_objects(name, reflector or "REFLECTOR:4880", agent_underlay_data(spec))
    others = [o for o in hkube.list(crd.API_VERSION, crd.KIND) if o["metadata"]["name"] != name]
    # Discovery-mode Clusters are checked with what they use now: the others' status, the
    # member's Nodes for this one.
    found = {n: crd.Discovered(pod_cidrs=p) for n, p in crd.status_pod_cidrs(others).items()}
    found[name] = crd.Discovered(pod_cidrs=tuple(found_pods))
    res = crd.resolve([*others, {**obj, "metadata": {"name": name, "creationTimestamp": "9999"}}], found)
    if name in res.problems:
        raise InstallError(f"Cluster {name} would conflict with the Clusters in {host}: "
                           + "; ".join(f"{p.field}: {p.reason}" for p in res.problems[name]))
    progress(f"join {name}: Cluster {name} {hkube.apply(obj, replace_spec=True)} in {host}")
    for o in member_objs:
        progress(f"join {name}: {describe(o)} {mkube.apply(o)} in {member}")
    if state is not None:
        _start_lab_agents(state.name, name, progress)
    if not wait:
        return 0
    nodes = sorted(n["metadata"]["name"] for n in mkube.list("v1", "Node"))
    if not nodes:
        progress(f"join {name}: the member has no Nodes yet; not waiting for any")
        return 0
    last = [""]

    def ready() -> bool:
        cur = hkube.get(crd.API_VERSION, crd.KIND, name)
        st = (cur or {}).get("status") or {}
        if st.get("observedGeneration") != (cur or {}).get("metadata", {}).get("generation"):
            return False
        acc = _cond(cur, "Accepted")
        if acc.get("status") == "False":
            raise InstallError(f"Cluster {name} not accepted ({acc.get('reason')}): {acc.get('message')}")
        have = {n["name"]: n.get("inSync") for n in (st.get("clusterLinkStatus") or {}).get("nodes") or []}
        done = [n for n in nodes if have.get(n)]
        msg = f"join {name}: {len(done)}/{len(nodes)} nodes in sync" + (
            f" (waiting for {', '.join(n for n in nodes if n not in done)})" if len(done) < len(nodes) else "")
        if msg != last[0]:
            progress(msg)
            last[0] = msg
        return len(done) == len(nodes) and _cond(cur, "Ready").get("status") == "True"

    _wait(ready, timeout_s, f"the nodes of {name} to be in sync ({host}: Cluster {name} status)")
    progress(f"join {name}: done")
    return 0


def _start_lab_agents(lab_name: str, cluster: str, progress: Progress) -> None:
    with lab.locked(lab_name):
        state = _lab_state(lab_name)
        for c in state.clusters:
            if c.name != cluster:
                continue
            for node in c.nodes:
                if node.agent is None or not node.agent.running():
                    rec = lab.start_agent(state, node)
                    progress(f"join {cluster}: started the lab agent of {node.key} (pid {rec.pid})")


def unjoin(name: str, host: Target, member: Target | None, *, lab_name: str | None = None,
           reflector: str | None = None, dry_run: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
           progress: Progress = _progress) -> int:
    state = _lab_state(lab_name) if lab_name else None
    obj = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name}}
    member_objs = [] if state is not None else [o for o in reversed(member_objects(name, "-"))
                                                if o["kind"] != "Namespace"]  # fmt: skip
    if dry_run:
        _print_objects([obj, *member_objs], "delete")
        if state is not None:
            print(f"# would stop the lab agents of cluster {name} and remove every fabric object from its nodes")
        return 0
    hkube = Kube(host)
    progress(f"unjoin {name}: Cluster {name} {hkube.delete(obj) if _served(hkube) else 'absent'} in {host}")
    status: Callable[[], api.FabricStatus | None] | None = None
    if state is not None:
        st = state

        def lab_status() -> api.FabricStatus | None:
            return lab.query_status(st)[0]

        status = lab_status
    elif reflector:
        from fabric.control import client

        def grpc_status() -> api.FabricStatus | None:
            with contextlib.suppress(Exception):
                return client.get_status_sync(reflector, 2.0)
            return None

        status = grpc_status
    if status is not None:
        get = status

        def withdrawn() -> bool:
            s = get()
            if s is None:
                return False
            if any(c.name == name for c in s.clusters):
                return False
            return all(n.in_sync for n in s.nodes() if n.connected)

        _wait(withdrawn, timeout_s, f"the reflector to withdraw cluster {name} from every peer")
        progress(f"unjoin {name}: no peer's plan references {name} any more")
    else:
        progress(f"unjoin {name}: no --reflector given: not waiting for the peers to drop {name}")
    if state is not None:
        _clean_lab_cluster(state.name, name, progress)
    elif member is not None:
        mkube = Kube(member)
        for o in member_objs:
            progress(f"unjoin {name}: {describe(o)} {mkube.delete(o)} in {member}")
    progress(f"unjoin {name}: done")
    return 0


def _clean_lab_cluster(lab_name: str, cluster: str, progress: Progress) -> None:
    """Stop the cluster's lab agents and remove every kernel object the fabric made on its nodes."""
    with lab.locked(lab_name):
        state = _lab_state(lab_name)
        c = next(c for c in state.clusters if c.name == cluster)
        running = [(n.agent.pid, n.agent.start) for n in c.nodes if n.agent is not None and n.agent.running()]
        nsutil.terminate(running, grace_s=10.0)
        for node in c.nodes:
            node.agent = None
        lab.save_state(state)
        for node in c.nodes:
            argv = [str(Path(sys.executable).parent / "fabric-agent"), "--cleanup", "--cluster", c.name,
                    "--node", node.name, "--bpf-pin-root", str(lab.bpf_dir(state.name))]  # fmt: skip
            proc = nsutil.spawn_in_netns(node.netns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise InstallError(f"unjoin {cluster}: cleanup of node {node.key} failed "
                                   f"({proc.returncode}): {out.decode(errors='replace')[-400:]}")
            progress(f"unjoin {cluster}: removed the fabric's objects from {node.key}")


def parse_global_cidr(text: str) -> tuple[str, str]:
    """``LOCAL=GLOBAL`` of ``--global-cidr``."""
    local, sep, glob = text.partition("=")
    if not sep or not local or not glob:
        raise ValueError(f"--global-cidr {text!r}: expected LOCAL=GLOBAL, e.g. 10.10.0.0/16=172.20.0.0/16")
    return local.strip(), glob.strip()


@contextlib.contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn client exceptions nobody anticipated into InstallError naming what failed."""
    try:
        yield
    except (InstallError, lab.LabError):
        raise
    except (OSError, ValueError) as e:
        raise InstallError(f"{type(e).__name__}: {e}") from e

