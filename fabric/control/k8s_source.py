"""The reflector's Kubernetes topology source: ``Cluster`` resources (``clusters.kosmos.io``) of
the host cluster in, fabric configuration and Cluster status out.

What happens, in order:

1. **List** every Cluster (one GET), remember the list's resourceVersion. Each list replaces
   the whole local view (a Cluster missing from it was deleted while we were not watching).
2. **Watch** from that resourceVersion (``watch=true``, bookmarks on). ADDED / MODIFIED /
   DELETED update the view; BOOKMARK only moves the resourceVersion. An ERROR event with code
   410 (the server compacted past our resourceVersion) or any failed request goes back to 1
   (after a backoff for failures). The watch asks the server to end after ``resync`` seconds;
   then the view is rebuilt from a fresh list, so nothing missed survives longer than that.
3. **Resolve.** After every change of the view the resources go through
   :func:`fabric.crd.resolve` (defaults, validation with field paths, cross-cluster conflicts,
   oldest Cluster first) and, when the resulting :class:`~fabric.types.FabricConfig` differs
   from the one in effect, into ``Reflector.set_config``, which re-plans and sends deltas.
   A Cluster that *was* accepted and is now edited into an invalid or conflicting spec keeps
   its last accepted spec in effect (its status says it is rejected and why): bad input never
   disturbs what works, not even the cluster's own nodes.
   A Cluster without ``spec.clusterLinkOptions.podCIDRs`` is in discovery mode: its pod CIDRs
   are the union of those its admitted nodes announced (the agents read them from their Node
   objects; the reflector has no credentials for member clusters). The union is computed from
   the reflector's status in step 4 and, when it changed, the view is resolved again, so a node
   added to a member later (with a range outside the old union) is routed by the other clusters
   without a new ``join``. There is no feedback loop: a node of a discovery-mode cluster is
   never checked against its own cluster's union (see
   :func:`fabric.control.admission.validate_announcement`), so a new union withdraws nobody. While
   the reflector holds at startup (or a new leader waits for the old one's nodes), the pod
   CIDRs the Cluster status lists are kept in the union, so remote routes to a cluster do not
   vanish before its nodes have reconnected.
4. **Status.** Whenever the view or the reflector's status changes (checked every
   ``status_interval`` seconds: node sync is not an event of ours), each Cluster's status is
   computed (:func:`cluster_status`: ``Accepted`` and ``Ready`` conditions with reasons,
   conflicts with field paths, CIDRs in use, nodes, active gateway) and written with a merge
   patch of the ``status`` subresource when it differs from what the object carries.
5. **Leader Lease** (``--status-lease NS/NAME``, optional): replicas run active/standby. Every
   replica keeps its view hot (1-3 run everywhere), but only the holder of the Lease (a
   ``coordination.k8s.io`` Lease, taken when free or expired, renewed every third of its
   duration with optimistic concurrency) serves agents and writes status; the others refuse
   ``SyncNode`` with UNAVAILABLE naming the leader (``Reflector.set_leader``). Expiry is never
   judged from the Lease's ``renewTime`` (another machine's wall clock): as client-go does, a
   standby takes the Lease over only once it has seen the record unchanged for the Lease's
   duration on its own monotonic clock (:class:`fabric.lease.ObservedLease`), and it tries again
   right when that time comes. A leader counts its validity from when it *sent* its last
   successful renewal, on its monotonic clock, and steps down, closing its sessions with
   UNAVAILABLE, when another identity holds the Lease or when it could not renew it before one
   period short of its duration; a renewal that hangs is abandoned at that instant (its wait is
   bounded by what is left of the validity), so a leader stuck on the API server stops before
   anyone may take over. On a clean stop it steps down and releases the Lease for a quick
   hand-over. A new leader waits (startup hold) for the nodes the Cluster statuses of the
   previous leader list. Without a Lease the one replica always serves (lab, standalone).

The blocking ``kubernetes`` client runs in threads (one for list+watch, one for status writes,
one for the Lease, so a slow status write never delays a renewal); everything touching the
reflector runs on its event loop (events are handed over with ``call_soon_threadsafe``), so the
reflector needs no locks. Those threads can enter
another network namespace first (``netns_fd``): the lab runs the reflector in its underlay
namespace and the emulated API servers on 127.0.0.1 of the root namespace.

**Stopping.** A source runs once. When ``run()`` ends (cancelled) it sets the stop flag, shuts
the socket of the watch in progress (a watch read otherwise blocks until the next event or
bookmark, or up to ``resync`` seconds) and waits up to ``WATCHER_JOIN_S`` for the watch thread.
A thread still inside a list request then (at most ``REQUEST_TIMEOUT_S``) ends when it returns
and neither logs nor touches the reflector any more: a stopped source leaves nothing that
writes to a closed event loop or to stderr while the interpreter shuts down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from fabric import crd, types
from fabric import netns as namespaces
from fabric.backoff import Backoff
from fabric.control import api
from fabric.lease import ObservedLease

_log = logging.getLogger(__name__)

DEFAULT_RESYNC_S = 300.0
DEFAULT_STATUS_INTERVAL_S = 2.0
DEFAULT_LEASE_DURATION_S = 15
#: Timeouts of one API request (connect, read); watches read for up to resync + this.
REQUEST_TIMEOUT_S = 10.0
#: How long a stopping ``run()`` waits for its watch thread (see "Stopping" above).
WATCHER_JOIN_S = 2.0
_MERGE_PATCH = "application/merge-patch+json"
LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL = "coordination.k8s.io", "v1", "leases"


class ConfigSink(Protocol):
    """What the source drives: the reflector (``set_config`` re-plans; ``status`` for Clusters;
    ``set_leader`` switches between serving agents and standby, with a Lease only)."""

    def set_config(self, config: types.FabricConfig) -> None: ...

    def status(self) -> api.FabricStatus: ...

    def set_leader(self, leading: bool, why: str, expected: Sequence[str] | None = None) -> None: ...


class SourceError(RuntimeError):
    """The source cannot start (no usable kubeconfig, namespace file missing)."""


# --------------------------------------------------------------------------------------------
# Client plumbing
# --------------------------------------------------------------------------------------------


def load_api_client(kubeconfig: str | None) -> Any:
    """A ``kubernetes.client.ApiClient``: from ``kubeconfig`` (its current context) when given,
    else in-cluster (the ServiceAccount of the reflector's pod), else ``~/.kube/config``."""
    from kubernetes import client, config

    try:
        if kubeconfig:
            return config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        try:
            conf = client.Configuration()
            config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
            return client.ApiClient(conf)
        except config.ConfigException:
            return config.new_client_from_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError, ValueError) as e:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "in-cluster config or ~/.kube/config"
        raise SourceError(f"cannot load a Kubernetes client configuration from {where}: {e}") from e


def open_netns(path: str) -> int:
    """An fd of the network namespace file ``path`` (``/proc/PID/ns/net``, ``/run/netns/X``),
    opened once so threads started later can enter it even if ``path`` goes away."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SourceError(f"--kube-netns {path}: cannot open the namespace file: {e.strerror}") from e


def _enter_netns(fd: int | None) -> None:
    """Move the calling *thread* into the namespace of ``fd`` (sockets it opens live there)."""
    if fd is not None:
        namespaces.enter(fd)


def _api_error(e: BaseException) -> tuple[int | None, str]:
    """(HTTP status or None, short text) of a client exception."""
    status = getattr(e, "status", None)
    body = getattr(e, "body", None)
    text = f"{type(e).__name__}: {e}"
    if isinstance(body, (str, bytes)):
        with contextlib.suppress(ValueError, TypeError):
            text = json.loads(body).get("message") or text
    return (status if isinstance(status, int) else None), text


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------
# Resolution with last-good specs, and status (pure)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """One resolution of the view: the config to run and, per Cluster, what its status says."""

    resolution: crd.Resolution
    #: Problems of each Cluster's *current* spec (a Cluster kept at its last good spec has them too).
    problems: Mapping[str, tuple[crd.Problem, ...]]
    #: Clusters whose current spec is rejected but whose last accepted spec stays in effect:
    #: name -> the generation of that spec.
    kept: Mapping[str, int]


def _generation(obj: Mapping[str, Any]) -> int:
    gen = (obj.get("metadata") or {}).get("generation")
    return gen if isinstance(gen, int) else 0


def _name(obj: Mapping[str, Any]) -> str:
    name = (obj.get("metadata") or {}).get("name")
    return name if isinstance(name, str) else "?"


def resolve_with_last_good(
    objects: Mapping[str, Mapping[str, Any]],
    last_good: dict[str, Mapping[str, Any]],
    bridge_cidrs: Sequence[str] = (),
    local_cidrs: Sequence[str] = (),
    discovered: Mapping[str, crd.Discovered] | None = None,
) -> Outcome:
    """Resolve ``objects`` (name -> Cluster) with what was ``discovered`` about them; a rejected
    Cluster with an accepted spec in ``last_good`` is resolved with that spec instead. Updates
    ``last_good`` in place: accepted current specs replace it, deleted and disabled Clusters
    leave it."""
    def ranked(name: str, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        # resolve() takes Clusters oldest first, by a creation time of one-second granularity
        # (ties by name): clusters in effect go first, so a newcomer never displaces them.
        meta = dict(obj.get("metadata") or {})
        meta["creationTimestamp"] = ("0" if name in last_good else "1") + str(meta.get("creationTimestamp") or "")
        return {**obj, "metadata": meta}

    first = crd.resolve([ranked(n, o) for n, o in objects.items()], discovered, bridge_cidrs=bridge_cidrs,
                        local_cidrs=local_cidrs)  # fmt: skip
    subst = {n: last_good[n] for n in first.problems if n in objects and n in last_good
             and last_good[n] is not objects[n]}  # fmt: skip
    final = first
    if subst:
        final = crd.resolve([ranked(n, subst.get(n, o)) for n, o in objects.items()], discovered,
                            bridge_cidrs=bridge_cidrs, local_cidrs=local_cidrs)  # fmt: skip
    accepted = {c.name for c in final.config.clusters}
    for n in list(last_good):
        if n not in objects or n in final.disabled or (n in subst and n not in accepted):
            del last_good[n]
    for n in accepted:
        if n not in subst:
            last_good[n] = objects[n]
    kept = {n: _generation(o) for n, o in subst.items() if n in accepted}
    problems = dict(first.problems)
    for n, probs in final.problems.items():  # a kept spec can conflict anew
        if n in subst:
            problems[n] = problems.get(n, ()) + probs
    return Outcome(final, problems, kept)


def _condition(ctype: str, ok: bool, reason: str, message: str, generation: int,
               previous: Sequence[Any], now: str) -> dict[str, Any]:
    status = "True" if ok else "False"
    since = now
    for c in previous:
        if isinstance(c, dict) and c.get("type") == ctype and c.get("status") == status:
            since = c.get("lastTransitionTime") or now
    return {"type": ctype, "status": status, "observedGeneration": generation, "lastTransitionTime": since,
            "reason": reason, "message": message}


def cluster_status(
    obj: Mapping[str, Any],
    outcome: Outcome,
    fabric: api.FabricStatus | None,
    now: str,
) -> dict[str, Any]:
    """The ``status`` of one Cluster: every key this source owns is present (a merge patch must
    overwrite old values), conditions keep their ``lastTransitionTime`` while unchanged."""
    name = _name(obj)
    gen = _generation(obj)
    old = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    assert isinstance(old, dict)
    previous = old.get("conditions") if isinstance(old.get("conditions"), list) else []
    assert isinstance(previous, list)
    res = outcome.resolution
    config = res.config.cluster(name)
    problems = outcome.problems.get(name, ())
    kept = outcome.kept.get(name)
    cstat = next((c for c in fabric.clusters if c.name == name), None) if fabric is not None else None
    detail = "; ".join(f"{p.field}: {p.reason}" for p in problems)

    if name in res.disabled:
        accepted = _condition("Accepted", False, "Disabled", "clusterLinkOptions.enable is false: the cluster is "
                              "not part of the fabric", gen, previous, now)  # fmt: skip
    elif problems and kept is not None:
        accepted = _condition("Accepted", False, "InvalidSpecKeptPrevious",
                              f"{detail} (the fabric keeps using generation {kept} of this Cluster)", gen, previous,
                              now)  # fmt: skip
    elif problems:
        reason = "Conflict" if any(p.other for p in problems) else "InvalidSpec"
        accepted = _condition("Accepted", False, reason, detail, gen, previous, now)
    elif config is not None and config.discover_pod_cidrs:
        pods_now = res.in_use.get(name, ((), ()))[0]
        wait = "" if pods_now else " (none yet: waiting for its nodes)"
        accepted = _condition("Accepted", True, "Accepted", "the cluster is part of the fabric; its pod CIDRs are "
                              f"discovered from its nodes' announcements{wait}", gen, previous, now)  # fmt: skip
    else:
        accepted = _condition("Accepted", True, "Accepted", "the cluster is part of the fabric", gen, previous, now)

    nodes: list[dict[str, Any]] = []
    active = ""
    if config is not None and cstat is not None:
        active = cstat.active_gateway
        for n in cstat.nodes:
            nodes.append({"name": n.name, "address": n.underlay_ip, "podCIDRs": list(n.pod_cidrs),
                          "gateway": n.name == cstat.active_gateway, "inSync": n.in_sync})  # fmt: skip
    if config is None:
        ready = _condition("Ready", False, "NotAccepted", "the cluster is not in the fabric", gen, previous, now)
    elif fabric is None:
        ready = _condition("Ready", False, "ReflectorStarting", "no reflector status yet", gen, previous, now)
    elif fabric.holding:
        ready = _condition("Ready", False, "StartupHold", "the reflector waits for known nodes to reconnect", gen,
                           previous, now)  # fmt: skip
    elif not nodes:
        ready = _condition("Ready", False, "NoNodes", "no agent of this cluster has announced its node", gen,
                           previous, now)  # fmt: skip
    elif not all(n["inSync"] for n in nodes):
        lagging = ", ".join(n["name"] for n in nodes if not n["inSync"])
        ready = _condition("Ready", False, "NodesNotInSync", f"not in sync: {lagging}", gen, previous, now)
    else:
        ready = _condition("Ready", True, "NodesInSync", f"{len(nodes)} nodes applied their latest plan", gen,
                           previous, now)  # fmt: skip

    families = config.families if config is not None else ()
    pods, svcs = res.in_use.get(name, ((), ()))
    return {
        "observedGeneration": gen,
        "clusterLinkStatus": {
            "ipFamilies": [types.FAMILY_NAMES[f] for f in families],
            "podCIDRs": list(pods),
            "serviceCIDRs": list(svcs),
            "activeGateway": active,
            "nodeCount": len(nodes),
            "nodes": nodes,
            "conflicts": [p.to_status() for p in problems],
        },
        "conditions": [accepted, ready],
    }


def status_differs(current: Any, wanted: Mapping[str, Any]) -> bool:
    """Whether the object's ``status`` lacks any of ``wanted``'s values (extra keys are ignored)."""
    if not isinstance(current, dict):
        return True
    return any(current.get(k) != v for k, v in wanted.items())


def discovered_pods(
    fabric: api.FabricStatus, config: types.FabricConfig, kept: Mapping[str, Sequence[str]] | None = None
) -> dict[str, crd.Discovered]:
    """Per discovery-mode cluster of ``config``: the pod CIDRs its admitted nodes announced
    (the reflector's status lists admitted nodes only), plus ``kept`` ones (sorted, unique)."""
    nodes = {c.name: c.nodes for c in fabric.clusters}
    out: dict[str, crd.Discovered] = {}
    for c in config.clusters:
        if c.discover_pod_cidrs:
            found = {p for n in nodes.get(c.name, ()) for p in n.pod_cidrs} | set((kept or {}).get(c.name, ()))
            out[c.name] = crd.Discovered(pod_cidrs=tuple(sorted(found)))
    return out


def expected_nodes(objects: Sequence[Mapping[str, Any]], config: types.FabricConfig) -> tuple[str, ...]:
    """Nodes the statuses of accepted Clusters list: what a restarted reflector waits for before
    it lets agents garbage-collect (its startup hold)."""
    names = {c.name for c in config.clusters}
    out: set[str] = set()
    for obj in objects:
        name = _name(obj)
        status = obj.get("status")
        if name not in names or not isinstance(status, dict):
            continue
        link = status.get("clusterLinkStatus")
        for n in (link.get("nodes") or []) if isinstance(link, dict) else []:
            if isinstance(n, dict) and isinstance(n.get("name"), str):
                out.add(f"{name}/{n['name']}")
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseSpec:
    """``--status-lease NS/NAME`` with ``--status-lease-identity``: the leader Lease (its holder
    is the one replica that serves agents and writes Cluster status)."""

    namespace: str
    name: str
    identity: str
    duration_s: int = DEFAULT_LEASE_DURATION_S

    @classmethod
    def parse(cls, text: str, identity: str) -> LeaseSpec:
        ns, sep, name = text.partition("/")
        if not sep or not ns or not name or "/" in name:
            raise ValueError(f"--status-lease {text!r}: expected NAMESPACE/NAME")
        if not identity:
            raise ValueError("--status-lease needs --status-lease-identity (e.g. the pod name)")
        return cls(ns, name, identity)


class KubernetesSource:
    """List+watch of Clusters feeding a reflector, and the writer of their status.

    Construct, optionally :meth:`initial_list` before the reflector exists (its result gives the
    first configuration), then ``await run(reflector)`` on the reflector's loop until cancelled.
    """

    def __init__(
        self,
        api_client: Any,
        *,
        resync_s: float = DEFAULT_RESYNC_S,
        status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
        lease: LeaseSpec | None = None,
        netns_fd: int | None = None,
        bridge_cidrs: Sequence[str] = (),
        local_cidrs: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: the wall clock, only for the timestamps written into the Lease (nothing is
        decided from them); ``monotonic``: the clock every Lease decision is taken on."""
        from kubernetes import client

        # Any: the generated methods return ``object`` for what is JSON (dicts) on the wire.
        self._objects_api: Any = client.CustomObjectsApi(api_client)
        self.resync_s = resync_s
        self.status_interval_s = status_interval_s
        self.lease = lease
        self._netns_fd = netns_fd
        self.bridge_cidrs = tuple(bridge_cidrs)
        self.local_cidrs = tuple(local_cidrs)
        self._clock = clock
        self._monotonic = monotonic
        #: The Lease record as last read or written, and when it was seen to change (leaser thread).
        self._observed = ObservedLease()
        #: The view: Cluster name -> object, as last listed or watched.
        self.objects: dict[str, dict[str, Any]] = {}
        self._last_good: dict[str, Mapping[str, Any]] = {}
        self.outcome: Outcome | None = None
        self._applied: types.FabricConfig | None = None
        self._written: dict[str, dict[str, Any]] = {}
        self._sink: ConfigSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty: asyncio.Event | None = None
        self._stop = threading.Event()
        #: The watch response being read (the watch thread's), so a stop can interrupt its read.
        self._watch_resp: Any = None
        self._watch_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._lease_until = 0.0
        #: This replica holds the Lease and told the sink to serve (always False without a Lease).
        self.leading = False
        #: The nodes a restarted reflector or a new leader waits for (from the Cluster statuses
        #: when it started or took over): kept in every configuration handed to the sink.
        self._expected: tuple[str, ...] = ()
        #: Discovery-mode clusters: what their admitted nodes announced (see the module docstring).
        self._discovered: dict[str, crd.Discovered] = {}
        #: Pod CIDRs from the Cluster statuses, kept in the union while the sink holds.
        self._kept_pods: dict[str, tuple[str, ...]] = {}
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "kube-status", initializer=_enter_netns,
                                                             initargs=(netns_fd,))  # fmt: skip
        self._leaser = concurrent.futures.ThreadPoolExecutor(1, "kube-lease", initializer=_enter_netns,
                                                             initargs=(netns_fd,))  # fmt: skip
        self.synced = False
        #: Counters for logs and tests.
        self.lists = 0
        self.status_writes = 0

    # -- API calls (threads) -----------------------------------------------------------------

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        doc = self._objects_api.list_cluster_custom_object(crd.GROUP, crd.VERSION, crd.PLURAL,
                                                           _request_timeout=REQUEST_TIMEOUT_S)  # fmt: skip
        items = [i for i in doc.get("items") or [] if isinstance(i, dict)]
        return items, str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def initial_list(self, timeout_s: float = 10.0) -> list[dict[str, Any]] | None:
        """List once (blocking, in a thread in the API server's namespace); None after
        ``timeout_s`` of failures (the watch keeps trying once running)."""
        deadline = time.monotonic() + timeout_s
        backoff = Backoff(0.2, 2.0)
        while True:
            fut = self._writer.submit(self._list)
            try:
                items, _rv = fut.result(timeout=max(0.1, deadline - time.monotonic()) + REQUEST_TIMEOUT_S)
                self.objects = {_name(o): o for o in items}
                return items
            except Exception as e:  # any client/transport error: retried until the deadline
                _code, text = _api_error(e)
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    _log.warning("cannot list Clusters: %s; starting without them (the watch keeps trying)", text)
                    return None
                _log.info("listing Clusters failed (%s); retrying in %.1fs", text, delay)
                time.sleep(delay)

    def initial_config(self) -> types.FabricConfig:
        """The configuration of the current view, expecting the nodes its statuses list (and
        keeping the pod CIDRs they list for discovery-mode clusters until those reconnect)."""
        self._kept_pods = crd.status_pod_cidrs(list(self.objects.values()))
        self._discovered = {n: crd.Discovered(pod_cidrs=p) for n, p in self._kept_pods.items()}
        outcome = resolve_with_last_good(self.objects, self._last_good, self.bridge_cidrs, self.local_cidrs,
                                         self._discovered)  # fmt: skip
        self.outcome = outcome
        self._expected = expected_nodes(list(self.objects.values()), outcome.resolution.config)
        self._applied = dataclasses.replace(outcome.resolution.config, expected_nodes=self._expected)
        return self._applied

    def _post(self, kind: str, payload: Any) -> None:
        loop = self._loop
        if loop is not None and not self._stop.is_set():
            with contextlib.suppress(RuntimeError):  # loop closed while we were reading
                loop.call_soon_threadsafe(self._on_event, kind, payload)

    def _watch_thread(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        try:
            _enter_netns(self._netns_fd)
        except OSError as e:
            _log.error("Cluster watch cannot start: %s", e)
            return
        rv = ""
        backoff = Backoff(0.5, 30.0)
        while not self._stop.is_set():
            try:
                if not rv:
                    items, rv = self._list()
                    self.lists += 1
                    self._post("LIST", items)
                resp = self._objects_api.list_cluster_custom_object(
                    crd.GROUP, crd.VERSION, crd.PLURAL, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                    timeout_seconds=max(1, int(self.resync_s)), _preload_content=False,
                    _request_timeout=(REQUEST_TIMEOUT_S, self.resync_s + 60.0),
                )  # fmt: skip
                with self._watch_lock:  # published under the lock: a stop either sees it or is seen here
                    if self._stop.is_set():
                        resp.close()
                        return
                    self._watch_resp = resp
                try:
                    for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                        if self._stop.is_set():
                            return
                        if not line:
                            continue
                        ev = json.loads(line)
                        etype, obj = ev.get("type"), ev.get("object") or {}
                        if etype == "ERROR":
                            code = obj.get("code")
                            _log.info("Cluster watch ended by the server: %s (%s)", obj.get("message"), code)
                            if code == 410:
                                rv = ""  # expired: list again
                            break
                        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if new_rv:
                            rv = str(new_rv)
                        if etype in ("ADDED", "MODIFIED", "DELETED"):
                            self._post(etype, obj)
                    else:
                        rv = ""  # the watch ran its resync period: rebuild the view from a list
                finally:
                    with self._watch_lock:
                        self._watch_resp = None
                    if self._stop.is_set():
                        resp.close()  # its socket may be shut: never back into the pool
                    else:
                        resp.release_conn()
                backoff.reset()
            except Exception as e:  # transport or server error: back off, keep the view, retry
                if self._stop.is_set():
                    return
                code, text = _api_error(e)
                if code == 410:
                    rv = ""
                delay = backoff.next()
                _log.warning("Cluster list/watch failed: %s; retrying in %.1fs", text, delay)
                self._stop.wait(delay)

    def _interrupt_watch(self) -> None:
        """Set the stop flag and end a watch read in progress at once: shutting the socket for
        reading makes the blocked read see end-of-stream (urllib3 >= 2.3; with an older one the
        thread notices the flag at the next event or bookmark)."""
        with self._watch_lock:
            self._stop.set()
            resp = self._watch_resp
        shutdown = getattr(resp, "shutdown", None)
        if shutdown is not None:
            # ValueError/RuntimeError: the response has just finished or released its connection.
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                shutdown()

    async def _join_watcher(self) -> None:
        """Wait up to ``WATCHER_JOIN_S`` for the watch thread (polled: joining would block the
        loop); a thread still in a list request ends by itself, silently (module docstring)."""
        watcher = self._watcher
        if watcher is None:
            return
        deadline = time.monotonic() + WATCHER_JOIN_S
        while watcher.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if watcher.is_alive():
            _log.info("the Cluster watch thread is still in a request; it ends within %.0fs, silently",
                      REQUEST_TIMEOUT_S)  # fmt: skip

    def _patch_status(self, name: str, status: dict[str, Any]) -> None:
        self._objects_api.patch_cluster_custom_object_status(
            crd.GROUP, crd.VERSION, crd.PLURAL, name, {"status": status}, _content_type=_MERGE_PATCH,
            _request_timeout=REQUEST_TIMEOUT_S,
        )  # fmt: skip

    def _lease_timeout(self) -> float:
        """Timeout of one Lease request: well within a renewal period, so a hanging API server
        cannot keep a leader serving past the Lease's validity."""
        assert self.lease is not None
        return max(1.0, min(REQUEST_TIMEOUT_S, self.lease.duration_s / 6))

    def _renew_lease(self) -> tuple[bool, str]:
        """Take or renew the Lease: (we hold it now, the identity holding it). Optimistic
        concurrency on updates: of two replicas racing for a free Lease one gets a conflict."""
        from kubernetes.client.exceptions import ApiException

        assert self.lease is not None
        ls = self.lease
        now = self._clock()  # for the record only: expiry is judged on our monotonic clock
        timeout = self._lease_timeout()
        spec = {"holderIdentity": ls.identity, "leaseDurationSeconds": ls.duration_s, "renewTime": _micro_time(now)}
        try:
            cur = self._objects_api.get_namespaced_custom_object(
                LEASE_GROUP, LEASE_VERSION, ls.namespace, LEASE_PLURAL, ls.name, _request_timeout=timeout)
        except ApiException as e:
            if e.status != 404:
                raise
            created = {**spec, "acquireTime": _micro_time(now), "leaseTransitions": 0}
            body = {"apiVersion": f"{LEASE_GROUP}/{LEASE_VERSION}", "kind": "Lease",
                    "metadata": {"name": ls.name, "namespace": ls.namespace}, "spec": created}  # fmt: skip
            self._objects_api.create_namespaced_custom_object(LEASE_GROUP, LEASE_VERSION, ls.namespace, LEASE_PLURAL,
                                                              body, _request_timeout=timeout)  # fmt: skip
            self._observed.observe(created, self._monotonic())
            return True, ls.identity
        cspec = cur.get("spec") or {}
        self._observed.observe(cspec, self._monotonic())  # after the read: a later "seen" only waits longer
        holder = self._observed.holder()
        if self._observed.held_by_other(ls.identity, self._monotonic(), ls.duration_s):
            return False, holder
        if holder != ls.identity:
            spec["acquireTime"] = _micro_time(now)
            spec["leaseTransitions"] = int(cspec.get("leaseTransitions") or 0) + 1
        cur["spec"] = {**cspec, **spec}
        self._objects_api.replace_namespaced_custom_object(
            LEASE_GROUP, LEASE_VERSION, ls.namespace, LEASE_PLURAL, ls.name, cur, _request_timeout=timeout)
        self._observed.observe(cur["spec"], self._monotonic())
        return True, ls.identity

    def _release_lease(self) -> None:
        """Give the Lease up (empty holder) if we still hold it: a standby takes over at its next
        attempt instead of waiting for the Lease to expire."""
        assert self.lease is not None
        ls = self.lease
        timeout = self._lease_timeout()
        cur = self._objects_api.get_namespaced_custom_object(
            LEASE_GROUP, LEASE_VERSION, ls.namespace, LEASE_PLURAL, ls.name, _request_timeout=timeout)
        cspec = cur.get("spec") or {}
        if cspec.get("holderIdentity") != ls.identity:
            return
        cur["spec"] = {**cspec, "holderIdentity": "", "renewTime": _micro_time(self._clock())}
        self._objects_api.replace_namespaced_custom_object(
            LEASE_GROUP, LEASE_VERSION, ls.namespace, LEASE_PLURAL, ls.name, cur, _request_timeout=timeout)

    # -- event loop side ----------------------------------------------------------------------

    def _on_event(self, kind: str, payload: Any) -> None:
        if kind == "LIST":
            self.objects = {_name(o): o for o in payload}
            self.synced = True
        elif kind == "DELETED":
            self.objects.pop(_name(payload), None)
            self._written.pop(_name(payload), None)
        else:
            name = _name(payload)
            self.objects[name] = payload
            if name in self._written and status_differs(payload.get("status"), self._written[name]):
                del self._written[name]  # someone else changed it: write ours again
        self.reconfigure()

    def reconfigure(self) -> None:
        """Resolve the view; hand a changed configuration to the reflector; status is due."""
        outcome = resolve_with_last_good(self.objects, self._last_good, self.bridge_cidrs, self.local_cidrs,
                                         self._discovered)  # fmt: skip
        self.outcome = outcome
        config = dataclasses.replace(outcome.resolution.config, expected_nodes=self._expected)
        if config != self._applied and self._sink is not None:
            _log.info("Cluster resources changed: %d clusters in the fabric (%s); %d left out",
                      len(config.clusters), ", ".join(c.name for c in config.clusters) or "none",
                      len(outcome.problems))  # fmt: skip
            try:
                self._sink.set_config(config)
            except ValueError as e:
                # resolve() and the reflector disagree about validity: keep what runs, say why.
                _log.error("the reflector refused the configuration from the Cluster resources: %s", e)
            else:
                self._applied = config
        for name, probs in outcome.problems.items():
            _log.debug("Cluster %s: %s", name, "; ".join(str(p) for p in probs))
        if self._dirty is not None:
            self._dirty.set()

    def may_write_status(self) -> bool:
        return self.lease is None or self._monotonic() < self._lease_until

    def rediscover(self, fabric: api.FabricStatus) -> bool:
        """Take the discovery-mode clusters' pod CIDRs from the sink's ``fabric`` status; resolve
        again (and so hand the new union to the sink) when they changed. True if they did."""
        if self.outcome is None:
            return False
        if not fabric.holding:
            self._kept_pods = {}  # every node that was expected came back or the hold ended
        found = discovered_pods(fabric, self.outcome.resolution.config, self._kept_pods)
        if found == self._discovered:
            return False
        for name, d in found.items():
            if d != self._discovered.get(name):
                _log.info("Cluster %s: pod CIDRs discovered from its nodes: %s", name, ", ".join(d.pod_cidrs) or "none")
        self._discovered = found
        self.reconfigure()
        return True

    def wanted_status(
        self, now: str | None = None, fabric: api.FabricStatus | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per Cluster in the view, the status it should carry now (``fabric``: the sink's
        status, read now when not given)."""
        if self.outcome is None:
            return {}
        if fabric is None and self._sink is not None:
            fabric = self._sink.status()
        stamp = now or _now_rfc3339()
        return {n: cluster_status(o, self.outcome, fabric, stamp) for n, o in self.objects.items()}

    async def _status_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._dirty is not None
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the wait completes (CPython gh-86296), and this loop would then
            # never end: run() hung on cancel.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.status_interval_s):
                    await self._dirty.wait()
            self._dirty.clear()
            if self._sink is None:
                continue
            fabric = self._sink.status()
            if self.rediscover(fabric):
                fabric = self._sink.status()  # with the configuration that has the new union
            if not self.synced or not self.may_write_status():
                continue
            for name, doc in self.wanted_status(fabric=fabric).items():
                obj = self.objects.get(name)
                if obj is None or doc == self._written.get(name) or not status_differs(obj.get("status"), doc):
                    continue
                try:
                    await loop.run_in_executor(self._writer, self._patch_status, name, doc)
                except Exception as e:  # one failed write never stops the others; retried next pass
                    code, text = _api_error(e)
                    if code != 404:  # 404: deleted meanwhile
                        _log.warning("cannot write the status of Cluster %s: %s", name, text)
                    continue
                self._written[name] = doc
                self.status_writes += 1

    def _lead(self, leading: bool, why: str) -> None:
        """Tell the sink to serve (with the nodes the Cluster statuses list: the previous leader
        wrote them) or to stand by; on gaining the Lease our status is due at once."""
        assert self._sink is not None
        if leading:
            config = self.outcome.resolution.config if self.outcome is not None else types.FabricConfig(clusters=())
            self._expected = expected_nodes(list(self.objects.values()), config)
            self._kept_pods = crd.status_pod_cidrs(list(self.objects.values()))
            if self._applied is not None:
                self._applied = dataclasses.replace(self._applied, expected_nodes=self._expected)
            self._sink.set_leader(True, why, self._expected)
            self._written.clear()
            if self._dirty is not None:
                self._dirty.set()
        else:
            self._sink.set_leader(False, why)
        self.leading = leading

    async def _lease_loop(self) -> None:
        """Renew (or try to take) the leader Lease every third of its duration and switch the
        sink between leader and standby (see the module docstring, step 5).

        Every time here is this replica's monotonic clock. A renewal counts from when it was
        sent (``started``): the record may be written, and seen by a standby, at any moment of
        the request. While leading, one attempt may take no longer than what is left of the
        validity, so a request that hangs cannot keep this replica serving past it."""
        assert self.lease is not None
        ls = self.lease
        where = f"{ls.namespace}/{ls.name}"
        loop = asyncio.get_running_loop()
        # A third of the duration (no floor that reaches half of it: the margin kept below is one
        # period, and the next renewal must start well inside what is left).
        period = max(0.2, ls.duration_s / 3)
        holder: str | None = None  # as last read; None: unknown (the last attempt failed)
        while True:
            error = ""
            started = self._monotonic()
            budget = min(period, self._lease_until - started) if self.leading else period
            try:
                if budget <= 0:
                    raise TimeoutError
                async with asyncio.timeout(budget):
                    ok, holder = await loop.run_in_executor(self._leaser, self._renew_lease)
            except TimeoutError:
                ok, holder, error = False, None, f"no answer within {max(budget, 0.0):g}s"
            except Exception as e:  # conflict (another replica won the race) or API trouble
                ok, holder, error = False, None, _api_error(e)[1]
            now = self._monotonic()
            wait = period
            if ok:
                # Keep a margin: stop a period before another replica may take over.
                self._lease_until = started + ls.duration_s - period
                if not self.leading:
                    _log.info("leader Lease %s acquired: this replica serves agents and writes Cluster status", where)
                    self._lead(True, f"acquired the leader Lease {where}")
            elif holder is not None:  # another live identity holds it
                if self.leading:
                    _log.warning("leader Lease %s is held by %s: stepping down to standby", where, holder)
                self._lease_until = 0.0
                self._lead(False, f"standby replica; the leader is {holder}")
                # Try again right when the record, unchanged, may be taken over (if sooner).
                wait = min(period, max(0.05, self._observed.expires(ls.duration_s) - now))
            else:
                _log.info("leader Lease %s not renewed: %s", where, error)
                if self.leading and now >= self._lease_until:
                    _log.warning("leader Lease %s could not be renewed within its validity (%s): stepping down",
                                 where, error)  # fmt: skip
                    self._lead(False, f"standby replica; the leader is unknown (the Lease {where} could not be "
                                      f"renewed: {error})")  # fmt: skip
                elif not self.leading:
                    self._lead(False, f"standby replica; the leader is unknown (the Lease {where} cannot be read: "
                                      f"{error})")  # fmt: skip
                else:
                    wait = min(period, max(0.05, self._lease_until - now))  # retry within the validity
            await asyncio.sleep(wait)

    async def run(self, sink: ConfigSink) -> None:
        """Watch and write status for ``sink`` until cancelled (on ``sink``'s event loop). Once:
        a stopped source has stopped its threads for good (construct a new one to start again)."""
        if self._watcher is not None:
            raise RuntimeError("KubernetesSource.run() was called a second time: a source runs once")
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._dirty = asyncio.Event()
        self.reconfigure()
        self._watcher = threading.Thread(target=self._watch_thread, name="kube-clusters", daemon=True)
        self._watcher.start()
        tasks = [asyncio.create_task(self._status_loop())]
        if self.lease is not None:
            tasks.append(asyncio.create_task(self._lease_loop()))
        try:
            await asyncio.gather(*tasks)
        finally:
            self._interrupt_watch()
            for t in tasks:
                t.cancel()
            self._writer.shutdown(wait=False, cancel_futures=True)
            if self.leading:
                # Nobody renews the Lease any more: stop serving now, then hand it over.
                assert self.lease is not None
                self._lead(False, f"standby replica; this replica stopped renewing the Lease "
                                  f"{self.lease.namespace}/{self.lease.name}")  # fmt: skip
                self._lease_until = 0.0
                release = self._leaser.submit(self._release_lease)
                try:
                    async with asyncio.timeout(self._lease_timeout() + 1.0):
                        await asyncio.wrap_future(release)
                except Exception as e:  # the Lease then simply expires
                    _log.info("could not release the leader Lease: %s", _api_error(e)[1])
            self._leaser.shutdown(wait=False, cancel_futures=True)
            await self._join_watcher()
