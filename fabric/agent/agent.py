"""fabric-agent: the per-node agent.

Life of an agent
----------------
1. Read the configuration (flags, environment) and find the underlay interface holding
   ``--underlay-ip``; refuse to start, naming the value, if there is none.
2. Open a session with the reflector and announce the node. The reflector answers with the
   node's planned state as a snapshot, END_OF_SNAPSHOT, then deltas.
3. Nothing in the kernel is touched, and above all nothing is deleted, until the first complete
   snapshot has arrived: an agent restarting (or a reflector restarting) must never tear down
   tunnels that are carrying traffic. The first pass after the snapshot reads the kernel back
   and programs only the difference, so a restart with an unchanged plan changes nothing.
4. Every later delta, every resync tick (``--resync-period``, jittered by up to 20 % so a
   fleet does not dump its tables in lockstep) and every netlink event that shows someone
   changed what we own (our device deleted or set down, a route removed) triggers a pass:
   render the planned state into kernel objects (:mod:`fabric.agent.render`), diff against a fresh
   read of the kernel where a resync is due, apply the delta (:mod:`fabric.netlink`).
5. After a clean pass the agent reports the applied version to the reflector. A pass with
   failed entries schedules a retry with backoff and a full resync; it never aborts half way.
6. Losing the reflector changes nothing in the dataplane: the last good state stays
   programmed and keeps being repaired; the session reconnects in the background.
7. Peers the plan marks ``probe`` (the active and standby gateways this node depends on) are
   probed through the tunnel every ``--probe-interval`` (:mod:`fabric.agent.probes`); the set
   of peers that stopped answering is reported on the session whenever it changes. The
   reflector moves gateway roles from these reports; the agent itself never reroutes on its own
   (one decision maker: no split brain).
8. When the underlay device regains carrier (``IFF_LOWER_UP`` off -> on, seen on
   ``RTNLGRP_LINK`` by :mod:`fabric.agent.carrier`), the worker deletes that device's
   *unresolved* neighbour entries (``INCOMPLETE``/``FAILED`` only) so the next probe solicits at
   once instead of at the kernel's next 1 s retransmit (issue 18: heal within 1 s). This is the
   one delete outside what we own; carrier.py's header says why it is safe.
9. While the plan routes anything over several active gateways (``RouteEntry.vias``), each
   pass keeps the namespace's ``net.ipv4.fib_multipath_hash_seed`` at the fabric's seed
   (derived from the fabric CA, or ``--multipath-hash-seed``), and for IPv6 ones the IPv6 hash
   on addresses only, before it programs the routes, so every node hashes a flow alike and its
   replies cross the gateway of its requests
   (:mod:`fabric.agent.multipath` says why, and what the kernel does with it).

Passes run in one worker thread (netlink calls block); the session, timers and HTTP
endpoints run on the asyncio loop. An unexpected exception anywhere is a bug: the process
logs it and exits non-zero so its supervisor restarts it into a clean resync.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import ipaddress
import json
import logging
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from fabric import health, logs, nodeinfo, types
from fabric.agent import carrier as carrier_mod
from fabric.agent import config as config_mod
from fabric.agent import multipath as multipath_mod
from fabric.agent import probes as probes_mod
from fabric.agent import quality as quality_mod
from fabric.agent import render, xlate_metrics
from fabric.agent import translator as translator_mod
from fabric.backoff import Backoff
from fabric.control import bootstrap, identity, tls
from fabric.control import client as control_client
from fabric.netlink import dataplane as dataplane_mod
from fabric.netlink import events as events_mod
from fabric.netlink import neighbours as neighbours_mod
from fabric.netlink import objects
from fabric.netlink import reconciler as reconciler_mod
from fabric.netlink import underlay as underlay_mod

_log = logging.getLogger(__name__)

#: Coalesce bursts (a snapshot followed by deltas, a flurry of netlink events) into one pass.
DEBOUNCE_S = 0.05
#: First retry after a failed pass; doubles (jittered, fabric.backoff) up to the resync period.
RETRY_MIN_S = 0.5
#: How often, at most, the probes' quality is judged for a report (quality.QualityGate decides).
QUALITY_CHECK_S = 1.0
#: /healthz tolerates this much beyond the resync period without a successful pass.
HEALTH_GRACE_S = 60.0
OWNED_LINKS = frozenset({*types.TUNNEL_DEVICES, types.HAIRPIN_DEVICE})


class Events(Protocol):
    """What the agent needs of a netlink event monitor (tests substitute their own)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


#: Builds the event monitor: ``(callback, owned link names, table) -> monitor``.
EventsFactory = Callable[[Callable[[str], None], frozenset[str], int], Events]


class CarrierWatch(Protocol):
    """What the agent needs of the underlay carrier monitor (tests substitute their own)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


#: Builds the carrier monitor: ``(on_carrier_up(ifindex)) -> monitor``; started on the loop.
CarrierFactory = Callable[[Callable[[int], None]], CarrierWatch]


class Prober(Protocol):
    """What the agent needs of the tunnel prober (tests substitute their own)."""

    def set_targets(self, targets: dict[str, tuple[str, str]]) -> None: ...
    def start(self) -> None: ...
    async def stop(self) -> None: ...


#: Builds the prober: ``(on_change(down peer names), config) -> prober``.
ProberFactory = Callable[[Callable[[frozenset[str]], None], config_mod.AgentConfig], Prober]


def _kernel_prober(on_change: Callable[[frozenset[str]], None], cfg: config_mod.AgentConfig) -> Prober:
    return probes_mod.TunnelProber(on_change, interval_s=cfg.probe_interval_s, multiplier=cfg.probe_multiplier)


@dataclasses.dataclass
class _Pending:
    state: types.NodeState | None = None
    version: int = 0
    resync: bool = True  # the first pass always reads the kernel back
    reason: str = "startup"


class Agent(control_client.SessionHandler):
    def __init__(
        self,
        cfg: config_mod.AgentConfig,
        dp: dataplane_mod.Dataplane,
        *,
        events_factory: EventsFactory = events_mod.EventMonitor,
        prober_factory: ProberFactory = _kernel_prober,
        carrier_factory: CarrierFactory = carrier_mod.CarrierMonitor,
        handle_signals: bool = True,
    ) -> None:
        self.cfg = cfg
        self._carrier_factory = carrier_factory
        self._carrier: CarrierWatch | None = None
        #: Flushes handed to the worker and not finished yet (held so they are not collected).
        self._flushes: set[asyncio.Future[None]] = set()
        self._events_factory = events_factory
        self._handle_signals = handle_signals
        self._stop: asyncio.Event | None = None
        self.dp = dp
        self.underlay = dp.underlay_link(cfg.underlay_ip)
        # Dual stack: the interface holding the IPv6 underlay address (vx-*-6 bind to it).
        self.underlay6 = dp.underlay_link(cfg.underlay_ip6) if cfg.underlay_ip6 else None
        self.reconciler = reconciler_mod.Reconciler(
            dp, table=cfg.table, rule_priority=cfg.rule_priority, link_names=OWNED_LINKS
        )
        self.metrics = health.AgentMetrics()
        # Global IP (fabric/agent/translator.py): loaded lazily, only once the plan has translations.
        self.translator = translator_mod.TranslatorSync(
            translator_mod.instance_name(cfg.cluster, cfg.node), Path(cfg.bpf_pin_root)
        )
        self.session = control_client.AgentSession(
            cfg.reflector,
            config_mod.announcement(cfg, self.underlay.mtu),
            self,
            keepalive_interval=cfg.keepalive_interval_s,
            tls_dir=tls.TLSDir(Path(cfg.tls_dir)) if cfg.tls_dir else None,
        )
        #: Gets (with --bootstrap-dir) and renews this node's certificate; None on plaintext.
        self.certificates = (
            bootstrap.CertificateKeeper(
                cfg.issuer or cfg.reflector, tls.TLSDir(Path(cfg.tls_dir)), identity.node(cfg.cluster, cfg.node),
                tls.TLSDir(Path(cfg.bootstrap_dir)) if cfg.bootstrap_dir else None, metrics=self.metrics,
            )
            if cfg.tls_dir and not cfg.insecure
            else None
        )
        #: The fabric-wide multipath hash seed, set while the plan has active/active routes.
        self.multipath = multipath_mod.MultipathHash(seed_source(cfg))
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconcile")
        self._applied_state: types.NodeState | None = None
        self._reported_version = -1
        self._started = time.monotonic()
        self._last_success: float | None = None
        self._first_applied = False
        #: Paces the retries of failed passes; reset by a clean pass (attempts 0: not failing).
        self._retry = Backoff(RETRY_MIN_S, max(RETRY_MIN_S, cfg.resync_period_s))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: Events | None = None
        self._fatal: BaseException | None = None
        #: The kernel tables the last pass asked for (``/debug/state``); written by the worker.
        self._desired_kernel: objects.KernelState | None = None
        self._applied_version = 0
        self._role = ""
        self._probe_names: set[str] = set()
        #: The probed peers last reported unreachable, and when quality may next be judged.
        self._down_keys: frozenset[types.NodeKey] = frozenset()
        self._quality_gate = quality_mod.QualityGate()
        self._quality_checked = -float("inf")
        self.prober = prober_factory(self._on_probe_change, cfg)
        if isinstance(self.prober, probes_mod.TunnelProber):
            self.prober.on_sample = self._on_probe_sample
        self.metrics.last_sync_age.set_function(self._sync_age)

    # -- SessionHandler --------------------------------------------------------------------

    async def on_snapshot(self, state: types.NodeState, version: int) -> None:
        _log.info("snapshot received: version=%d entries=%d", version, len(state))
        self._set_state(state, version, "snapshot")

    async def on_delta(self, delta: types.StateDelta, version: int) -> None:
        if self._pending.state is None:
            # Cannot happen with a correct client (deltas follow a snapshot); if it does, it
            # is a bug, and guessing would risk deleting live tunnels.
            raise RuntimeError(f"delta for version {version} arrived before any snapshot")
        _log.debug("delta received: version=%d upserts=%d removals=%d", version, len(delta.upserts),
                   len(delta.removals))
        self._set_state(types.apply_delta(self._pending.state, delta), version, "delta")

    async def on_connection(self, connected: bool, reason: str) -> None:
        self.metrics.session_connected.set(1 if connected else 0)
        if connected:
            self.metrics.session_reconnects.inc()
            _log.info("session to reflector %s established", self.cfg.reflector)
            # The reflector may be new: make sure it learns what we have applied.
            self._reported_version = -1
        else:
            _log.info("session to reflector %s lost (%s); keeping the last good dataplane", self.cfg.reflector, reason)

    async def on_rejected(self, reason: str) -> None:
        self.metrics.rejections.inc()
        _log.error("reflector rejected this node's announcement: %s", reason)

    # -- scheduling ------------------------------------------------------------------------

    def _on_probe_sample(self, name: str, rtt: float | None) -> None:
        cluster = _peer_cluster(name)
        self.metrics.probes_sent.labels(cluster=cluster).inc()
        if rtt is None:
            self.metrics.probes_lost.labels(cluster=cluster).inc()
        else:
            self.metrics.probe_rtt.labels(cluster=cluster).observe(rtt)
        self._update_tunnel_metrics()
        now = time.monotonic()
        if now - self._quality_checked >= QUALITY_CHECK_S:
            self._quality_checked = now
            current = self._probe_quality()
            if self._quality_gate.due(current, now):
                self._report(current, now)

    def _probe_quality(self) -> dict[str, quality_mod.Quality]:
        return self.prober.state.quality() if isinstance(self.prober, probes_mod.TunnelProber) else {}

    def _report(self, current: dict[str, quality_mod.Quality], now: float) -> None:
        """Send the unreachable set and ``current`` quality (peers with a cluster/node name)."""
        keyed: dict[types.NodeKey, quality_mod.Quality] = {}
        for name, q in current.items():
            with contextlib.suppress(ValueError):
                keyed[types.NodeKey.parse(name)] = q
        self.session.report_unreachable(self._down_keys, keyed)
        self._quality_gate.mark(current, now)

    def _update_tunnel_metrics(self) -> None:
        """Per peer and per peer cluster: up (some probed peer answers) and recent loss."""
        stats = self.prober.stats() if isinstance(self.prober, probes_mod.TunnelProber) else []
        by_cluster: dict[str, list[probes_mod.TargetStats]] = {}
        for st in stats:
            by_cluster.setdefault(_peer_cluster(st.name), []).append(st)
            self.metrics.peer_up.labels(peer=st.name).set(1 if st.up else 0)
        for cluster, sts in by_cluster.items():
            self.metrics.tunnel_up.labels(cluster=cluster).set(1 if any(s.up for s in sts) else 0)
            self.metrics.probe_loss.labels(cluster=cluster).set(sum(s.loss_ratio for s in sts) / len(sts))

    def _on_probe_change(self, down: frozenset[str]) -> None:
        self._update_tunnel_metrics()
        keys = set()
        for name in down:
            try:
                keys.add(types.NodeKey.parse(name))
            except ValueError:
                _log.warning("probed peer %r has no cluster/node name; not reported", name)
        self._down_keys = frozenset(keys)
        self._report(self._probe_quality(), time.monotonic())

    def _set_state(self, state: types.NodeState, version: int, reason: str) -> None:
        role = gateway_role(state)
        if role != self._role:
            _log.info("gateway role of this node: %s (was %s)", role, self._role or "unknown")
            self._role = role
            self.metrics.set_role(role)
        # One target per probed node. A dual-stack peer is planned on both families' devices;
        # it is probed over IPv4 (the node and its underlay share fate, one family suffices),
        # an IPv6-only peer over IPv6 (probes.py speaks ICMPv6 too).
        targets: dict[str, tuple[str, str]] = {}
        for p in sorted((p for p in state.peers if p.probe), key=lambda p: types.family_of(p.overlay_ip), reverse=True):
            targets[p.node or p.overlay_ip] = (p.overlay_ip, p.device)
        self.prober.set_targets(targets)
        for gone in self._probe_names - targets.keys():
            # A peer no longer probed must not keep reporting its last state forever.
            with contextlib.suppress(KeyError):
                self.metrics.peer_up.remove(gone)
        self._probe_names = set(targets)
        self._pending.state = state
        self._pending.version = version
        self._pending.reason = reason
        self._wake.set()

    def request_resync(self, reason: str) -> None:
        """Thread-safe: ask for a pass that re-reads the kernel first."""
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._request_resync_now, reason)

    def _request_resync_now(self, reason: str) -> None:
        self._pending.resync = True
        self._pending.reason = reason
        if self._pending.state is not None:
            self._wake.set()

    # -- underlay carrier ------------------------------------------------------------------

    def _on_carrier_up(self, ifindex: int) -> None:
        """On the loop: a link regained carrier; if it is our underlay, flush its unresolved
        neighbours in the worker (see :mod:`fabric.agent.carrier`)."""
        links = [u for u in (self.underlay, self.underlay6) if u is not None and u.ifindex == ifindex]
        if not links or self._loop is None:
            return
        fut = self._loop.run_in_executor(self._executor, self._flush_unresolved, links[0].name)
        self._flushes.add(fut)
        fut.add_done_callback(self._flushes.discard)

    def _flush_unresolved(self, link: str) -> None:
        """In the worker: the narrow exception to "delete only what we own" (INCOMPLETE/FAILED
        entries hold no address and the kernel dropped them itself at carrier loss; see
        carrier.py). A kernel error here is logged, never fatal: this only speeds a heal up."""
        try:
            gone = carrier_mod.flush_unresolved(self.dp, link)
        except OSError as e:  # DataplaneError included
            _log.warning("underlay %s regained carrier; reading its neighbours failed: %s", link, e)
            return
        carrier_mod.FLUSHED.inc(len(gone))
        _log.info("underlay %s regained carrier: flushed %d unresolved neighbour entries", link, len(gone))
        _log.debug("underlay %s: flushed %s", link, ", ".join(gone) or "nothing")

    # -- the reconcile loop ----------------------------------------------------------------

    async def _apply_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await asyncio.sleep(DEBOUNCE_S)
            self._wake.clear()
            p = self._pending
            if p.state is None:
                continue
            state, version, resync, reason = p.state, p.version, p.resync, p.reason
            p.resync = False
            started = time.monotonic()
            report = await loop.run_in_executor(self._executor, self._pass, state, resync)
            elapsed = time.monotonic() - started
            self.metrics.reconcile_duration.observe(elapsed)
            self._record(report, state, resync)
            if report.failures:
                self.metrics.kernel_failures.inc(report.failures)
                for table, stats in report.tables.items():
                    for code, n in stats.errnos.items():
                        name = errno.errorcode.get(code, str(code))
                        self.metrics.kernel_errors.labels(table=table, errno=name).inc(n)
                delay = self._retry.next()
                _log.warning(
                    "pass (%s) left %d entries failed, first: %s; retrying in %.1fs with a resync",
                    reason, report.failures, report.first_error, delay,
                )
                loop.call_later(delay, self._request_resync_now, "retry after failure")
                continue
            was_failing = self._retry.attempts > 0
            self._retry.reset()
            self._last_success = time.monotonic()
            self._applied_version = version
            self.metrics.last_success.set_to_current_time()
            if not self._first_applied:
                self._first_applied = True
                _log.info("dataplane in sync with version %d (%d changes, %.0f ms)", version, report.changes,
                          elapsed * 1000)
            elif was_failing:
                _log.info("dataplane back in sync with version %d after failed passes", version)
            elif report.changes:
                _log.info("applied %d changes for %s (version %d, %.0f ms)", report.changes, reason, version,
                          elapsed * 1000)
            if version != self._reported_version:
                await self.session.report_applied(version)
                self._reported_version = version

    def _pass(self, state: types.NodeState, resync: bool) -> reconciler_mod.ApplyReport:
        """One reconcile pass, in the worker thread."""
        if resync:
            try:
                # The underlay interface may have been recreated (new ifindex) since we looked.
                self.underlay = self.dp.underlay_link(self.cfg.underlay_ip)
                if self.cfg.underlay_ip6:
                    self.underlay6 = self.dp.underlay_link(self.cfg.underlay_ip6)
                self.reconciler.resync()
            except OSError as e:
                # The kernel failed a dump (ENOBUFS on a busy node, say): a failed pass, retried
                # with back-off and a resync like a failed entry, not a bug to crash on.
                report = reconciler_mod.ApplyReport(resync_needed=True)
                report.tables["links"].fail("links", e.errno or errno.EIO, f"reading the kernel back: {e}")
                return report
        by_ip = {self.cfg.underlay_ip6: self.underlay6.ifindex} if self.underlay6 is not None else None
        desired = render.render(
            state,
            underlay_ifindex=self.underlay.ifindex,
            table=self.cfg.table,
            rule_priority=self.cfg.rule_priority,
            underlay_ifindexes=by_ip,
        )
        self.reconciler.set_desired(desired)
        self._desired_kernel = desired
        # Before the routes: a new group's flows hash with the fabric's seed from their first packet.
        multi = [r for r in state.routes if r.vias]
        seed = self.multipath.sync(self.dp, wanted=bool(multi), ipv6=any(":" in r.dst for r in multi))
        self.metrics.multipath_hash_seed_set.set(1 if seed is not None else 0)
        report = self.reconciler.apply()
        # After the netlink tables: the devices the programs attach to exist now.
        self.translator.apply(render.translator_plan(state), report.tables[translator_mod.TABLE])
        if report.failures:
            report.resync_needed = True
        return report

    def _record(self, report: reconciler_mod.ApplyReport, state: types.NodeState, resync: bool) -> None:
        if resync and state == self._applied_state and report.changes:
            # Nothing new was planned, yet the pass changed the kernel: someone else did.
            self.metrics.drift_repairs.inc(report.changes)
            _log.info("repaired %d drifted entries", report.changes)
        self._applied_state = state
        for table, n in self.reconciler.desired_counts().items():
            self.metrics.desired_entries.labels(table=table).set(n)
        for table, n in self.reconciler.programmed_counts().items():
            self.metrics.programmed_entries.labels(table=table).set(n)

    async def _resync_timer(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.resync_period_s * (1 + random.random() * 0.2))
            self._request_resync_now("periodic resync")

    # -- health ----------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        ref = self._last_success if self._last_success is not None else self._started
        age = time.monotonic() - ref
        limit = self.cfg.resync_period_s * 1.2 + HEALTH_GRACE_S
        if self._fatal is not None:
            return False, f"fatal: {self._fatal!r}"
        if age > limit:
            what = "successful pass" if self._last_success is not None else "snapshot applied since start"
            return False, f"no {what} for {age:.0f}s (limit {limit:.0f}s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        return (True, "ok") if self._first_applied else (False, "first snapshot not applied yet")

    def _sync_age(self) -> float:
        ref = self._last_success if self._last_success is not None else self._started
        return time.monotonic() - ref

    # -- diagnostics -----------------------------------------------------------------------

    def debug_state(self) -> dict[str, object]:
        """``/debug/state``: what the plan asks for and what the kernel holds, for
        ``fabric-tool diagnose``. Called from the HTTP thread; the kernel is read in the
        reconcile worker (netlink sockets are not shared between threads), so a read never
        races a pass, and reflects the kernel *now*, not the view of the last resync."""
        fut = self._executor.submit(self._read_kernel)
        # The translator's bcc handles belong to the reconcile worker too.
        xlate = self._executor.submit(self.translator.dump)
        try:
            kernel = fut.result(timeout=10.0)
            loaded = xlate.result(timeout=10.0)
        except concurrent.futures.TimeoutError:
            raise TimeoutError("the reconcile worker is busy; try again") from None
        planned = self._pending.state
        probes = self.prober.stats() if isinstance(self.prober, probes_mod.TunnelProber) else []
        return {
            "node": f"{self.cfg.cluster}/{self.cfg.node}",
            "underlay": {"ip": self.cfg.underlay_ip, "name": self.underlay.name, "mtu": self.underlay.mtu},
            "table": self.cfg.table,
            "planned_version": self._pending.version,
            "applied_version": self._applied_version,
            "in_sync": self._first_applied and self._retry.attempts == 0,
            "gateway_role": self._role or "unknown",
            "planned": dataclasses.asdict(planned) if planned is not None else None,
            "desired": kernel_state_json(self._desired_kernel) if self._desired_kernel is not None else None,
            "kernel": kernel,
            "probes": [dataclasses.asdict(st) for st in probes],
            # What the BPF maps hold now (mappings with counters), to compare with the plan.
            "translator": loaded,
            # Global IP rewrites this node performs, for `diagnose trace` to follow global IPs.
            "translations": [
                {"cluster": self.cfg.cluster, "global": t.global_, "real": t.local}
                for t in (planned.translations if planned is not None else ())
            ],
        }

    def _read_kernel(self) -> dict[str, list[dict[str, object]]]:
        """A fresh read of every table we own, in the shape of :func:`kernel_state_json`, with
        the owners' ownership rules (static neighbours only, no IPv6 link-local addresses)."""
        dp, names = self.dp, sorted(OWNED_LINKS)
        links = [li.vxlan for li in dp.list_links() if li.name in OWNED_LINKS and li.vxlan is not None]
        rules = [
            objects.Rule(r.family, r.table, r.priority)
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in dp.list_rules(family)
            if r.protocol == objects.RTPROT_FABRIC
        ]
        nexthops = {nh.id: nh for nh in dp.list_nexthops()}
        routes = []
        for r in dp.list_routes(self.cfg.table, objects.RTPROT_FABRIC):
            nh = nexthops.get(r.nhid)
            link, gateway = (nh.link, nh.gateway) if nh is not None else (r.link, r.gateway)
            routes.append(objects.Route(r.table, r.dst, link, gateway))
        state = objects.KernelState(
            links=frozenset(links),
            addresses=frozenset(
                a for n in names for a in dp.list_addresses(n)
                if not ipaddress.ip_interface(a.address).ip.is_link_local
            ),
            rules=frozenset(rules),
            neighbours=frozenset(
                objects.Neighbour(kn.link, kn.ip, kn.mac)
                for n in names
                for kn in dp.list_neighbours(n)
                if kn.mac and kn.state & neighbours_mod.NUD_PERMANENT
            ),
            fdb=frozenset(e for n in names for e in dp.list_fdb(n)),
            routes=frozenset(routes),
        )
        return kernel_state_json(state)

    # -- run -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to return (what SIGTERM does); the dataplane is left as it is."""
        if self._stop is not None:
            self._stop.set()

    async def _session(self) -> None:
        """The reflector session, once this node holds a certificate (or can get none)."""
        if self.certificates is not None:
            await self.certificates.ready.wait()
        await self.session.run()

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        if self._handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, stop.set)
        server = None
        if self.cfg.metrics_listen:
            server = health.serve(self.cfg.metrics_listen, self.healthy, self.ready, debug={"state": self.debug_state})
        self._events = self._events_factory(self.request_resync, OWNED_LINKS, self.cfg.table)
        self._events.start()
        self._carrier = self._carrier_factory(self._on_carrier_up)
        self._carrier.start()
        self.prober.start()
        tasks = [
            asyncio.create_task(self._apply_loop(), name="apply"),
            asyncio.create_task(self._resync_timer(), name="resync-timer"),
            asyncio.create_task(self._session(), name="session"),
        ]
        if self.certificates is not None:
            tasks.append(asyncio.create_task(self.certificates.run(), name="certificates"))
        crashed: asyncio.Task[None] | None = None

        def _done(t: asyncio.Task[None]) -> None:
            nonlocal crashed
            if not t.cancelled() and t.exception() is not None:
                crashed = t
                stop.set()

        for t in tasks:
            t.add_done_callback(_done)
        try:
            await stop.wait()
        finally:
            # Also on cancellation: never leave the worker thread, the event monitor or the
            # HTTP server running behind a stopped agent.
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await self.session.close()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.prober.stop()
            self._events.stop()
            self._carrier.stop()
            self._executor.shutdown(wait=True)
            if server is not None:
                server.shutdown()
        if crashed is not None:
            exc = crashed.exception()
            _log.critical("task %s crashed; exiting for a clean restart", crashed.get_name(), exc_info=exc)
            return 1
        _log.info("stopped; the dataplane stays as it is")
        return 0


def kernel_state_json(state: objects.KernelState) -> dict[str, list[dict[str, object]]]:
    """Tables of a KernelState as sorted JSON rows (``/debug/state``; compared by diagnose)."""
    out: dict[str, list[dict[str, object]]] = {}
    for f in dataclasses.fields(state):
        rows = [dataclasses.asdict(e) for e in getattr(state, f.name)]
        out[f.name] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    return out


def seed_source(cfg: config_mod.AgentConfig) -> multipath_mod.SeedSource:
    """Where this agent's multipath hash seed comes from: the fabric CA of ``--tls-dir``, then of
    ``--bootstrap-dir`` (a node still without its own certificate), unless set or off."""
    dirs = [d for d in (cfg.tls_dir, cfg.bootstrap_dir) if d] if not cfg.insecure else []
    return multipath_mod.SeedSource(
        setting=cfg.multipath_hash_seed,
        ca_files=tuple(tls.TLSDir(Path(d)).ca for d in dirs),
        insecure=cfg.insecure,
    )


def gateway_role(state: types.NodeState) -> str:
    """This node's gateway role as its own plan shows it (the planner's node classes).

    A gateway-mode node with both devices is a hot gateway: the active one routes the other
    clusters over vx-bridge, the standby over vx-local; a node with only vx-local is internal
    (``none``). A P2P node (vx-bridge only) is an ``endpoint``: whether the reflector elected it
    its cluster's service gateway does not show in its plan (the reflector's metrics say)."""
    devices = {d.name for d in state.devices}
    if types.VX_LOCAL not in devices:
        return "endpoint" if types.VX_BRIDGE in devices else "none"
    if types.VX_BRIDGE not in devices:
        return "none"
    return "active" if any(r.device == types.VX_BRIDGE for r in state.routes) else "standby"


def _peer_cluster(name: str) -> str:
    """``cluster/node`` -> ``cluster``; a peer without a node name (bare IP) -> ``unknown``."""
    cluster, sep, _ = name.partition("/")
    return cluster if sep else "unknown"


def _choose_underlay(cfg: config_mod.AgentConfig, facts: nodeinfo.NodeFacts,
                     netns: str | None = None) -> nodeinfo.NodeFacts:
    """``facts`` with the underlay chosen by the Cluster's NIC settings and autodetection method
    (:func:`fabric.nodeinfo.choose_underlay`), read from this network namespace's links.
    An explicit ``--underlay-ip`` wins: nothing is read then."""
    if cfg.underlay_ip:
        return facts
    nic = nodeinfo.nic_for(cfg.node, cfg.underlay_interface, cfg.nic_overrides)
    method = cfg.autodetection_method
    if nic == nodeinfo.AUTO_NIC and method == nodeinfo.DEFAULT_METHOD:
        return facts  # the Node's InternalIPs, as read
    links = underlay_mod.read_links(netns)
    route = None
    if nic == nodeinfo.AUTO_NIC and method.startswith("can-reach="):
        route = underlay_mod.route_towards(method.partition("=")[2], netns)
    found = (facts.underlay_ip, facts.underlay_ip6)
    internal: dict[int, str] = {ipaddress.ip_address(ip).version: ip for ip in found if ip}
    choice = nodeinfo.choose_underlay(cfg.node, method, nic, links, route, internal)
    _log.info("node %s: underlay %s", cfg.node, choice.how)
    return dataclasses.replace(facts, underlay_ip=choice.ip, underlay_ip6=choice.ip6)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config_mod.load(argv)
    except config_mod.ConfigError as e:
        print(f"fabric-agent: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level)
    if not cfg.cleanup:
        try:
            if cfg.bootstrap_dir and not cfg.insecure:
                # The node's own files may not exist yet: the agent writes them (bootstrap).
                if not cfg.tls_dir:
                    raise tls.TLSError("--bootstrap-dir needs --tls-dir (where the node's own certificate goes)")
                own, boot = tls.TLSDir(Path(cfg.tls_dir)), tls.TLSDir(Path(cfg.bootstrap_dir))
                try:
                    own.read()
                except tls.TLSError as e:
                    try:
                        boot.read()
                    except tls.TLSError as e2:
                        raise tls.TLSError(f"no node certificate ({e}) and no bootstrap credential ({e2})") from None
                tls.announce(tls.TLSDir(Path(cfg.tls_dir)))
            else:
                tls.announce(tls.choose(cfg.tls_dir, cfg.insecure))
        except tls.TLSError as e:
            print(f"fabric-agent: {e} (env: FABRIC_TLS_DIR, FABRIC_BOOTSTRAP_DIR, FABRIC_INSECURE)", file=sys.stderr)
            return 2
    dp = dataplane_mod.KernelDataplane()
    if cfg.cleanup:
        # Translator first (its filters hang off our links), then every netlink object.
        if cfg.cluster and cfg.node:
            instance = translator_mod.instance_name(cfg.cluster, cfg.node)
            if translator_mod.cleanup(instance, Path(cfg.bpf_pin_root)):
                _log.info("removed the translator pins of %s under %s", instance, cfg.bpf_pin_root)
        rec = reconciler_mod.Reconciler(dp, table=cfg.table, rule_priority=cfg.rule_priority, link_names=OWNED_LINKS)
        rec.resync()
        rec.cleanup_all()
        _log.info("removed every kernel object the fabric owns")
        return 0
    if cfg.in_cluster:
        try:
            facts = nodeinfo.facts_from_node(nodeinfo.read_node(cfg.node, cfg.kubeconfig))
            facts = _choose_underlay(cfg, facts)
        except nodeinfo.NodeInfoError as e:
            # The API server may simply not answer yet, or the chosen interface may not be up
            # yet: exit non-zero, the DaemonSet retries.
            print(f"fabric-agent: --in-cluster: {e}", file=sys.stderr)
            return 1
        cfg = config_mod.with_node_facts(cfg, facts)
        _log.info("node %s from its Node object: underlay %s%s, pod CIDRs %s", cfg.node, cfg.underlay_ip,
                  f" and {cfg.underlay_ip6}" if cfg.underlay_ip6 else "", ",".join(cfg.pod_cidrs))
    xlate_metrics.register(translator_mod.instance_name(cfg.cluster, cfg.node), Path(cfg.bpf_pin_root))
    try:
        agent = Agent(cfg, dp)
    except dataplane_mod.UnderlayError as e:
        print(f"fabric-agent: --underlay-ip {cfg.underlay_ip}: {e}", file=sys.stderr)
        return 2
    _log.info(
        "starting: node=%s/%s underlay=%s (%s, mtu %d) pod_cidrs=%s reflector=%s table=%d resync=%.0fs",
        cfg.cluster, cfg.node, cfg.underlay_ip, agent.underlay.name, agent.underlay.mtu, ",".join(cfg.pod_cidrs),
        cfg.reflector, cfg.table, cfg.resync_period_s,
    )
    return asyncio.run(agent.run())


if __name__ == "__main__":
    sys.exit(main())
