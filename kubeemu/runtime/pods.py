"""The runtime proper: each admitted Pod's containers as real processes, synced like the kubelet's pod workers.

:class:`Runtime` owns one :class:`PodWorker` per running pod and implements
:class:`~kubeemu.runtime.access.ContainerAccess` (logs and exec for the kubelet API). A worker's
sync, every ``poll`` seconds (sooner while a started container is not yet running:
:meth:`PodWorker._wait`), in this order:

1. volumes: resolved and written once (:mod:`~kubeemu.runtime.volumes`); a missing object or an
   unbound claim keeps every container ``waiting: ContainerCreating`` and is retried;
2. reads what its shims recorded (``container.json``: running; ``exit.json``: terminated; a shim
   gone without an exit record: terminated with exit code 137);
3. init containers one at a time, in order, each to a successful exit; then the app containers;
   each container that is not running is started (its shim forked by the kubelet's spawner,
   :mod:`~kubeemu.runtime.spawner`), restarted as ``restartPolicy`` says (with
   :mod:`~kubeemu.runtime.backoff`: ``waiting: CrashLoopBackOff`` in between), or left terminated;
4. probes that are due run in threads (:mod:`~kubeemu.runtime.probes`); a startup or liveness
   failure kills the container (then the restart policy applies), readiness sets ``ready``;
5. the pod status (phase, conditions, containerStatuses with state/lastState/restartCount) is
   handed to the kubelet, which PATCHes it when it changed; a sync that has just started a
   container leaves that to the next one, due as soon as the container runs.

On disk, under the kubelet root (upstream ``/var/lib/kubelet`` and ``/var/log/pods``)::

    pods/<uid>/pod.json                               who the pod is (for adoption and lab down)
    pods/<uid>/etc-hosts, etc-hostname                bound over /etc/hosts, /etc/hostname
    pods/<uid>/resolv.conf                            bound over /etc/resolv.conf (:mod:`~kubeemu.runtime.dns`)
    pods/<uid>/volumes/kubernetes.io~<plugin>/<vol>   managed volume contents
    pods/<uid>/containers/<name>/state.json           restartCount and back-off, kept across restarts
    pods/<uid>/containers/<name>/<attempt>/           spec.json, shim.json, container.json, exit.json
    pods/<ns>_<pod>_<uid>/<name>/<attempt>.log        the CRI log of each attempt

A restarted kubelet creates the worker again for a pod it finds in the API server; the worker
reads ``state.json`` and the latest attempt and *adopts* a shim whose PID and start time still
match instead of starting a second copy. Stopping a pod: SIGTERM to every container process,
``terminationGracePeriodSeconds``, SIGKILL, then the pod's directories are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kubeemu.runtime import dns as dnsmod
from kubeemu.runtime import env as envmod
from kubeemu.runtime import procs, spawner, volumes
from kubeemu.runtime.access import ContainerAccess
from kubeemu.runtime.backoff import Backoff
from kubeemu.runtime.probes import ProbeWorker, run_probe

_log = logging.getLogger(__name__)

#: How often a running pod's managed volumes are rewritten from the API (upstream: the kubelet's
#: sync period, about a minute): ConfigMap/Secret updates and renewed tokens reach containers.
VOLUME_RESYNC_S = 60.0

#: The first short wait before looking again at a container whose shim was just started (then
#: doubling up to the poll interval): a started container shows as running within about this.
FIRST_RECHECK_S = 0.02

#: Why an exited container that will run again is waiting (its exit shows as lastState meanwhile).
_WAITING_AGAIN = ("CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError")

StatusSink = Callable[[dict[str, Any]], Awaitable[None]]
#: ``(pod, type, reason, message, container)``: record an Event about the pod (never blocks).
EventSink = Callable[["PodInfo", str, str, str, "str | None"], None]


def _no_events(info: PodInfo, etype: str, reason: str, message: str, container: str | None) -> None:
    return None


def _rfc3339(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def _parse_rfc3339(s: str | None) -> float:
    """Seconds since the epoch of an RFC 3339 time (fraction and ``Z`` ignored); 0 when absent."""
    if not s:
        return 0.0
    import calendar

    return float(calendar.timegm(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S")))


def _read_json(p: pathlib.Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(p.read_text()))
    except (OSError, ValueError):
        return None


def _write_json(p: pathlib.Path, obj: dict[str, Any]) -> None:
    """Atomically, readable by root only (a container's spec holds its environment: secrets)."""
    tmp = p.with_name(f".{p.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj))
    tmp.replace(p)


@dataclass
class PodInfo:
    """What the kubelet set up for a pod before the runtime runs it."""

    namespace: str
    name: str
    uid: str
    node: str
    pod_ips: tuple[str, ...]  # one per family, primary first (status.podIPs)
    host_ips: tuple[str, ...]  # the node's InternalIPs, primary first (status.hostIPs)
    netns: str | None  # the network namespace's name under /run/netns (None: the kubelet's own)
    host_network: bool = False  # runs in its node's namespace and takes the node's name as hostname

    @property
    def host_ip(self) -> str:
        """``status.hostIP``: the primary of ``host_ips``."""
        return self.host_ips[0] if self.host_ips else ""

    @property
    def netns_path(self) -> str | None:
        return f"/run/netns/{self.netns}" if self.netns else None


@dataclass
class Attempt:
    """One run of a container (one shim), numbered by the restartCount it had."""

    index: int
    dir: pathlib.Path
    shim_pid: int = 0
    shim_start: int | None = None
    pid: int = 0
    start: int | None = None
    started_at: str = ""
    exit: dict[str, Any] | None = None
    started_mono: float = 0.0
    probes: dict[str, ProbeWorker] = field(default_factory=dict)
    killing: bool = False
    probing: bool = False  # its probe loops are started
    announced: bool = False  # its Started event is recorded
    env: dict[str, str] = field(default_factory=dict)  # the process environment (exec gets it too)

    @property
    def running(self) -> bool:
        return self.exit is None and self.pid > 0


@dataclass
class ContainerState:
    """The runtime's view of one container across attempts."""

    spec: dict[str, Any]
    init: bool
    dir: pathlib.Path
    restart_count: int = 0
    current: Attempt | None = None
    last: Attempt | None = None  # the previous finished attempt (lastState)
    waiting: tuple[str, str] = ("ContainerCreating", "")
    done: bool = False  # finished and not to be restarted

    @property
    def name(self) -> str:
        return str(self.spec.get("name", ""))


class Runtime:
    """Every pod this kubelet runs; also the :class:`ContainerAccess` for the kubelet API."""

    def __init__(self, root: pathlib.Path, api: volumes.Api, poll: float = 1.0, python: str = sys.executable,
                 events: EventSink = _no_events, dns: dnsmod.ClusterDNS | None = None) -> None:
        self.root = pathlib.Path(root)
        #: The kubelet's clusterDNS/clusterDomain and node resolver: each pod gets a resolv.conf
        #: formed from it and bound over /etc/resolv.conf (None: containers see the host's file).
        self.dns = dns
        self.events = events
        self.api = api
        self.poll = poll
        self.python = python
        self.workers: dict[str, PodWorker] = {}  # by uid
        self.backoff = Backoff()
        self.spawner = spawner.Spawner(self.root / "spawner.sock", python)  # started by the kubelet or the first spawn

    # ---------------------------------------------------------------- pods

    def pod_dir(self, uid: str) -> pathlib.Path:
        return self.root / "pods" / uid

    def log_dir(self, ns: str, name: str, uid: str) -> pathlib.Path:
        return self.root / "pods" / f"{ns}_{name}_{uid}"

    def start(self, pod: dict[str, Any], info: PodInfo, sink: StatusSink) -> PodWorker:
        """Run ``pod`` (idempotent: an existing worker just gets the newer object)."""
        w = self.workers.get(info.uid)
        if w is not None:
            w.pod = pod
            return w
        w = PodWorker(self, pod, info, sink)
        self.workers[info.uid] = w
        w.task = asyncio.create_task(w.run(), name=f"pod-{info.namespace}/{info.name}")
        return w

    async def stop(self, uid: str, grace: float | None = None) -> None:
        """Kill the pod's containers (SIGTERM, ``grace`` or the pod's grace period, SIGKILL) and
        remove its directories. Safe for pods this runtime does not know (it cleans their leftovers)."""
        w = self.workers.pop(uid, None)
        loop = asyncio.get_running_loop()
        if w is None:
            await loop.run_in_executor(None, self.cleanup_dirs, uid)
            return
        if w.task is not None:
            w.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w.task
        if w.spawning:  # a shim being started when the pod went: let it be recorded, then kill it too
            await asyncio.gather(*w.spawning, return_exceptions=True)
        g = grace if grace is not None else float((w.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        for cs in w.containers.values():
            if cs.current is not None and cs.current.running:
                w._event("Normal", "Killing", f"Stopping container {cs.name}", cs.name)
        await loop.run_in_executor(None, w.kill_all, g)
        await loop.run_in_executor(None, self.kill_recorded, uid)  # anything recorded the worker did not track
        await loop.run_in_executor(None, self.cleanup_dirs, uid)

    async def detach(self) -> None:
        """Stop syncing every pod but leave the containers running (kubelet shutdown: a restarted
        kubelet adopts them)."""
        for w in list(self.workers.values()):
            if w.task is not None:
                w.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await w.task
        self.workers.clear()
        await asyncio.get_running_loop().run_in_executor(None, self.spawner.close)

    async def reap_orphans(self, live: set[str]) -> None:
        """Kill and remove pods under the root that the API server no longer has (deleted while
        no kubelet ran): their recorded processes by PID + start time, then their directories."""
        loop = asyncio.get_running_loop()
        pods = self.root / "pods"
        uids = await loop.run_in_executor(None, lambda: [d.name for d in pods.glob("*") if (d / "pod.json").exists()])
        for uid in uids:
            if uid in live or uid in self.workers:
                continue
            _log.info("pod %s: gone from the API server; stopping its leftover containers", uid)
            await loop.run_in_executor(None, self.kill_recorded, uid)
            await loop.run_in_executor(None, self.cleanup_dirs, uid)

    def kill_recorded(self, uid: str, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL, every container and shim recorded for pod ``uid`` (blocking)."""
        recs = []
        for f in (self.pod_dir(uid) / "containers").glob("*/*/*.json"):
            if f.name in ("container.json", "shim.json"):
                rec = _read_json(f) or {}
                if rec.get("pid"):
                    recs.append((int(rec["pid"]), rec.get("start")))
        for pid, start in recs:
            procs.signal_process(pid, start, signal.SIGTERM)
        for pid, start in recs:
            if not procs.wait_gone(pid, start, grace):
                procs.signal_process(pid, start, signal.SIGKILL)
                procs.wait_gone(pid, start, 2.0)

    def kill_recorded_all(self, grace: float = 2.0) -> None:
        """Kill every pod's recorded processes under the root (blocking; ``lab down``, tests)."""
        for d in (self.root / "pods").glob("*/containers"):
            self.kill_recorded(d.parent.name, grace)

    def cleanup_dirs(self, uid: str) -> None:
        """Remove the pod's state and log directories (blocking). Only after its processes are gone:
        the container mounts live in their private mount namespaces, never in ours."""
        info = _read_json(self.pod_dir(uid) / "pod.json")
        shutil.rmtree(self.pod_dir(uid), ignore_errors=True)
        if info:
            shutil.rmtree(self.log_dir(info["namespace"], info["name"], uid), ignore_errors=True)

    def recorded_processes(self) -> list[tuple[int, int | None]]:
        """Every shim and container process recorded under the root (for ``lab down``)."""
        return recorded_processes(self.root)

    def _find(self, namespace: str, pod: str) -> PodWorker | None:
        for w in self.workers.values():
            if w.info.namespace == namespace and w.info.name == pod:
                return w
        return None

    def _container(self, namespace: str, pod: str, container: str) -> ContainerState:
        w = self._find(namespace, pod)
        if w is None:
            raise LookupError(f'pod "{namespace}/{pod}" not found on this node')
        cs = w.containers.get(container)
        if cs is None:
            names = " ".join(w.containers)
            raise LookupError(f"container {container} is not valid for pod {pod} (containers: {names})")
        return cs

    # ---------------------------------------------------------------- ContainerAccess

    def log_path(self, namespace: str, pod: str, container: str, previous: bool) -> pathlib.Path:
        cs = self._container(namespace, pod, container)
        w = self._find(namespace, pod)
        assert w is not None
        logs = self.log_dir(namespace, pod, w.info.uid) / container
        if previous:
            if cs.last is None or not (logs / f"{cs.last.index}.log").exists():
                raise LookupError(f'previous terminated container "{container}" in pod "{pod}" not found')
            return logs / f"{cs.last.index}.log"
        att = cs.current or cs.last
        if att is None or not (logs / f"{att.index}.log").exists():
            raise LookupError(f'container "{container}" in pod "{pod}" is waiting to start: {cs.waiting[0]}')
        return logs / f"{att.index}.log"

    def exec_argv(self, namespace: str, pod: str, container: str, command: list[str]) -> list[str]:
        cs = self._container(namespace, pod, container)
        att = cs.current
        if att is None or not att.running or not procs.same(att.pid, att.start):
            raise LookupError(f'container "{container}" in pod "{pod}" is not running')
        return [*exec_prefix(att), *command]

    def is_running(self, namespace: str, pod: str, container: str) -> bool:
        try:
            cs = self._container(namespace, pod, container)
        except LookupError:
            return False
        return cs.current is not None and cs.current.running


def exec_prefix(att: Attempt) -> list[str]:
    """The argv prefix that runs a command inside a running attempt's namespaces, with its
    environment (what ``kubectl exec``, exec probes and exec hooks use)."""
    envs = [f"{k}={v}" for k, v in att.env.items()]
    return ["nsenter", f"--target={att.pid}", "--net", "--mount", "--uts", "--root", "--wd", "--", "env", "-i", *envs]


def _implements_access(rt: Runtime) -> ContainerAccess:
    """Never called: mypy checks here that :class:`Runtime` is a ``ContainerAccess``."""
    return rt


def recorded_processes(root: pathlib.Path) -> list[tuple[int, int | None]]:
    """``(pid, start time)`` of every shim and container process recorded under a kubelet root,
    and of its shim spawner, whether or not they still run (the caller signals only those whose
    start time matches)."""
    spawned_by = spawner.recorded(pathlib.Path(root))
    out: list[tuple[int, int | None]] = [spawned_by] if spawned_by else []
    for f in (pathlib.Path(root) / "pods").glob("*/containers/*/*/*.json"):
        if f.name in ("shim.json", "container.json"):
            rec = _read_json(f) or {}
            if rec.get("pid"):
                out.append((int(rec["pid"]), rec.get("start")))
    return out


class PodWorker:
    """Runs one pod: see the module docstring for one sync's steps."""

    def __init__(self, rt: Runtime, pod: dict[str, Any], info: PodInfo, sink: StatusSink) -> None:
        self.rt = rt
        self.pod = pod
        self.info = info
        self.sink = sink
        self.task: asyncio.Task[None] | None = None
        self.dir = rt.pod_dir(info.uid)
        self.logs = rt.log_dir(info.namespace, info.name, info.uid)
        spec = pod.get("spec") or {}
        self.containers: dict[str, ContainerState] = {}
        for init, key in ((True, "initContainers"), (False, "containers")):
            for c in spec.get(key) or []:
                self.containers[c["name"]] = ContainerState(dict(c), init, self.dir / "containers" / c["name"])
        self.volumes: list[volumes.Volume] | None = None
        self.volumes_at = 0.0
        self.tokens: volumes.TokenCache = {}
        self.volume_error = ""
        status = pod.get("status") or {}
        # What an earlier kubelet reported stays: start time and condition transition times.
        self.started_at = str(status.get("startTime") or _rfc3339())
        self.transitions: dict[str, tuple[str, str]] = {
            c["type"]: (c.get("status", ""), c.get("lastTransitionTime") or _rfc3339())
            for c in status.get("conditions") or [] if c.get("type")}
        self.last_status: str = ""
        self.phase = "Pending"
        self.dns_warnings: list[tuple[str, str]] = []  # what forming its resolv.conf warned about
        self._probe_tasks: set[asyncio.Task[None]] = set()
        self.spawning: set[asyncio.Future[None]] = set()

    @property
    def hostname(self) -> str:
        """``spec.hostname`` or the pod's name, cut to 63 characters as upstream does (a DNS label)."""
        if self.info.host_network:
            return self.info.node
        name = str((self.pod.get("spec") or {}).get("hostname") or self.info.name)
        return name[:63].rstrip("-.") if len(name) > 63 else name

    @property
    def restart_policy(self) -> str:
        return str((self.pod.get("spec") or {}).get("restartPolicy") or "Always")

    def _key(self, cs: ContainerState) -> str:
        return f"{self.info.uid}/{cs.name}"

    # ---------------------------------------------------------------- loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._load)
        for reason, message in self.dns_warnings:
            self.rt.events(self.info, "Warning", reason, message, None)
        try:
            while True:
                try:
                    await self.sync()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a failing pod never stops the kubelet; it is retried next round
                    _log.exception("pod %s/%s: sync failed", self.info.namespace, self.info.name)
                await self._wait()
        finally:
            for t in list(self._probe_tasks):
                t.cancel()

    async def _wait(self) -> None:
        """Until the next sync: ``poll`` seconds, or sooner when a container whose shim was started
        is recorded as running (or exited) meanwhile, so its start, and Ready with it, is reported
        at once (upstream's pod worker is woken by the runtime's container-started event instead
        of waiting for the next relist). The looks are a ``stat`` each, after
        :data:`FIRST_RECHECK_S`, then twice as long each time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.rt.poll
        delay = FIRST_RECHECK_S
        while True:
            starting = [cs.current.dir for cs in self.containers.values()
                        if cs.current is not None and cs.current.pid == 0 and cs.current.exit is None]
            left = deadline - loop.time()
            if not starting or left <= delay:
                await asyncio.sleep(max(0.0, left))
                return
            await asyncio.sleep(delay)
            delay *= 2
            if any(os.path.exists(d / "container.json") or os.path.exists(d / "exit.json") for d in starting):
                return

    def _write_resolv_conf(self) -> None:
        """The pod's resolv.conf as the kubelet forms it and containerd writes it (once per
        worker, as upstream writes it once per sandbox); the kubelet's DNS warnings become events
        (:meth:`run` records them: this runs in a thread, the event sink on the loop)."""
        if self.rt.dns is None:
            return
        cfg = dnsmod.pod_dns(self.pod, dataclasses.replace(self.rt.dns, node_ips=self.info.host_ips))
        (self.dir / "resolv.conf").write_text(dnsmod.render(cfg))
        self.dns_warnings = cfg.warnings  # recorded by run(), on the loop (this runs in a thread)

    def _load(self) -> None:
        """Adopt what an earlier kubelet left: restart counts, back-off, live shims (blocking)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "pod.json", {"namespace": self.info.namespace, "name": self.info.name,
                                            "uid": self.info.uid, "node": self.info.node,
                                            "startedAt": self.started_at})
        hostname = self.hostname
        (self.dir / "etc-hostname").write_text(hostname + "\n")
        hosts = ["# Kubernetes-managed hosts file.", "127.0.0.1\tlocalhost",
                 "::1\tlocalhost ip6-localhost ip6-loopback", "fe00::0\tip6-localnet", "fe00::0\tip6-mcastprefix",
                 "fe00::1\tip6-allnodes", "fe00::2\tip6-allrouters"]
        spec = self.pod.get("spec") or {}
        # Upstream managedHostsFileContent: with spec.subdomain, the pod's FQDN
        # (<hostname>.<subdomain>.<ns>.svc.<cluster domain>) before its hostname; hostAliases after.
        domain = self.rt.dns.domain if self.rt.dns is not None else ""
        fqdn = f"{hostname}.{spec['subdomain']}.{self.info.namespace}.svc.{domain}\t" \
            if spec.get("subdomain") and domain else ""
        hosts += [f"{ip}\t{fqdn}{hostname}" for ip in self.info.pod_ips]
        aliases = [f"{a.get('ip', '')}\t" + "\t".join(a.get("hostnames") or []) for a in spec.get("hostAliases") or []]
        if aliases:
            hosts += ["", "# Entries added by HostAliases.", *aliases]
        (self.dir / "etc-hosts").write_text("\n".join(hosts) + "\n")
        self._write_resolv_conf()
        for cs in self.containers.values():
            st = _read_json(cs.dir / "state.json")
            if st is None:
                continue
            cs.restart_count = int(st.get("restartCount", 0))
            cs.done = bool(st.get("done"))
            if st.get("backoff"):
                self.rt.backoff.entries.pop(self._key(cs), None)
                from kubeemu.runtime.backoff import _Entry

                self.rt.backoff.entries[self._key(cs)] = _Entry(float(st["backoff"]), float(st["lastUpdate"]))
            for idx in (cs.restart_count - 1, cs.restart_count):
                if idx < 0 or not (cs.dir / str(idx)).is_dir():
                    continue
                att = self._read_attempt(idx, cs.dir / str(idx))
                if idx == cs.restart_count:
                    cs.current = att
                else:
                    cs.last = att
            cur = cs.current
            if cur is not None and cur.exit is None and not procs.same(cur.shim_pid, cur.shim_start) \
                    and not procs.same(cur.pid, cur.start):
                cur.exit = {"exitCode": 137, "reason": "Error", "finishedAt": _rfc3339(),
                            "startedAt": cur.started_at, "message": "the container's shim is gone"}
            if cur is not None and cur.running:
                # Probes start over (readiness is unknown again, as after a real kubelet's restart),
                # timed from when the container really started.
                age = max(0.0, time.time() - _parse_rfc3339(cur.started_at))
                cur.started_mono = time.monotonic() - age
                self._make_probes(cs, cur)
                cur.announced = True
                _log.info("pod %s/%s: adopted container %s (pid %d, attempt %d)", self.info.namespace,
                          self.info.name, cs.name, cur.pid, cur.index)

    def _read_attempt(self, idx: int, d: pathlib.Path) -> Attempt:
        att = Attempt(idx, d)
        shim = _read_json(d / "shim.json") or {}
        att.shim_pid, att.shim_start = int(shim.get("pid", 0)), shim.get("start")
        cont = _read_json(d / "container.json") or {}
        att.pid, att.start, att.started_at = int(cont.get("pid", 0)), cont.get("start"), cont.get("startedAt", "")
        att.exit = _read_json(d / "exit.json")
        att.env = dict((_read_json(d / "spec.json") or {}).get("env") or {})
        att.started_mono = time.monotonic()
        return att

    def _save(self, cs: ContainerState) -> None:
        e = self.rt.backoff.entries.get(self._key(cs))
        cs.dir.mkdir(parents=True, exist_ok=True)
        _write_json(cs.dir / "state.json", {"restartCount": cs.restart_count, "done": cs.done,
                                            "backoff": e.backoff if e else 0,
                                            "lastUpdate": e.last_update if e else 0})

    # ---------------------------------------------------------------- one sync

    async def sync(self) -> None:
        loop = asyncio.get_running_loop()
        if self.volumes is None or time.monotonic() - self.volumes_at > VOLUME_RESYNC_S:
            try:
                vols = await volumes.resolve(self.pod, self.rt.api, self.dir, self.info.host_ips, self.info.pod_ips,
                                             self.tokens)
                await loop.run_in_executor(None, volumes.apply, vols)
                self.volumes = vols
                self.volume_error = ""
            except volumes.VolumePending as e:
                if str(e) != self.volume_error:
                    _log.warning("pod %s/%s: %s", self.info.namespace, self.info.name, e)
                    self._event("Warning", "FailedMount", str(e))
                self.volume_error = str(e)
            self.volumes_at = time.monotonic()  # running pods keep their last good content meanwhile
        spawned = False
        if self.volumes is not None and self.phase not in ("Succeeded", "Failed"):
            if any(cs.current is not None and cs.current.exit is None for cs in self.containers.values()):
                await loop.run_in_executor(None, self._poll_attempts)  # (a new pod has nothing to read)
            for cs in self.containers.values():
                if cs.current is not None and cs.current.pid > 0 and not cs.current.announced:
                    cs.current.announced = True
                    if cs.current.exit is None or cs.current.exit.get("reason") != "StartError":
                        self._event("Normal", "Started", f"Started container {cs.name}", cs.name)
            before = {name: cs.current for name, cs in self.containers.items()}
            await self._drive()
            self._run_probes()
            spawned = any(cs.current is not before[name] and cs.current is not None and cs.current.pid == 0
                          for name, cs in self.containers.items())
        if spawned:
            # Coalesced, as upstream's status manager sends only the latest of the statuses set
            # meanwhile: the next sync, as soon as the container is recorded as started and at
            # the latest after ``poll`` (:meth:`_wait`), reports the pod with it (one PATCH,
            # and one event to every pod watcher, instead of two).
            return
        await self._report()

    def _poll_attempts(self) -> None:
        """Step 2: what the shims recorded (blocking, file reads)."""
        for cs in self.containers.values():
            att = cs.current
            if att is None or att.exit is not None:
                continue
            if att.pid == 0:
                cont = _read_json(att.dir / "container.json")
                if cont:
                    att.pid, att.start, att.started_at = int(cont["pid"]), cont.get("start"), cont["startedAt"]
                    att.started_mono = time.monotonic()
                    self._make_probes(cs, att)
            ex = _read_json(att.dir / "exit.json")
            if ex is not None:
                att.exit = ex
            elif not procs.same(att.shim_pid, att.shim_start) and not procs.same(att.pid, att.start):
                att.exit = _read_json(att.dir / "exit.json") or {
                    "exitCode": 137, "reason": "Error", "startedAt": att.started_at, "finishedAt": _rfc3339(),
                    "message": "the container's shim exited without recording an exit code"}
            if att.exit is not None:
                _log.info("pod %s/%s: container %s exited with %s", self.info.namespace, self.info.name, cs.name,
                          att.exit.get("exitCode"))

    def _make_probes(self, cs: ContainerState, att: Attempt) -> None:
        for kind in ("startup", "readiness", "liveness"):
            probe = cs.spec.get(f"{kind}Probe")
            if probe and not cs.init:
                att.probes[kind] = ProbeWorker(kind, probe, att.started_mono)

    async def _drive(self) -> None:
        """Step 3: start, restart or leave each container (init containers first, one at a time)."""
        inits = [c for c in self.containers.values() if c.init]
        for cs in inits:
            if cs.done and cs.current is not None and cs.current.exit and cs.current.exit.get("exitCode") == 0:
                continue
            await self._drive_one(cs, init=True)
            return  # the next init container (and the app containers) wait for this one
        for cs in self.containers.values():
            if not cs.init:
                await self._drive_one(cs, init=False)

    def _should_restart(self, code: int) -> bool:
        pol = self.restart_policy
        return pol == "Always" or (pol == "OnFailure" and code != 0)

    async def _drive_one(self, cs: ContainerState, init: bool) -> None:
        att = cs.current
        if att is not None and att.exit is None:
            return  # starting or running
        if att is not None and att.exit is not None:
            code = int(att.exit.get("exitCode", 0))
            restart = (code != 0 and self.restart_policy != "Never") if init else self._should_restart(code)
            if not restart:
                if not cs.done:
                    cs.done = True
                    await asyncio.get_running_loop().run_in_executor(None, self._save, cs)
                return
            finished = _parse_rfc3339(att.exit.get("finishedAt"))
            key, now = self._key(cs), time.time()
            if self.rt.backoff.is_in_backoff_since(key, finished, now):
                delay = self.rt.backoff.get(key)
                if cs.waiting[0] != "CrashLoopBackOff":
                    self._event("Warning", "BackOff", f"Back-off restarting failed container {cs.name} in pod "
                                f"{self.info.name}_{self.info.namespace}({self.info.uid})", cs.name)
                cs.waiting = ("CrashLoopBackOff", f"back-off {delay:g}s restarting failed container={cs.name} "
                              f"pod={self.info.name}_{self.info.namespace}({self.info.uid})")
                return
        await self._start(cs, restart=att is not None)

    async def _start(self, cs: ContainerState, restart: bool) -> None:
        """Start the container's next attempt through a new shim. Its configuration is built
        first: when that fails (``CreateContainerConfigError``) nothing is counted, so the
        restart count and back-off only move for attempts that really start."""
        loop = asyncio.get_running_loop()
        try:
            objects = await self._env_objects(cs.spec)
            env = envmod.build_env(self.pod, cs.spec, objects, self.info.host_ips, self.info.pod_ips)
        except envmod.ConfigError as e:
            if cs.waiting != ("CreateContainerConfigError", str(e)):
                self._event("Warning", "Failed", f"Error: {e}", cs.name)
            cs.waiting = ("CreateContainerConfigError", str(e))
            return
        argv = envmod.command_line(cs.spec, env)
        index = cs.restart_count + 1 if restart else cs.restart_count
        att = Attempt(index, cs.dir / str(index))
        if restart:
            cs.restart_count = index
            self.rt.backoff.next(self._key(cs), time.time())  # before the spawn saves it in state.json
        fut = loop.run_in_executor(None, self._spawn, cs, att, env, argv)
        self.spawning.add(fut)  # stop() waits for it: a shim must never start unseen
        fut.add_done_callback(self.spawning.discard)
        try:
            await fut
        except (OSError, volumes.VolumePending) as e:
            _log.error("pod %s/%s: container %s did not start: %s", self.info.namespace, self.info.name, cs.name, e)
            if restart:
                cs.restart_count -= 1
            cs.waiting = ("CreateContainerError", str(e))
            self._event("Warning", "Failed", f"Error: {e}", cs.name)
            return
        if restart:
            cs.last = cs.current
        cs.current = att
        cs.waiting = ("ContainerCreating", "")
        self._event("Normal", "Created", f"Created container {cs.name}", cs.name)

    async def _env_objects(self, spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any] | None]:
        ns = self.info.namespace
        wanted: set[tuple[str, str]] = set()
        for src in spec.get("envFrom") or []:
            if src.get("configMapRef"):
                wanted.add(("ConfigMap", src["configMapRef"].get("name", "")))
            if src.get("secretRef"):
                wanted.add(("Secret", src["secretRef"].get("name", "")))
        for e in spec.get("env") or []:
            vf = e.get("valueFrom") or {}
            if vf.get("configMapKeyRef"):
                wanted.add(("ConfigMap", vf["configMapKeyRef"].get("name", "")))
            if vf.get("secretKeyRef"):
                wanted.add(("Secret", vf["secretKeyRef"].get("name", "")))
        out: dict[tuple[str, str], dict[str, Any] | None] = {}
        for kind, name in wanted:
            plural = "configmaps" if kind == "ConfigMap" else "secrets"
            out[(kind, name)] = await self.rt.api.get(f"/api/v1/namespaces/{ns}/{plural}/{name}")
        return out

    def _spawn(self, cs: ContainerState, att: Attempt, env: dict[str, str], argv: list[str]) -> None:
        """Write the attempt's spec and have the spawner fork its shim in the pod's namespaces (blocking)."""
        assert self.volumes is not None
        if att.dir.exists():
            shutil.rmtree(att.dir)  # a half-made attempt of an earlier kubelet
        att.dir.mkdir(parents=True)
        log_dir = self.logs / cs.name
        log_dir.mkdir(parents=True, exist_ok=True)
        mounts = [m.to_json() for m in volumes.container_mounts(cs.spec, self.volumes)]
        mounts += [{"source": str(self.dir / "etc-hostname"), "target": "/etc/hostname", "readOnly": False},
                   {"source": str(self.dir / "etc-hosts"), "target": "/etc/hosts", "readOnly": False}]
        if self.rt.dns is not None:
            mounts.append({"source": str(self.dir / "resolv.conf"), "target": "/etc/resolv.conf", "readOnly": False})
        att.env = envmod.process_env(self.pod, env)
        spec: dict[str, Any] = {"hostname": self.hostname,
                                "rootDir": str(att.dir), "mounts": mounts, "argv": argv, "env": att.env,
                                "workingDir": cs.spec.get("workingDir") or "/",
                                "log": str(log_dir / f"{att.index}.log")}
        _write_json(att.dir / "spec.json", spec)
        self._save(cs)
        att.shim_pid, att.shim_start = self.rt.spawner.spawn(att.dir / "spec.json", self.info.netns_path,
                                                             att.dir / "shim.log")
        _write_json(att.dir / "shim.json", {"pid": att.shim_pid, "start": att.shim_start})
        _log.info("pod %s/%s: container %s attempt %d: shim %d runs %s", self.info.namespace, self.info.name,
                  cs.name, att.index, att.shim_pid, argv)

    # ---------------------------------------------------------------- probes

    def _run_probes(self) -> None:
        """Step 4: one probe loop per probe of a running attempt; act on startup/liveness failures."""
        for cs in self.containers.values():
            att = cs.current
            if att is None or not att.running or att.killing:
                continue
            if not att.probing:
                att.probing = True
                for pw in att.probes.values():
                    t = asyncio.create_task(self._probe_loop(cs, att, pw))
                    self._probe_tasks.add(t)
                    t.add_done_callback(self._probe_tasks.discard)
            for kind in ("startup", "liveness"):
                bad = att.probes.get(kind)
                if bad is not None and bad.result is False and not att.killing:
                    _log.info("pod %s/%s: container %s failed %s probe (%s), will be restarted", self.info.namespace,
                              self.info.name, cs.name, kind, bad.message)
                    self._event("Normal", "Killing",
                                f"Container {cs.name} failed {kind} probe, will be restarted", cs.name)
                    att.killing = True
                    grace = float(bad.probe.get("terminationGracePeriodSeconds")
                                  or (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
                    t = asyncio.create_task(self._kill_async(att, grace, cs))
                    self._probe_tasks.add(t)
                    t.add_done_callback(self._probe_tasks.discard)

    async def _probe_loop(self, cs: ContainerState, att: Attempt, pw: ProbeWorker) -> None:
        """Run one probe on its own schedule (``periodSeconds`` exactly, not the sync's pace) while
        the attempt runs; readiness and liveness wait for the startup probe to succeed."""
        startup = att.probes.get("startup")
        while att.running and not att.killing:
            now = time.monotonic()
            if pw.kind != "startup" and startup is not None and startup.result is not True:
                await asyncio.sleep(0.2)
                continue
            if pw.kind == "startup" and pw.result is True:
                return
            if now < pw.next_due:
                await asyncio.sleep(min(pw.next_due - now, 1.0))
                continue
            pw.running = True
            await self._probe(cs, att, pw)

    async def _kill_async(self, att: Attempt, grace: float, cs: ContainerState | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._kill, att, grace, cs)

    async def _probe(self, cs: ContainerState, att: Attempt, pw: ProbeWorker) -> None:
        ip = self.info.pod_ips[0] if self.info.pod_ips else "127.0.0.1"
        prefix = None
        with contextlib.suppress(LookupError):
            prefix = self.rt.exec_argv(self.info.namespace, self.info.name, cs.name, [])
        ok, msg = await asyncio.get_running_loop().run_in_executor(
            None, run_probe, pw.probe, cs.spec, ip, self.info.netns_path, prefix)
        before = pw.result
        pw.record(ok, msg)
        if not ok and before is not False and att.running:
            self._event("Warning", "Unhealthy", f"{pw.kind.capitalize()} probe failed: {msg}", cs.name)

    # ---------------------------------------------------------------- killing

    def _pre_stop(self, att: Attempt, cs: ContainerState, grace: float) -> float:
        """Run the container's ``lifecycle.preStop`` hook (exec, httpGet or sleep) within ``grace``
        and return the grace left for SIGTERM: at least 2 s, as upstream's killContainer
        (minimumGracePeriodInSeconds). A failed hook is logged and the kill goes on, as upstream."""
        hook = ((cs.spec.get("lifecycle") or {}).get("preStop")) or {}
        if not hook or not att.running:
            return grace
        began = time.monotonic()
        if "sleep" in hook:
            time.sleep(min(float((hook["sleep"] or {}).get("seconds") or 0), grace))
        else:
            # The pod may already be gone from the runtime's table (deletion): reach the attempt itself.
            prefix = exec_prefix(att) if procs.same(att.pid, att.start) else None
            ip = self.info.pod_ips[0] if self.info.pod_ips else "127.0.0.1"
            ok, msg = run_probe({**hook, "timeoutSeconds": max(grace, 1.0)}, cs.spec, ip, self.info.netns_path, prefix)
            if not ok:
                _log.warning("pod %s/%s: container %s: PreStopHook failed: %s", self.info.namespace, self.info.name,
                             cs.name, msg)
        return max(grace - (time.monotonic() - began), 2.0)

    def _kill(self, att: Attempt, grace: float, cs: ContainerState | None = None) -> None:
        """Run the preStop hook, SIGTERM the container process, wait the grace left, SIGKILL; then
        wait for the shim (blocking)."""
        if cs is not None:
            grace = self._pre_stop(att, cs, grace)
        if procs.signal_process(att.pid, att.start, signal.SIGTERM) and not procs.wait_gone(att.pid, att.start, grace):
            procs.signal_process(att.pid, att.start, signal.SIGKILL)
            procs.wait_gone(att.pid, att.start, 5.0)
        if not procs.wait_gone(att.shim_pid, att.shim_start, 5.0):
            procs.signal_process(att.shim_pid, att.shim_start, signal.SIGKILL)
            procs.wait_gone(att.shim_pid, att.shim_start, 2.0)

    def kill_all(self, grace: float) -> None:
        """Kill every container of the pod in parallel (blocking; used on pod deletion)."""
        import threading

        threads = [threading.Thread(target=self._kill, args=(cs.current, grace, cs), daemon=True)
                   for cs in self.containers.values() if cs.current is not None]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for cs in self.containers.values():
            self.rt.backoff.forget(self._key(cs))

    # ---------------------------------------------------------------- status

    def _container_status(self, cs: ContainerState) -> dict[str, Any]:
        """One ``containerStatuses`` entry: state from the current attempt, lastState from the one before."""
        att = cs.current
        st: dict[str, Any] = {"name": cs.name, "image": cs.spec.get("image", ""), "imageID": "",
                              "restartCount": cs.restart_count, "ready": False, "started": False}
        prev = cs.last if cs.last is not att else None
        last: dict[str, Any] = {"terminated": self._terminated(prev)} if prev is not None and prev.exit else {}
        if att is not None and att.exit is not None:
            if cs.waiting[0] in _WAITING_AGAIN and not cs.done:
                state: dict[str, Any] = {"waiting": {"reason": cs.waiting[0], "message": cs.waiting[1]}}
                last = {"terminated": self._terminated(att)}
            else:
                state = {"terminated": self._terminated(att)}
        elif att is not None and att.running:
            state = {"running": {"startedAt": att.started_at}}
            startup = att.probes.get("startup")
            started = startup is None or startup.result is True
            readiness = att.probes.get("readiness")
            st["started"] = started and not cs.init
            st["ready"] = started and not cs.init and (readiness is None or readiness.result is True)
        else:
            reason, message = cs.waiting
            if not cs.init and any(c.init and not c.done for c in self.containers.values()):
                reason, message = "PodInitializing", ""
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        st["state"] = state
        st["lastState"] = last
        if att is not None:
            st["containerID"] = self._container_id(cs.name, att.index)
        return st

    def _container_id(self, name: str, index: int) -> str:
        return "kubeemu://" + hashlib.sha256(f"{self.info.uid}/{name}/{index}".encode()).hexdigest()

    def _terminated(self, att: Attempt) -> dict[str, Any]:
        ex = att.exit or {}
        out = {"exitCode": int(ex.get("exitCode", 0)), "reason": ex.get("reason") or "Error",
               "startedAt": _rfc3339(_parse_rfc3339(ex.get("startedAt") or att.started_at) or None),
               "finishedAt": _rfc3339(_parse_rfc3339(ex.get("finishedAt")) or None),
               "containerID": self._container_id(att.dir.parent.name, att.index)}
        if ex.get("message"):
            out["message"] = ex["message"]
        if ex.get("signal"):
            out["signal"] = ex["signal"]
        return out

    def _phase(self, statuses: list[dict[str, Any]], inits_done: bool) -> str:
        """Upstream ``getPhase``."""
        if self.phase in ("Succeeded", "Failed"):
            return self.phase
        init_failed = any(c.init and c.done and c.current and c.current.exit
                          and c.current.exit.get("exitCode") != 0 for c in self.containers.values())
        if init_failed:
            return "Failed"
        if not inits_done:
            return "Pending"
        running = stopped = succeeded = waiting = 0
        for s in statuses:
            state = s["state"]
            if "running" in state:
                running += 1
            elif "terminated" in state:
                stopped += 1
                succeeded += state["terminated"]["exitCode"] == 0
            elif (s.get("lastState") or {}).get("terminated"):
                stopped += 1
            else:
                waiting += 1
        if waiting:
            return "Pending"
        if running:
            return "Running"
        if stopped:
            if self.restart_policy == "Always":
                return "Running"
            if stopped == succeeded:
                return "Succeeded"
            if self.restart_policy == "Never":
                return "Failed"
            return "Running"
        return "Pending"

    def _cond(self, ctype: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        status = "True" if ok else "False"
        prev = self.transitions.get(ctype)
        if prev is None or prev[0] != status:
            self.transitions[ctype] = (status, _rfc3339())
        c: dict[str, Any] = {"type": ctype, "status": status, "lastProbeTime": None,
                             "lastTransitionTime": self.transitions[ctype][1]}
        if reason and not ok:
            c["reason"] = reason
        if message and not ok:
            c["message"] = message
        return c

    def status(self) -> dict[str, Any]:
        """The pod's status as the kubelet reports it (step 5)."""
        apps = [self._container_status(c) for c in self.containers.values() if not c.init]
        inits = [self._container_status(c) for c in self.containers.values() if c.init]
        pending_inits = [c.name for c in self.containers.values()
                         if c.init and not (c.done and c.current and c.current.exit
                                            and c.current.exit.get("exitCode") == 0)]
        self.phase = self._phase(apps, not pending_inits)
        unready = [s["name"] for s in apps if not s["ready"]]
        terminal = self.phase in ("Succeeded", "Failed")
        ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        ready_msg = "" if terminal else f"containers with unready status: [{' '.join(unready)}]"
        conds = [
            self._cond("PodReadyToStartContainers", not terminal),
            self._cond("Initialized", not pending_inits, "PodCompleted" if terminal else "ContainersNotInitialized",
                       "" if terminal else f"containers with incomplete status: [{' '.join(pending_inits)}]"),
            self._cond("Ready", not unready and not terminal, ready_reason, ready_msg),
            self._cond("ContainersReady", not unready and not terminal, ready_reason, ready_msg),
            self._cond("PodScheduled", True),
        ]
        ips = list(self.info.pod_ips)
        st: dict[str, Any] = {"phase": self.phase, "conditions": conds, "containerStatuses": apps,
                              "hostIP": self.info.host_ip, "hostIPs": [{"ip": i} for i in self.info.host_ips],
                              "podIP": ips[0] if ips else None, "podIPs": [{"ip": i} for i in ips],
                              "startTime": self.started_at, "qosClass": _qos(self.pod)}
        if inits:
            st["initContainerStatuses"] = inits
        return st

    def _event(self, etype: str, reason: str, message: str, container: str | None = None) -> None:
        try:
            self.rt.events(self.info, etype, reason, message, container)
        except Exception:  # events are best effort; they never stop a pod
            _log.exception("pod %s/%s: recording event %s failed", self.info.namespace, self.info.name, reason)

    async def _report(self) -> None:
        st = self.status()
        text = json.dumps(st, sort_keys=True)
        if text != self.last_status:
            await self.sink(st)
            self.last_status = text


def _qos(pod: dict[str, Any]) -> str:
    """Upstream ``GetPodQOS`` (simplified to the three classes from requests/limits presence)."""
    cs = [*((pod.get("spec") or {}).get("containers") or []), *((pod.get("spec") or {}).get("initContainers") or [])]
    reqs = [(c.get("resources") or {}).get("requests") or {} for c in cs]
    lims = [(c.get("resources") or {}).get("limits") or {} for c in cs]
    if not any(reqs) and not any(lims):
        return "BestEffort"
    guaranteed = all(
        lim.get(r) is not None and (req.get(r, lim.get(r)) == lim.get(r)) for req, lim in zip(reqs, lims, strict=True)
        for r in ("cpu", "memory"))
    return "Guaranteed" if guaranteed else "Burstable"
