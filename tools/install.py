"""``fabric-tool install / join / unjoin / uninstall``: the fabric on Kubernetes, one command a step.

The objects come from ``deploy/base`` (one source of truth with ``kubectl apply -k``): the
kustomizations there are read by :func:`load_kustomization`, which understands exactly the
features they use (``resources``, ``namespace``, ``labels``) and refuses anything else.

What each step does, in order:

- ``install`` (host cluster): the Namespace, the Cluster CRD (waits until it is served), the
  reflector's RBAC, its Deployment and Service, and likewise kosmos-mcs, kosmos-tree and
  kosmos-scheduler (with the other CRDs of ``deploy/base/host``). Then the certificates
  (:func:`ensure_certificates`): the fabric CA, the reflector's server certificate, the
  add-ons' client certificates (``mcs/clusterset``, ``tree/<UID of kube-system>``,
  ``scheduler/kosmos-scheduler``) and kosmos-tree's kubelet serving certificate, each a Secret
  the manifests mount. With ``--lab NAME`` the reflector is the lab's
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
- ``join CLUSTER --tree [--leaf-model ...]``: then makes the member a ClusterTree leaf of the
  host (see "ClusterTree" at the end of this module: its kubeconfig Secret, the Cluster's
  ``clusterTreeOptions``, waiting for the virtual nodes); in a lab whose fabric comes from its
  topology file (no ``install``) only that part is done. ``unjoin`` of a leaf takes it out of
  the tree first (virtual nodes, the leaf's copies labelled with this root's id).
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

import base64
import contextlib
import copy
import dataclasses
import datetime
import functools
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
from fabric.control import api, identity, pki
from tools import lab, nsutil
from tools.lab import labpki, schedulers

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
    """Namespace, CRDs, the components' RBAC (and, outside a lab, their Deployments and Services).
    A lab keeps the scheduler's policy CRDs out: the lab installs them into every cluster itself
    (tools.lab.schedulers.install_crds) for its own schedulers, so ``uninstall`` must not delete them."""
    objs = load_kustomization(DEPLOY / "base" / "namespace.yaml") + load_kustomization(DEPLOY / "base" / "host")
    if not for_lab:
        return objs
    lab_crds = {d["metadata"]["name"] for d in schedulers.crd_manifests()}
    return [o for o in objs if o.get("kind") not in LAB_SKIPPED_KINDS
            and not (o.get("kind") == "CustomResourceDefinition" and o["metadata"]["name"] in lab_crds)]


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

    def list(self, api_version: str, kind: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        from kubernetes.dynamic import exceptions

        try:
            res = self._resource(api_version, kind)
            got = res.get(label_selector=label_selector) if label_selector else res.get()
            items: list[dict[str, Any]] = got.to_dict().get("items") or []
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
# Certificates (issue 20): the fabric CA and the reflector's certificate in the host, one
# bootstrap credential per member
# --------------------------------------------------------------------------------------------

#: The fabric CA (``ca.crt``, ``ca.key``) in the host: made by the first install, never
#: overwritten (every certificate of the fabric hangs on it); the reflector signs with it.
CA_SECRET = "kosmos-fabric-ca"
#: The reflector's server certificate (a ``kubernetes.io/tls`` Secret plus ``ca.crt``).
REFLECTOR_TLS_SECRET = "kosmos-fabric-reflector-tls"
#: ``kosmos-mcs``'s client certificate (identity :data:`MCS_IDENTITY`; deploy/base/host/mcs.yaml
#: mounts it as its ``--tls-dir``): it watches the reachability records and reads the status.
MCS_TLS_SECRET = "kosmos-mcs-tls"
MCS_IDENTITY = identity.role(identity.MCS, "clusterset")
MCS_CERT_LIFETIME = datetime.timedelta(days=365)
#: ``kosmos-tree``'s client certificate (deploy/base/host/tree.yaml): identity ``tree/<root id>``,
#: the root id being the UID of the host's ``kube-system`` namespace (kosmos-tree's ``--root-id``
#: default, read as :func:`tree.main.root_id` reads it); the reflector lets it publish only as that.
TREE_TLS_SECRET = "kosmos-tree-tls"
#: The serving certificate of ``kosmos-tree``'s kubelet server (kubectl logs/exec through the
#: virtual nodes), a ``kubernetes.io/tls`` Secret. kube-apiserver checks a kubelet's certificate
#: only with ``--kubelet-certificate-authority``; it is issued from the fabric CA for the
#: Service's names so that such a check can be set up with that CA.
TREE_KUBELET_TLS_SECRET = "kosmos-tree-kubelet-tls"
TREE_NAME = "kosmos-tree"
#: ``kosmos-scheduler``'s client certificate (deploy/base/host/scheduler.yaml): it reads the tree
#: manager's and the fabric's records as :data:`SCHEDULER_IDENTITY`.
SCHEDULER_TLS_SECRET = "kosmos-scheduler-tls"
SCHEDULER_IDENTITY = identity.role(identity.SCHEDULER, "kosmos-scheduler")
#: Lifetime of the add-ons' certificates (issued again by the next install once no longer valid).
ADDON_CERT_LIFETIME = datetime.timedelta(days=365)
#: A member's bootstrap credential (``bootstrap/<cluster>``), mounted by the agent DaemonSet:
#: agents exchange it for their own certificates (fabric.control.bootstrap).
BOOTSTRAP_SECRET = "kosmos-fabric-bootstrap"
DEFAULT_BOOTSTRAP_TTL_S = 3600.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tls_secret(name: str, cert: bytes, key: bytes, ca: bytes, secret_type: str = "kubernetes.io/tls") -> dict[str, Any]:
    """A TLS directory as a Secret: mounted, it is a ``--tls-dir`` (tls.crt, tls.key, ca.crt)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": secret_type,
            "metadata": {"name": name, "namespace": NAMESPACE},
            "data": {pki.CERT_FILE: _b64(cert), pki.KEY_FILE: _b64(key), pki.CA_FILE: _b64(ca)}}  # fmt: skip


def ca_secret(ca: pki.CA) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": CA_SECRET, "namespace": NAMESPACE},
            "data": {pki.CA_FILE: _b64(ca.pem), pki.CA_KEY_FILE: _b64(pki.key_pem(ca.key))}}  # fmt: skip


def _secret_bytes(obj: dict[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode((obj.get("data") or {})[key])
    except (KeyError, ValueError, TypeError):
        raise InstallError(f"Secret {describe(obj)}: no valid {key!r}") from None


def ca_from_secret(obj: dict[str, Any]) -> pki.CA:
    try:
        ca = pki.CA(pki.load_key(_secret_bytes(obj, pki.CA_KEY_FILE), f"{CA_SECRET} {pki.CA_KEY_FILE}"),
                    pki.load_cert(_secret_bytes(obj, pki.CA_FILE), f"{CA_SECRET} {pki.CA_FILE}"))  # fmt: skip
    except pki.PKIError as e:
        raise InstallError(f"Secret {NAMESPACE}/{CA_SECRET}: {e}") from None
    if not pki.key_matches(ca.key, ca.cert):
        raise InstallError(f"Secret {NAMESPACE}/{CA_SECRET}: {pki.CA_KEY_FILE} is not the key of {pki.CA_FILE}")
    return ca


#: The names clients dial the reflector Service by.
REFLECTOR_DNS = (REFLECTOR_NAME, f"{REFLECTOR_NAME}.{NAMESPACE}", f"{REFLECTOR_NAME}.{NAMESPACE}.svc",
                 f"{REFLECTOR_NAME}.{NAMESPACE}.svc.cluster.local")  # fmt: skip


def reflector_tls_secret(ca: pki.CA, ips: Sequence[str] = ()) -> dict[str, Any]:
    key = pki.new_key()
    cert = ca.sign_server(key.public_key(), dns_names=REFLECTOR_DNS, ips=ips)
    return tls_secret(REFLECTOR_TLS_SECRET, pki.cert_pem(cert), pki.key_pem(key), ca.pem)


def bootstrap_secret(ca: pki.CA, cluster: str, ttl_s: float = DEFAULT_BOOTSTRAP_TTL_S) -> dict[str, Any]:
    """The member's bootstrap credential: ``bootstrap/<cluster>``, ``ttl_s`` long, key made here
    (it is a credential handed over, not a node's own key)."""
    key = pki.new_key()
    who = identity.role(identity.BOOTSTRAP, cluster)
    cert = ca.sign_client(who, key.public_key(), lifetime=datetime.timedelta(seconds=ttl_s))
    return tls_secret(BOOTSTRAP_SECRET, pki.cert_pem(cert), pki.key_pem(key), ca.pem)


def client_tls_secret(ca: pki.CA, name: str, who: identity.Identity,
                      lifetime: datetime.timedelta = ADDON_CERT_LIFETIME) -> dict[str, Any]:
    """An add-on's client certificate Secret ``name`` (identity ``who``, key made here), mounted
    as its ``--tls-dir``."""
    key = pki.new_key()
    cert = ca.sign_client(who, key.public_key(), lifetime=lifetime)
    return tls_secret(name, pki.cert_pem(cert), pki.key_pem(key), ca.pem)


def mcs_tls_secret(ca: pki.CA) -> dict[str, Any]:
    """``kosmos-mcs``'s client certificate (:data:`MCS_IDENTITY`, a year; ``install`` issues it
    again once it is no longer acceptable, as the reflector's)."""
    return client_tls_secret(ca, MCS_TLS_SECRET, MCS_IDENTITY, MCS_CERT_LIFETIME)


def tree_identity(kube: Kube, target: Target) -> identity.Identity:
    """``tree/<root id>`` of the host: the UID of its ``kube-system`` namespace, as kosmos-tree
    derives its root id when the Deployment passes no ``--root-id``."""
    ns = kube.get("v1", "Namespace", "kube-system")
    uid = ((ns or {}).get("metadata") or {}).get("uid")
    if not uid:
        raise InstallError(f"{target}: namespace kube-system {'has no metadata.uid' if ns else 'not found'}: "
                           f"kosmos-tree's root id (and its certificate tree/<root id>) comes from it")
    try:
        return identity.role(identity.TREE, str(uid))
    except ValueError as e:
        raise InstallError(f"{target}: kube-system's UID as kosmos-tree's root id: {e}") from None


#: The names kosmos-tree's kubelet server is known by in the host (its Service).
TREE_KUBELET_DNS = (TREE_NAME, f"{TREE_NAME}.{NAMESPACE}", f"{TREE_NAME}.{NAMESPACE}.svc",
                    f"{TREE_NAME}.{NAMESPACE}.svc.cluster.local")  # fmt: skip


def tree_kubelet_tls_secret(ca: pki.CA) -> dict[str, Any]:
    """The serving certificate of kosmos-tree's kubelet server (:data:`TREE_KUBELET_TLS_SECRET`)."""
    key = pki.new_key()
    cert = ca.sign_server(key.public_key(), dns_names=TREE_KUBELET_DNS)
    return tls_secret(TREE_KUBELET_TLS_SECRET, pki.cert_pem(cert), pki.key_pem(key), ca.pem)


def ensure_certificates(kube: Kube, target: Target, progress: Progress, ca: pki.CA | None = None) -> pki.CA:
    """install: the CA Secret (made with ``ca`` or a new CA when absent; an existing one is kept,
    never overwritten), the reflector's server certificate Secret, the add-ons' client
    certificate Secrets (``kosmos-mcs``, ``kosmos-tree`` as ``tree/<root id>``,
    ``kosmos-scheduler``) and ``kosmos-tree``'s kubelet serving certificate (each made again when
    absent or not acceptable under the CA: expired, another CA, another usage, another identity)."""
    live = kube.get("v1", "Secret", CA_SECRET, NAMESPACE)
    if live is None:
        ca = ca or pki.make_ca()
        kube.apply(ca_secret(ca))
        progress(f"install: Secret {NAMESPACE}/{CA_SECRET} created in {target} (the fabric CA)")
    else:
        ca = ca_from_secret(live)
        progress(f"install: Secret {NAMESPACE}/{CA_SECRET} kept (the fabric CA is never replaced)")
    _ensure_leaf_secret(kube, ca, progress, REFLECTOR_TLS_SECRET, "server", reflector_tls_secret)
    tree_who = tree_identity(kube, target)
    for name, who, lifetime in ((MCS_TLS_SECRET, MCS_IDENTITY, MCS_CERT_LIFETIME),
                                (TREE_TLS_SECRET, tree_who, ADDON_CERT_LIFETIME),
                                (SCHEDULER_TLS_SECRET, SCHEDULER_IDENTITY, ADDON_CERT_LIFETIME)):
        _ensure_leaf_secret(kube, ca, progress, name, "client",
                            functools.partial(client_tls_secret, name=name, who=who, lifetime=lifetime), who=who)
    _ensure_leaf_secret(kube, ca, progress, TREE_KUBELET_TLS_SECRET, "server", tree_kubelet_tls_secret)
    return ca


def _ensure_leaf_secret(kube: Kube, ca: pki.CA, progress: Progress, name: str, usage: pki.Usage,
                        make: Callable[[pki.CA], dict[str, Any]], who: identity.Identity | None = None) -> None:
    """The certificate Secret ``name``: kept while acceptable for ``usage`` under ``ca`` (and,
    given ``who``, of that identity: kosmos-tree's follows the host's root id), else ``make``
    issues it again (the Secret's data replaced whole)."""
    live = kube.get("v1", "Secret", name, NAMESPACE)
    why = "absent"
    if live is not None:
        try:
            cert = _secret_bytes(live, pki.CERT_FILE)
            why = pki.explain(cert, ca.pem, usage) or ""
            if not why and who is not None:
                have = pki.certificate_identity(pki.load_cert(cert, f"Secret {NAMESPACE}/{name}"))
                why = "" if have == who else f"its identity is {have}, not {who}"
        except (InstallError, ValueError) as e:  # no certificate, or not one identity URI (PKIError)
            why = str(e)
    if not why:
        progress(f"install: Secret {NAMESPACE}/{name} kept (valid under the CA)")
        return
    obj = make(ca)
    if live is not None:
        kube.delete(obj)  # a kubernetes.io/tls Secret's data is replaced whole
    kube.apply(obj)
    progress(f"install: Secret {NAMESPACE}/{name} issued ({why})")


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
    ensure_certificates(kube, host, progress, labpki.ensure_ca(state) if state is not None else None)
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
    #: ``activeGateways`` (None: left to the CRD's default, 1).
    active_gateways: int | None = None
    default_nic: str | None = None
    autodetection_method: str | None = None
    #: ``(node, interface)`` pairs for ``nicNodeNames``; None: keep the live Cluster's.
    nic_overrides: tuple[tuple[str, str], ...] | None = None
    #: Lifetime of the member's bootstrap credential (seconds; ``--bootstrap-ttl``).
    bootstrap_ttl_s: float = DEFAULT_BOOTSTRAP_TTL_S


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
    if opts.active_gateways is not None:
        link["activeGateways"] = opts.active_gateways
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


def lab_fabric_installed(state: lab.LabState) -> bool:
    """Does the lab's reflector read Cluster resources (``fabric-tool install --lab``)? If not,
    its fabric comes from the topology file and holds every lab cluster already."""
    return _lab_host(state) is not None


def lab_host_context(state: lab.LabState) -> str | None:
    """The lab's host cluster: the one ``install`` used, else the topology's ``role: host``."""
    host = state.host_cluster
    return _lab_host(state) or (host.name if host is not None else None)


def join(name: str, host: Target, member: Target, opts: JoinOptions, *, tree: Sequence[str] | None = None,
         lab_name: str | None = None, reflector: str | None = None, dry_run: bool = False, wait: bool = True,
         timeout_s: float = DEFAULT_TIMEOUT_S, progress: Progress = _progress) -> int:
    """The fabric part (Cluster, agents, in sync), then with ``tree`` (the ``--leaf-model``
    values, ``[]`` for the default) the tree part (:func:`join_tree`). In a lab whose fabric
    comes from its topology file (no ``install``) only the tree part is done: its reflector
    links every lab cluster already."""
    state = _lab_state(lab_name) if lab_name else None
    if state is not None and not any(c.name == name for c in state.clusters):
        names = ", ".join(c.name for c in state.clusters)
        raise InstallUsageError(f"lab {state.name} has no cluster {name!r} ({names})")
    if tree is not None:
        tree_options(name, tree)  # usage errors before anything is written
        if (host.kubeconfig, host.context) == (member.kubeconfig, member.context):
            raise InstallUsageError(f"join {name} --tree: the member is the host itself ({host}); a cluster is no "
                                    "leaf of itself")
    if state is not None and not lab_fabric_installed(state):
        if tree is None:
            raise InstallUsageError(f"lab {state.name}: run 'fabric-tool install --lab {state.name}' first (or "
                                    "join --tree: the lab's fabric comes from its topology file)")
        progress(f"join {name}: lab {state.name}'s fabric comes from its topology file (no 'fabric-tool install'), "
                 f"{name} is in it already: joining the tree only")
    else:
        rc = _join_fabric(name, host, member, opts, state=state, reflector=reflector, dry_run=dry_run, wait=wait,
                          timeout_s=timeout_s, progress=progress)
        if rc != 0 or tree is None:
            return rc
    assert tree is not None
    return join_tree(name, host, member, tree, dry_run=dry_run, wait=wait, timeout_s=timeout_s, progress=progress)


def keep_live_tree(obj: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the live Cluster's ``clusterTreeOptions``: a fabric join leaves the tree as it
    is (``join --tree`` writes it afterwards)."""
    have = (live.get("spec") or {}).get("clusterTreeOptions")
    if not have:
        return obj
    return {**obj, "spec": {**obj["spec"], "clusterTreeOptions": copy.deepcopy(have)}}


def _join_fabric(name: str, host: Target, member: Target, opts: JoinOptions, *, state: lab.LabState | None,
                 reflector: str | None, dry_run: bool, wait: bool, timeout_s: float, progress: Progress) -> int:
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
        obj = keep_live_tree(keep_live_underlay(obj, opts, live), live)
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
    if state is None:
        # A fresh bootstrap credential at every join (the agents mount it; once they hold their
        # own certificates they need it no more): signed with the host's fabric CA.
        ca_obj = hkube.get("v1", "Secret", CA_SECRET, NAMESPACE)
        if ca_obj is None:
            raise InstallUsageError(f"{host}: no Secret {NAMESPACE}/{CA_SECRET}; run 'fabric-tool install' first")
        boot = bootstrap_secret(ca_from_secret(ca_obj), name, opts.bootstrap_ttl_s)
        mkube.delete(boot)  # replaced whole: a new key and certificate
        mkube.apply(boot)
        progress(f"join {name}: Secret {NAMESPACE}/{BOOTSTRAP_SECRET} (bootstrap/{name}, valid "
                 f"{opts.bootstrap_ttl_s:g} s) in {member}")
    else:
        _start_lab_agents(state.name, name, progress)
    if not wait:
        return 0
    # A ClusterTree host's virtual nodes (label kosmos.io/node=true, tainted NoSchedule) run no
    # agent: they are leaf clusters, in the fabric through their own Clusters.
    nodes = sorted(n["metadata"]["name"] for n in mkube.list("v1", "Node") if not _is_virtual_node(n))
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


def _is_virtual_node(node: dict[str, Any]) -> bool:
    from tree import vnode

    return vnode.owner(node) is not None


def _start_lab_agents(lab_name: str, cluster: str, progress: Progress) -> None:
    with lab.locked(lab_name):
        state = _lab_state(lab_name)
        for c in state.clusters:
            if c.name != cluster:
                continue
            labpki.bootstrap_dir(state, cluster)  # the member's bootstrap credential
            for node in c.nodes:
                if node.agent is None or not node.agent.running():
                    rec = lab.start_agent(state, node)
                    progress(f"join {cluster}: started the lab agent of {node.key} (pid {rec.pid})")


def unjoin(name: str, host: Target, member: Target | None, *, lab_name: str | None = None,
           reflector: str | None = None, dry_run: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
           progress: Progress = _progress) -> int:
    state = _lab_state(lab_name) if lab_name else None
    obj = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name}}
    member_objs = [] if state is not None else [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": BOOTSTRAP_SECRET, "namespace": NAMESPACE}},
        *(o for o in reversed(member_objects(name, "-")) if o["kind"] != "Namespace"),
    ]  # the bootstrap credential first: the cluster's agents can get no certificate any more
    fabric = state is None or lab_fabric_installed(state)
    if dry_run:
        print(f"# would take Cluster {name} out of the tree if it is a leaf: clusterTreeOptions.enable false, its "
              "virtual nodes and the leaf's objects labelled kosmos.io/root-cluster=<root id> removed")
        _print_objects([obj, *member_objs] if fabric else [obj], "delete")
        if state is not None and fabric:
            print(f"# would stop the lab agents of cluster {name} and remove every fabric object from its nodes")
        return 0
    hkube = Kube(host)
    live = hkube.get(crd.API_VERSION, crd.KIND, name) if _served(hkube) else None
    unjoin_tree(name, hkube, timeout_s=timeout_s, progress=progress)
    link = ((live or {}).get("spec") or {}).get("clusterLinkOptions") or {}
    if live is not None and link.get("enable") is False:
        fabric = False  # a Cluster made for the tree alone: never in the fabric through it
    progress(f"unjoin {name}: Cluster {name} {hkube.delete(obj) if _served(hkube) else 'absent'} in {host}")
    if not fabric:
        progress(f"unjoin {name}: not in the fabric through its Cluster "
                 + (f"(lab {state.name}'s fabric comes from its topology file)" if state is not None
                    else "(clusterLinkOptions.enable false)") + ": nothing to withdraw; done")
        return 0
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
        labpki.remove_bootstrap(state, cluster)  # its agents can get no certificate any more
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



# --------------------------------------------------------------------------------------------
# ClusterTree: join --tree / unjoin of a leaf
# --------------------------------------------------------------------------------------------
#
# ``join CLUSTER --tree [--leaf-model ...]`` (and ``lab up`` for each ``tree:`` cluster, through
# :func:`join_tree`, the same code), in order:
#
# 1. the ``--leaf-model`` values read into ``spec.clusterTreeOptions`` and checked by the tree
#    manager's own reader (:func:`tree.spec.read`), before anything is written;
# 2. in the host: the Namespace and the Cluster CRD when missing (kosmos-tree reads Clusters);
#    the Secret ``kosmos-system/<cluster>-leaf-kubeconfig`` (key ``kubeconfig``: the member's
#    context alone, certificates inlined, as ``kubectl config view --minify --flatten``); the
#    Cluster's ``clusterTreeOptions`` referencing it (the rest of its spec kept; a Cluster made
#    for the tree alone gets ``clusterLinkOptions.enable: false``: not in the fabric through it);
# 3. wait until the virtual nodes the model calls for are in the host (made by kosmos-tree).
#
# ``unjoin`` of a tree leaf, before the fabric part: ``clusterTreeOptions.enable`` set false;
# the virtual nodes removed by kosmos-tree (waited for) or, when no kosmos-tree holds its Lease,
# here (with their Leases), saying so; then in the leaf every object of the kinds the tree syncs
# that carries this root's label ``kosmos.io/root-cluster=<root id>`` (root id: the UID of the
# host's kube-system namespace, as ``kosmos-tree`` takes it) is deleted with a UID precondition,
# and waited for; nothing else in the leaf is touched. Then the kubeconfig Secret goes.

#: The ``--leaf-model`` values: ``cluster``, ``node`` or ``party=<label selector>`` (repeatable).
LEAF_MODELS = ("cluster", "node", "party=SELECTOR")
#: Kinds the tree copies into a leaf (tree/identity.py): what unjoin removes there, by label.
TREE_SYNCED = (("pods", "Pod"), ("configmaps", "ConfigMap"), ("secrets", "Secret"),
               ("serviceaccounts", "ServiceAccount"), ("persistentvolumeclaims", "PersistentVolumeClaim"))
TOOL_LABEL = {"app.kubernetes.io/managed-by": "fabric-tool"}
#: The tree manager's Lease (``kosmos-tree`` defaults): a live holder means a manager runs.
TREE_LEASE = ("kube-system", "kosmos-tree")


def leaf_secret_name(cluster: str) -> str:
    return f"{cluster}-leaf-kubeconfig"


def _party_name(selector: str) -> str:
    """A party's ``leafNodeName`` from its selector (``pool=gpu`` -> ``pool-gpu``)."""
    import re

    name = re.sub(r"[^a-z0-9]+", "-", selector.lower()).strip("-")[:40].strip("-")
    return name or "party"


def _selector_object(text: str, where: str) -> dict[str, Any]:
    """A label selector string as a ``metav1.LabelSelector`` (upstream's grammar)."""
    from kubeemu.selectors import SelectorError, parse_labels

    try:
        reqs = parse_labels(text)
    except SelectorError as e:
        raise InstallUsageError(f"{where}: {e}") from None
    if not reqs:
        raise InstallUsageError(f"{where}: the party's label selector is empty")
    match: dict[str, str] = {}
    exprs: list[dict[str, Any]] = []
    ops = {"in": "In", "notin": "NotIn", "!=": "NotIn", "exists": "Exists", "!exists": "DoesNotExist"}
    for r in reqs:
        if r.op == "=" and r.key not in match:
            match[r.key] = next(iter(r.values))
            continue
        expr: dict[str, Any] = {"key": r.key, "operator": "In" if r.op == "=" else ops[r.op]}
        if r.op not in ("exists", "!exists"):
            expr["values"] = sorted(r.values)
        exprs.append(expr)
    out: dict[str, Any] = {}
    if match:
        out["matchLabels"] = match
    if exprs:
        out["matchExpressions"] = exprs
    return out


def tree_options(cluster: str, models: Sequence[str], *, where: str = "--leaf-model") -> dict[str, Any]:
    """``spec.clusterTreeOptions`` for ``models`` (``--leaf-model`` values; none: ``cluster``),
    the kubeconfig Secret referenced, checked by :func:`tree.spec.read`; usage errors name
    ``where`` and the value."""
    from tree import spec as treespec

    values = list(models) or ["cluster"]
    kinds = {v.partition("=")[0] for v in values}
    for v in values:
        kind, sep, _ = v.partition("=")
        if kind not in ("cluster", "node", "party") or (kind != "party" and sep) or (kind == "party" and not sep):
            raise InstallUsageError(f"{where} {v!r}: expected one of {', '.join(LEAF_MODELS)}")
    if len(kinds) > 1 or (kinds & {"cluster", "node"} and len(values) > 1):
        raise InstallUsageError(f"{where}: {', '.join(values)}: one leaf model per cluster (only party=SELECTOR "
                                "may be given more than once)")
    mode = kinds.pop()
    opts: dict[str, Any] = {"enable": True, "leafNodeMode": mode,
                            "kubeconfigSecretRef": {"namespace": NAMESPACE, "name": leaf_secret_name(cluster)}}
    if mode == "party":
        opts["leafModels"] = []
        for v in values:
            sel = v.partition("=")[2]
            opts["leafModels"].append({"leafNodeName": _party_name(sel),
                                       "nodeSelector": {"labelSelector": _selector_object(sel, f"{where} {v!r}")}})
    try:
        treespec.read({"metadata": {"name": cluster, "uid": "-"}, "spec": {"clusterTreeOptions": opts}})
    except treespec.SpecError as e:
        raise InstallUsageError(f"{where} {', '.join(values)}: {e}") from None
    return opts


def expected_virtual_nodes(cluster: str, opts: dict[str, Any], leaf_nodes: Sequence[str]) -> list[str]:
    """The virtual node names ``opts`` calls for (node mode: one per leaf node)."""
    mode = opts.get("leafNodeMode")
    if mode == "node":
        return sorted(leaf_nodes)
    if mode == "party":
        return sorted(f"kosmos-{cluster}-{m['leafNodeName']}" for m in opts.get("leafModels") or [])
    return [f"kosmos-{cluster}"]


def leaf_kubeconfig(target: Target) -> dict[str, Any]:
    """``target``'s context alone, certificates and token files inlined (``kubectl config view
    --minify --flatten``): what kosmos-tree, running elsewhere, needs to reach the leaf."""
    import base64
    import os

    path = Path(target.kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
                or Path.home() / ".kube" / "config")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InstallUsageError(f"{target}: cannot read the kubeconfig {path}: {e}") from e
    ctx_name = target.context or doc.get("current-context")
    ctx = next((c for c in doc.get("contexts") or [] if c.get("name") == ctx_name), None)
    if ctx is None:
        raise InstallUsageError(f"{target}: no context {ctx_name!r} in {path}")
    inner = ctx.get("context") or {}
    cluster = next((c for c in doc.get("clusters") or [] if c.get("name") == inner.get("cluster")), None)
    if cluster is None:
        raise InstallUsageError(f"{target}: context {ctx_name} names cluster {inner.get('cluster')!r}, not in {path}")
    user: dict[str, Any] = next((u for u in doc.get("users") or [] if u.get("name") == inner.get("user")), {})

    def inline(section: dict[str, Any], key: str, data_key: str) -> None:
        if section.get(key):
            f = Path(section.pop(key))
            f = f if f.is_absolute() else path.parent / f
            try:
                section[data_key] = base64.b64encode(f.read_bytes()).decode()
            except OSError as e:
                raise InstallUsageError(f"{target}: {key} {f}: {e.strerror}") from e

    cl: dict[str, Any] = copy.deepcopy(cluster.get("cluster") or {})
    us: dict[str, Any] = copy.deepcopy(user.get("user") or {})
    inline(cl, "certificate-authority", "certificate-authority-data")
    inline(us, "client-certificate", "client-certificate-data")
    inline(us, "client-key", "client-key-data")
    if us.get("tokenFile"):
        us["token"] = (Path(us.pop("tokenFile"))).read_text().strip()
    name = str(ctx_name)
    return {"apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": name, "cluster": cl}], "users": [{"name": name, "user": us}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name,
                                                    **({"namespace": inner["namespace"]} if inner.get("namespace")
                                                       else {})}}]}


def leaf_secret(cluster: str, kubeconfig: dict[str, Any]) -> dict[str, Any]:
    import base64

    from tree import spec as treespec

    text = yaml.safe_dump(kubeconfig, sort_keys=False)
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": leaf_secret_name(cluster), "namespace": NAMESPACE,
                         "labels": {**TOOL_LABEL, "kosmos.io/cluster": cluster}},
            "data": {treespec.KUBECONFIG_KEY: base64.b64encode(text.encode()).decode()}}


def _ensure_crd(hkube: Kube, host: Target, timeout_s: float, progress: Progress) -> None:
    """The Namespace and the Cluster CRD in the host, unless there (kosmos-tree reads Clusters)."""
    for obj in host_objects(for_lab=True):
        if obj["kind"] in ("Namespace", "CustomResourceDefinition"):
            got = hkube.apply(obj)
            if got != "unchanged":
                progress(f"join: {describe(obj)} {got} in {host}")
    _wait(lambda: _served(hkube), timeout_s, f"{crd.PLURAL}.{crd.GROUP} to be served by {host}")


def _owned_virtual_nodes(hkube: Kube, cluster: str) -> list[dict[str, Any]]:
    from tree import vnode

    return [n for n in hkube.list("v1", "Node", label_selector=vnode.NODE_SELECTOR)
            if (vnode.owner(n) or ("",))[0] == cluster]


def join_tree(name: str, host: Target, member: Target, models: Sequence[str], *, dry_run: bool = False,
              wait: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S, progress: Progress = _progress) -> int:
    """Make ``name`` a leaf of ``host`` (see "ClusterTree" above); ``models``: ``--leaf-model``."""
    opts = tree_options(name, models)
    secret = leaf_secret(name, leaf_kubeconfig(member))
    if dry_run:
        shown = {**secret, "data": {k: "<the member's kubeconfig, base64>" for k in secret["data"]}}
        _print_objects([shown], "apply")
        print(f"# would set spec.clusterTreeOptions of Cluster {name}:")
        print(yaml.safe_dump({"clusterTreeOptions": opts}, sort_keys=False), end="")
        return 0
    hkube = Kube(host)
    _ensure_crd(hkube, host, timeout_s, progress)
    progress(f"join {name}: {describe(secret)} {hkube.apply(secret)} in {host}")
    live = hkube.get(crd.API_VERSION, crd.KIND, name)
    spec = dict((live or {}).get("spec") or {"clusterLinkOptions": {"enable": False}})
    spec["clusterTreeOptions"] = opts
    obj = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name}, "spec": spec}
    progress(f"join {name}: Cluster {name} {hkube.apply(obj, replace_spec=True)} in {host} (tree: "
             f"{', '.join(models) or 'cluster'})")
    if not wait:
        return 0
    mkube = Kube(member)
    want = expected_virtual_nodes(name, opts, [n["metadata"]["name"] for n in mkube.list("v1", "Node")])
    last = [""]

    def made() -> bool:
        have = {n["metadata"]["name"] for n in _owned_virtual_nodes(hkube, name)}
        missing = [v for v in want if v not in have]
        msg = (f"join {name}: virtual nodes {len(want) - len(missing)}/{len(want)}"
               + (f" (waiting for {', '.join(missing)}: is kosmos-tree running against {host}?)" if missing else ""))
        if msg != last[0]:
            progress(msg)
            last[0] = msg
        return not missing

    _wait(made, timeout_s, f"kosmos-tree to make the virtual nodes of {name} ({', '.join(want)}) in {host}")
    progress(f"join {name}: tree done")
    return 0


def tree_manager_running(hkube: Kube, now: float | None = None) -> str | None:
    """The identity holding kosmos-tree's Lease while it is unexpired, else None."""
    import datetime

    lease = hkube.get("coordination.k8s.io/v1", "Lease", TREE_LEASE[1], TREE_LEASE[0])
    spec = (lease or {}).get("spec") or {}
    holder, renew = spec.get("holderIdentity"), spec.get("renewTime")
    if not holder or not renew:
        return None
    try:
        t = datetime.datetime.fromisoformat(str(renew).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    current = time.time() if now is None else now
    return str(holder) if t + float(spec.get("leaseDurationSeconds") or 15) > current else None


def _leaf_api_from_secret(hkube: Kube, secret_ref: dict[str, Any] | None) -> Any:
    """The leaf's API (scheduler.kube), from the Secret the Cluster references: the leaf the tree
    wrote into. None when there is no such Secret."""
    import base64

    from scheduler.kube import connect_kubeconfig
    from tree import spec as treespec

    if not secret_ref or not secret_ref.get("name"):
        return None
    sec = hkube.get("v1", "Secret", str(secret_ref["name"]), str(secret_ref.get("namespace") or NAMESPACE))
    raw = ((sec or {}).get("data") or {}).get(treespec.KUBECONFIG_KEY)
    if not raw:
        return None
    return connect_kubeconfig(yaml.safe_load(base64.b64decode(raw)), user_agent="fabric-tool")


def remove_leaf_copies(leaf: Any, root_id: str, timeout_s: float, progress: Progress, name: str) -> int:
    """Delete in the leaf every object of :data:`TREE_SYNCED` labelled as this root's (UID
    precondition: an object recreated meanwhile under the name is not deleted); wait until they
    are gone. Returns how many were deleted."""
    from scheduler.kube import ApiError, resource_path
    from tree import identity

    sel = f"{identity.ROOT_LABEL}={root_id}"

    def listed() -> list[tuple[str, dict[str, Any]]]:
        out = []
        for plural, kind in TREE_SYNCED:
            for o in leaf.get(resource_path("v1", plural), labelSelector=sel).get("items") or []:
                out.append((plural, {**o, "kind": kind}))
        return out

    first = listed()
    for plural, o in first:
        meta = o["metadata"]
        try:
            leaf.request("DELETE", resource_path("v1", plural, meta.get("namespace"), meta["name"]),
                         {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": meta.get("uid")}})
        except ApiError as e:
            if e.status not in (404, 409):
                raise InstallError(f"unjoin {name}: cannot delete {o['kind']} {meta.get('namespace')}/{meta['name']} "
                                   f"in the leaf: {e}") from e
    if first:
        progress(f"unjoin {name}: deleting {len(first)} objects the tree put into the leaf ({sel})")
    _wait(lambda: not listed(), timeout_s, f"the leaf's objects labelled {sel} to be gone", interval=0.5)
    return len(first)


def unjoin_tree(name: str, hkube: Kube, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                progress: Progress = _progress) -> bool:
    """Take ``name`` out of the tree (see "ClusterTree" above), the Cluster itself left for the
    caller. False when ``name`` is no tree leaf (nothing done)."""
    from tree import vnode

    live = hkube.get(crd.API_VERSION, crd.KIND, name) if _served(hkube) else None
    topts = dict(((live or {}).get("spec") or {}).get("clusterTreeOptions") or {})
    nodes = _owned_virtual_nodes(hkube, name)
    if live is None and not nodes:
        return False
    if not topts.get("enable") and not nodes and not topts.get("kubeconfigSecretRef"):
        return False
    if live is not None and topts.get("enable"):
        spec = {**live["spec"], "clusterTreeOptions": {**topts, "enable": False}}
        hkube.apply({"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name}, "spec": spec},
                    replace_spec=True)
        progress(f"unjoin {name}: clusterTreeOptions.enable set false")
    holder = tree_manager_running(hkube)
    if holder is not None:
        progress(f"unjoin {name}: waiting for kosmos-tree ({holder}) to remove the virtual nodes "
                 f"{', '.join(sorted(n['metadata']['name'] for n in nodes)) or '(none)'}")
        _wait(lambda: not _owned_virtual_nodes(hkube, name), timeout_s,
              f"kosmos-tree to remove the virtual nodes of {name}")
    elif nodes:
        from scheduler.kube import connect

        api = connect(None, hkube.target.kubeconfig, hkube.target.context)
        uid = str((live or {}).get("metadata", {}).get("uid") or "")
        writer = vnode.RootWriter(api, name, uid, status_period=60.0, lease_duration=40.0, timeout=10.0)
        for n in nodes:
            writer.delete(n)
        progress(f"unjoin {name}: no kosmos-tree holds the Lease {'/'.join(TREE_LEASE)}: removed the virtual "
                 f"nodes {', '.join(sorted(n['metadata']['name'] for n in nodes))} here")
    root_id = str(((hkube.get("v1", "Namespace", "kube-system") or {}).get("metadata") or {}).get("uid") or "")
    leaf = _leaf_api_from_secret(hkube, topts.get("kubeconfigSecretRef"))
    if leaf is None:
        progress(f"unjoin {name}: no leaf kubeconfig Secret: the leaf's copies (label kosmos.io/root-cluster="
                 f"{root_id}) are left as they are")
    elif not root_id:
        raise InstallError(f"unjoin {name}: the host's kube-system namespace has no UID (the root id)")
    else:
        remove_leaf_copies(leaf, root_id, timeout_s, progress, name)
    ref = topts.get("kubeconfigSecretRef") or {}
    if ref.get("name"):
        sec = hkube.get("v1", "Secret", str(ref["name"]), str(ref.get("namespace") or NAMESPACE))
        labels = ((sec or {}).get("metadata") or {}).get("labels") or {}
        if sec is not None and all(labels.get(k) == v for k, v in TOOL_LABEL.items()):
            progress(f"unjoin {name}: {describe({**sec, 'kind': 'Secret'})} {hkube.delete({**sec, 'kind': 'Secret'})}")
    progress(f"unjoin {name}: out of the tree")
    return True
