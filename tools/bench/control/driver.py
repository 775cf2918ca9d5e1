"""The driver: starts the reflector (or the bare server), the workers and the joiner, times
each change to the last affected agent, and measures the server's CPU and memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tools.bench import common as bc
from tools.bench.control.bare import broadcast_request
from tools.bench.control.params import BARE_BROADCAST, CHANGE_TIMEOUT_S, KEEPALIVE_S, NAME, QUIET_S
from tools.bench.control.shapes import (
    CLUSTER_SIZE,
    GATEWAY_CANDIDATES,
    JOINER,
    Change,
    Shape,
    planned_change,
    shapes_for,
)
from tools.bench.control.tlsmat import CA_DIR, READER_DIR, SERVER_DIR

_log = logging.getLogger(__name__)

#: Set to a directory: the reflector runs under cProfile (tools.bench.control.profiled) and
#: writes one profile per part of each phase there (its figures are then not the benchmark's).
PROFILE_ENV = "FABRIC_BENCH_PROFILE"


# -- the driver ------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class _Events:
    """JSON-line events of every child, merged into one queue by reader threads."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def attach(self, who: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        stream = proc.stdout

        def read() -> None:
            for raw in stream:
                try:
                    self.q.put((who, json.loads(raw)))
                except ValueError:
                    self.q.put((who, {"ev": "error", "msg": f"unparsable line {raw[:200]!r}"}))
            self.q.put((who, {"ev": "exit"}))

        threading.Thread(target=read, name=f"events-{who}", daemon=True).start()

    def next(self, deadline: float) -> tuple[str, dict[str, Any]] | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return self.q.get(timeout=left)
        except queue.Empty:
            return None


class Infeasible(Exception):
    """This N cannot be measured within the budget (the text says how far it got)."""


@dataclasses.dataclass
class Phase:
    """One server kind at one shape and N: bring-up, memory, and per change times and CPU."""

    bringup_s: float = 0.0
    #: Agent streams failed before admission during bring-up and retried, and how many of them
    #: each status failed (agents.NotAdmitted.cause).
    retries: int = 0
    retry_causes: dict[str, int] = dataclasses.field(default_factory=dict)
    rss_per_agent_kib: float = 0.0
    #: Agents whose plan each change changes (the ones fan-out waits for).
    affected: int = 0
    #: Seconds from the last snapshot until every agent applied the bring-up's deltas (fabric).
    settle_s: float = 0.0
    join_ms: list[list[float]] = dataclasses.field(default_factory=list)  # per round
    leave_ms: list[list[float]] = dataclasses.field(default_factory=list)
    cpu_ms: list[float] = dataclasses.field(default_factory=list)  # per change, averaged per round
    #: Reflector CPU ms per agent from the first agent started to all synced (with TLS: the handshakes).
    bringup_cpu_per_agent_ms: float = 0.0
    #: The joiner, per join: ms from its start (credentials, new channel) to END_OF_SNAPSHOT, and
    #: to its channel being ready (connection; with TLS the handshake).
    start_to_sync_ms: list[float] = dataclasses.field(default_factory=list)
    connect_ms: list[float] = dataclasses.field(default_factory=list)
    #: With TLS, every second join gets its node certificate by the bootstrap's certificate
    #: exchange first (``join exchange``): its start to END_OF_SNAPSHOT, kept apart from the
    #: pre-issued joins above (which it is not part of).
    start_to_sync_exchange_ms: list[float] = dataclasses.field(default_factory=list)
    #: The relay phase (``--relays K``): the K fabric-relays' CPU during bring-up and the growth
    #: of their RSS from before it to after it, summed over the K processes (the reflector's own
    #: are the fields above).
    relays: int = 0
    relays_bringup_cpu_s: float = 0.0
    relays_rss_kib: float = 0.0


class _Run:
    """One phase: a server (reflector or bare), workers, optionally the joiner."""

    def __init__(
        self, procs: bc.Procs, mode: str, shape: Shape, tmp: Path, budget_s: float, tls_root: Path | None = None,
        relays: int = 0,
    ) -> None:  # fmt: skip
        self.procs, self.mode, self.shape, self.tmp, self.budget_s = procs, mode, shape, tmp, budget_s
        #: The relay phase: agents connect to ``relays`` fabric-relay processes (agent i to relay
        #: i mod K, the joiner too), which carry them to the reflector; 0: straight to the server.
        self.relays = relays
        self.relay_procs: list[subprocess.Popen[bytes]] = []
        self.relay_socks = [f"unix:{tmp}/relay{k}.sock" for k in range(relays)]
        #: Mutual TLS (tools.bench.control.tlsmat material) or None: plaintext, --insecure.
        self.tls_root = tls_root
        #: The driver's own credentials for GetStatus (a reader certificate) under TLS.
        self.status_tls = None if tls_root is None else _tls_dir(tls_root / READER_DIR)
        self.n = shape.n
        self.events = _Events()
        self.sock = f"unix:{tmp}/{mode}.sock"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.firsts: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.retries = 0
        self.retry_causes: dict[str, int] = {}
        #: Agents each change affects, in total (what wait_applied waits for); set by arm().
        self.expected = 0
        self.pending: dict[int, dict[str, Any]] = {}  # version -> {"n": agents, "t": last stamp}
        self.server: subprocess.Popen[bytes] | None = None
        self.joiner: subprocess.Popen[bytes] | None = None
        #: Per join: (start, connected, synced) stamps of the joiner.
        #: The joiner's joins: (start, connected, synced, with the certificate exchange).
        self.joins: list[tuple[float, float, float, bool]] = []
        self.log = open(tmp / "reflector.log", "wb")  # noqa: SIM115 - closed by stop()

    def _py(self, *args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
        return self.procs.spawn(None, [sys.executable, "-m", *args], stdout=stdout, stdin=subprocess.PIPE,
                                stderr=None)  # fmt: skip

    def _worker_argv(self, first: int, count: int) -> list[str]:
        target = ",".join(self.relay_socks) if self.relays else self.sock
        argv = ["tools.bench.control", "worker", "--target", target, "--mode", self.mode, "--shape",
                self.shape.kind, "--n", str(self.n), "--first", str(first), "--count", str(count)]  # fmt: skip
        if self.relays:
            argv.append("--spread")
        if self.tls_root is not None:
            argv += ["--tls-root", str(self.tls_root)]
        return argv

    def _wait(self, want: str, deadline: float, who: str | None = None) -> dict[str, Any]:
        while True:
            item = self.events.next(deadline)
            if item is None:
                raise TimeoutError(f"no {want!r} event in time")
            src, ev = item
            self._note(src, ev)
            if ev["ev"] == want and (who is None or src == who):
                return ev

    def _note(self, src: str, ev: dict[str, Any]) -> None:
        if ev["ev"] == "error":
            raise RuntimeError(f"control benchmark: {src}: {ev['msg']}{self.log_tail()}")
        if ev["ev"] == "exit" and src != "server":
            raise RuntimeError(f"control benchmark: {src} exited unexpectedly{self.log_tail()}")
        if ev["ev"] == "applied":
            slot = self.pending.setdefault(int(ev["v"]), {"n": 0, "t": 0.0})
            slot["n"] += int(ev["n"])
            slot["t"] = max(slot["t"], float(ev["t"]))

    def log_tail(self, lines: int = 15) -> str:
        """The end of the reflector's log, to explain a failure (it is deleted with the run)."""
        if self.mode != "fabric":
            return ""
        self.log.flush()
        tail = Path(self.log.name).read_text(errors="replace").splitlines()[-lines:]
        return "\nreflector log (last lines):\n  " + "\n  ".join(tail)

    def start_server(self) -> None:
        if self.mode == "fabric":
            cfg = self.tmp / "fabric.yaml"
            cfg.write_text(yaml.safe_dump(self.shape.config_doc(), sort_keys=False))
            profile = os.environ.get(PROFILE_ENV)
            launcher = ["fabric.control.reflector_cli"] if not profile else [
                "tools.bench.control", "profiled-reflector", "--out", profile, "--label",
                f"{self.shape.kind}-n{self.n}" + ("" if self.tls_root is None else "-tls"), "--"]  # fmt: skip
            self.server = self.procs.spawn(None, [
                sys.executable, "-m", *launcher, "--config", str(cfg), "--listen", self.sock,
                "--grace-period", "0", "--startup-hold", "0", "--keepalive-interval", f"{KEEPALIVE_S:g}",
                *(["--insecure"] if self.tls_root is None else ["--tls-dir", str(self.tls_root / SERVER_DIR),
                                                                "--ca-dir", str(self.tls_root / CA_DIR)]),
                "--log-level", "info",
            ], stderr=self.log)  # fmt: skip
            from fabric.control import client

            deadline = time.monotonic() + 30
            while True:
                try:
                    client.get_status_sync(self.sock, 1.0, self.status_tls)
                    break
                except client.ReflectorUnavailable:
                    if time.monotonic() > deadline or self.server.poll() is not None:
                        raise RuntimeError(f"fabric-reflector did not start{self.log_tail()}") from None
                    time.sleep(0.1)
            self.start_relays()
            return
        self.server = self._py("tools.bench.control", "bare-server", "--listen", self.sock)
        self.events.attach("server", self.server)
        self._wait("listening", time.monotonic() + 30, "server")

    def start_relays(self) -> None:
        """The relay phase's K fabric-relays (plaintext, as the reflector here), each on its own
        unix socket with the reflector's as upstream; returns once every socket exists and the
        relays had time to open their stream (an agent that comes earlier is refused UNAVAILABLE
        and retries, as real agents do)."""
        for sock in self.relay_socks:
            self.relay_procs.append(self.procs.spawn(None, [
                sys.executable, "-m", "fabric.control.relay", "--upstream", self.sock, "--listen", sock, "--insecure",
                "--log-level", "warning"], stderr=self.log))  # fmt: skip
        deadline = time.monotonic() + 30
        for sock, proc in zip(self.relay_socks, self.relay_procs, strict=True):
            while not Path(sock.removeprefix("unix:")).exists():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"fabric-relay on {sock} did not start{self.log_tail()}")
                time.sleep(0.1)
        time.sleep(0.5)

    def relays_cpu_s(self) -> float:
        return sum(_cpu_s(p.pid) for p in self.relay_procs)

    def relays_rss_kib(self) -> int:
        return sum(_rss_kib(p.pid) for p in self.relay_procs)

    def end_profile_part(self) -> None:
        """Under ``FABRIC_BENCH_PROFILE``: the profiled reflector writes the part that ended
        (tools.bench.control.profiled); otherwise nothing."""
        if self.mode == "fabric" and os.environ.get(PROFILE_ENV) and self.server is not None:
            self.server.send_signal(signal.SIGUSR1)

    def bring_up(self) -> float:
        workers = 1 if self.n <= 50 else 2 if self.n <= 500 else 4
        t0 = time.monotonic()
        first = 0
        for w in range(workers):
            count = self.n // workers + (1 if w < self.n % workers else 0)
            name = f"worker{w}"
            proc = self._py(*self._worker_argv(first, count))
            self.workers[name] = proc
            self.firsts[name] = first
            self.counts[name] = count
            self.events.attach(name, proc)
            first += count
        deadline = t0 + self.budget_s
        ready: set[str] = set()
        progress: dict[str, int] = {}
        last_report = t0
        what = f"{self.shape.label} {self.mode}" + ("" if self.tls_root is None else " (mTLS)")
        while len(ready) < len(self.workers):
            item = self.events.next(min(deadline, time.monotonic() + 10))
            now = time.monotonic()
            if item is None and now >= deadline:
                got = sum(self.counts[w] if w in ready else progress.get(w, 0) for w in self.workers)
                raise Infeasible(
                    f"bringing up {self.n} agents ({self.shape.kind} shape) on the {self.mode} server did not finish "
                    f"within the {self.budget_s:g}s budget: about {got} of {self.n} agents had their snapshot"
                )
            if item is not None:
                src, ev = item
                self._note(src, ev)
                if ev["ev"] == "ready":
                    ready.add(src)
                    progress[src] = self.counts[src]
                    self.retries += int(ev.get("retries", 0))
                    for cause, count in ev.get("causes", {}).items():
                        self.retry_causes[cause] = self.retry_causes.get(cause, 0) + int(count)
                elif ev["ev"] == "progress":
                    progress[src] = int(ev["ready"])
            if now - last_report >= 10:
                total = sum(progress.values())
                bc.progress(NAME, f"{what}: {total:,}/{self.n:,} agents synced after {now - t0:.0f}s")
                last_report = now
        return time.monotonic() - t0

    def arm(self, affected: frozenset[int], after: int) -> None:
        """Tell every worker which of its agents each change affects (deltas of versions above
        ``after``) and wait until all have it in force."""
        for name, proc in self.workers.items():
            mine = [i for i in range(self.firsts[name], self.firsts[name] + self.counts[name]) if i in affected]
            self.send(proc, f"expect {after} {','.join(map(str, mine)) or '-'}")
        armed: set[str] = set()
        deadline = time.monotonic() + 60
        while len(armed) < len(self.workers):
            item = self.events.next(deadline)
            if item is None:
                raise RuntimeError(f"workers {sorted(set(self.workers) - armed)} did not confirm 'expect'")
            self._note(*item)
            if item[1]["ev"] == "expecting":
                armed.add(item[0])
        self.expected = len(affected)
        self.pending.clear()

    def wait_applied(self, version: int, what: str) -> float:
        deadline = time.monotonic() + CHANGE_TIMEOUT_S
        while self.pending.get(version, {}).get("n", 0) < self.expected:
            item = self.events.next(deadline)
            if item is None:
                got = self.pending.get(version, {}).get("n", 0)
                raise Infeasible(f"{what} ({self.shape.label}): only {got} of the {self.expected} affected agents "
                                 f"applied version {version} within {CHANGE_TIMEOUT_S:g}s")  # fmt: skip
            self._note(*item)
        return float(self.pending.pop(version)["t"])

    def send(self, proc: subprocess.Popen[bytes], line: str) -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()

    def stop(self) -> None:
        everyone = [p for p in (*self.workers.values(), self.joiner, *self.relay_procs, self.server) if p is not None]
        for proc in everyone:
            if proc.stdin is not None:
                self.send(proc, "quit")
        for proc in everyone:
            self.procs.stop(proc, timeout_s=10.0)
        self.log.close()

    # -- changes --

    @property
    def server_pid(self) -> int:
        assert self.server is not None, "the server is started first"
        return self.server.pid

    def server_cpu_ms(self) -> float:
        return _cpu_s(self.server_pid) * 1000

    def fabric_change(self) -> tuple[float, float]:
        """Join then leave (two changes); returns (join ms, leave ms). Each change comes after a
        quiet period longer than the reflector's longest coalescing window, so each is timed as
        a lone change (a change during a storm of changes waits up to that window by design)."""
        if self.joiner is None:
            argv = self._worker_argv(JOINER, 1)
            self.joiner = self._py(*argv, "--joiner")
            self.events.attach("joiner", self.joiner)
        time.sleep(QUIET_S)
        # With TLS, every second join starts with the certificate exchange (a bootstrap certificate only).
        exchange = self.tls_root is not None and len(self.joins) % 2 == 1
        self.send(self.joiner, "join exchange" if exchange else "join")
        ev = self._wait("joined", time.monotonic() + CHANGE_TIMEOUT_S, "joiner")
        self.joins.append((float(ev["start"]), float(ev["connected"]), float(ev["synced"]), bool(ev["exchange"])))
        version = int(ev["v"])
        join_ms = (self.wait_applied(version, "join") - float(ev["t0"])) * 1000
        time.sleep(QUIET_S)
        self.send(self.joiner, "leave")
        ev = self._wait("left", time.monotonic() + CHANGE_TIMEOUT_S, "joiner")
        leave_ms = (self.wait_applied(version + 1, "leave") - float(ev["t0"])) * 1000
        return join_ms, leave_ms

    def bare_change(self, channel: Any, change: Change, version: int) -> float:
        """One push of the join's Delta bytes to the affected agents; returns ms to the last Applied."""
        request = broadcast_request(change.delta_bytes(version))
        broadcast = channel.unary_unary(BARE_BROADCAST)
        t0 = time.monotonic()
        sent = int(broadcast(request, timeout=CHANGE_TIMEOUT_S))
        if sent != self.expected:
            raise RuntimeError(f"the bare server had streams for {sent} of the {self.expected} affected agents")
        return (self.wait_applied(version, "broadcast") - t0) * 1000


def _tls_dir(path: Path) -> Any:
    from fabric.control import tls

    return tls.TLSDir(path)


def _settle(
    sock: str, n: int, what: str, timeout_s: float, tls_dir: Any = None
) -> tuple[float, int, tuple[Any, ...]]:
    """Wait until every agent applied its latest plan (GetStatus: all N connected and in sync):
    the deltas of the bring-up (each join goes to every synced agent) may still be queued behind
    the last snapshot, and a change measured before they drain would time the backlog. Returns
    the seconds it took, the topology generation and the gateway roles (GetStatus)."""
    from fabric import types
    from fabric.control import client

    t0 = time.monotonic()
    last_report = t0
    while True:
        status = client.get_status_sync(sock, 60.0, tls_dir)
        nodes = status.nodes()
        behind = sum(1 for x in nodes if not x.in_sync)
        now = time.monotonic()
        if len(nodes) == n and not behind:
            break
        if now - t0 > timeout_s:
            raise Infeasible(f"{what}: {behind} of {len(nodes)} agents still behind their plan {timeout_s:g}s "
                             "after bring-up")  # fmt: skip
        if now - last_report >= 10:
            bc.progress(NAME, f"{what}: waiting for {behind:,} agents to apply the bring-up's deltas")
            last_report = now
        time.sleep(1.0)
    roles = tuple(
        types.GatewayRole(c.name, c.active_gateway, c.standby_gateway) for c in status.clusters if c.active_gateway
    )
    return time.monotonic() - t0, status.generation, roles


def _phase(
    mode: str, shape: Shape, rounds: int, changes: int, budget_s: float, tls_root: Path | None = None,
    relays: int = 0,
) -> Phase:  # fmt: skip
    """One server kind at one shape: bring-up, then ``rounds`` rounds of ``changes`` changes.
    ``tls_root``: the fabric reflector and every agent on mutual TLS with that material;
    ``relays``: every agent behind one of that many fabric-relays (fabric only)."""
    import grpc

    out = Phase(relays=relays)
    n = shape.n
    what = f"{shape.label} {mode}" + ("" if tls_root is None else " (mTLS)")
    what += f" via {relays} relays" if relays else ""
    with tempfile.TemporaryDirectory(prefix="kft-ctl-") as tmp, bc.procs() as procs:
        run = _Run(procs, mode, shape, Path(tmp), budget_s, tls_root, relays)
        try:
            run.start_server()
            time.sleep(0.3)
            rss0 = _rss_kib(run.server_pid)
            relays_rss0 = run.relays_rss_kib()
            bc.progress(NAME, f"{what}: bringing up {n:,} agents (budget {budget_s:g}s)")
            cpu0 = run.server_cpu_ms()
            relays_cpu0 = run.relays_cpu_s()
            out.bringup_s = run.bring_up()
            run.end_profile_part()
            out.bringup_cpu_per_agent_ms = (run.server_cpu_ms() - cpu0) / n
            out.relays_bringup_cpu_s = run.relays_cpu_s() - relays_cpu0
            out.retries = run.retries
            out.retry_causes = dict(run.retry_causes)
            if mode == "fabric":
                out.settle_s, generation, roles = _settle(run.sock, n, what, budget_s, run.status_tls)
                run.end_profile_part()
                change = planned_change(shape, roles)
            else:
                generation, change = 0, planned_change(shape)
            time.sleep(1.0)  # let the last Applied/keepalives settle before reading memory
            out.rss_per_agent_kib = (_rss_kib(run.server_pid) - rss0) / n
            out.relays_rss_kib = run.relays_rss_kib() - relays_rss0
            out.affected = len(change.affected)
            run.arm(change.affected, generation)
            bc.progress(NAME, f"{what}: {n:,} agents synced in {out.bringup_s:.1f}s (all in sync "
                        f"{out.settle_s:.1f}s later); a change affects {out.affected:,} of them; "
                        f"{rounds} rounds of {changes} changes")  # fmt: skip
            with grpc.insecure_channel(run.sock) as channel:
                version = 0
                for _ in range(rounds):
                    joins: list[float] = []
                    leaves: list[float] = []
                    cpu0 = run.server_cpu_ms()
                    for _ in range(changes):
                        if mode == "fabric":
                            j, lv = run.fabric_change()
                            leaves.append(lv)
                        else:
                            version += 1
                            j = run.bare_change(channel, change, version)
                        joins.append(j)
                    # CPU per change over the whole round: clock-tick resolution (10 ms) needs many changes.
                    out.cpu_ms.append((run.server_cpu_ms() - cpu0) / (changes * (2 if leaves else 1)))
                    out.join_ms.append(joins)
                    if leaves:
                        out.leave_ms.append(leaves)
                    out.start_to_sync_ms += [(sync - start) * 1000 for start, _, sync, ex in run.joins if not ex]
                    out.connect_ms += [(conn - start) * 1000 for start, conn, _, ex in run.joins if not ex]
                    out.start_to_sync_exchange_ms += [(sync - start) * 1000 for start, _, sync, ex in run.joins if ex]
                    run.joins.clear()
                    bc.progress(NAME, f"{what}: fan-out ms, joins {' '.join(f'{x:.0f}' for x in joins)}"
                                + (f"; leaves {' '.join(f'{x:.0f}' for x in leaves)}" if leaves else ""))  # fmt: skip
        except RuntimeError:
            if mode == "fabric":
                run.log.flush()
                kept = Path(tempfile.gettempdir()) / f"kft-bench-control-{os.getpid()}-{shape.kind}-n{n}.log"
                shutil.copyfile(run.log.name, kept)
                bc.progress(NAME, f"{what}: failed; the reflector's log is kept in {kept}")
            raise
        finally:
            run.stop()
    return out


def run(opts: bc.Options) -> bc.Report:
    rounds = opts.repeat
    report = bc.Report()
    infeasible_from: dict[str, int] = {}  # shape -> the first N that did not complete
    for n in opts.n:
        for kind in shapes_for(opts, n):
            try:
                shape = Shape(kind, n)
            except ValueError as e:
                report.notes.append(f"{kind} N={n:,}: not run: {e}")
                continue
            if kind in infeasible_from:
                report.notes.append(f"{shape.label}: not attempted, N={infeasible_from[kind]:,} of this shape already "
                                    "did not complete (bring-up only gets slower with N)")  # fmt: skip
                continue
            changes = 2 if opts.tiny else 10 if n <= 300 else 5
            try:
                bare = _phase("bare", shape, rounds, changes, opts.budget_s)
                try:
                    ours: Phase | None = _phase("fabric", shape, rounds, changes, opts.budget_s)
                except (Infeasible, RuntimeError) as e:
                    if not opts.relays:
                        raise
                    # The relay phases still run: agents behind relays may come up where direct ones did not.
                    what = "NOT FEASIBLE on this machine" if isinstance(e, Infeasible) else "FAILED"
                    report.notes.append(f"{shape.label}: direct {what}: {str(e).splitlines()[0]}")
                    ours = None
                vias: list[Phase] = []
                for k in opts.relays:
                    try:
                        vias.append(_phase("fabric", shape, rounds, changes, opts.budget_s, relays=k))
                    except Infeasible as e:
                        report.notes.append(f"{shape.label}: via {k} relays NOT FEASIBLE on this machine: {e}")
                if ours is None and not vias:
                    raise Infeasible("neither direct nor behind relays within the budget")
            except Infeasible as e:
                report.notes.append(f"{shape.label}: NOT FEASIBLE on this machine: {e}")
                infeasible_from[kind] = n
                continue
            except RuntimeError as e:  # a protocol violation or a broken stream: a finding, reported
                first_line = str(e).splitlines()[0]
                report.notes.append(f"{shape.label}: FAILED: {first_line}")
                bc.progress(NAME, f"{shape.label}: FAILED: {e}")
                infeasible_from[kind] = n
                continue
            if ours is not None:
                _figures(report, shape, ours, bare)
                report.notes.append(_shape_note(shape, ours))
            for via in vias:
                _relay_figures(report, shape, via, ours)
            for phase, what in ((ours, "fabric-reflector"), (bare, "bare server"),
                                *((v, f"{v.relays} fabric-relays") for v in vias)):  # fmt: skip
                if phase is not None and phase.retries:
                    report.notes.append(
                        f"{shape.label}: during bring-up, {phase.retries} agent streams to the {what} failed before "
                        f"admission ({_causes(phase.retry_causes)}) and were retried with backoff, as real agents do"
                    )
    report.notes.append(
        "fanout = ms from the change (joiner opens/cancels its stream; baseline: trigger RPC) to the last affected "
        "agent sending Applied (affected = its plan changes, by the planner; checked against the deltas the "
        "reflector sends); p50/p99 over the changes of a round, then median/min/max over rounds (p99 of fewer than "
        "100 changes is their maximum). Leave figures share the join's baseline (the same bytes to the same agents). "
        "cpu_per_agent = per affected agent. Figures without a shape in their name are the p2p shape (two P2P "
        f"clusters); gateway = gateway-mode clusters of {CLUSTER_SIZE} nodes, {GATEWAY_CANDIDATES} candidates "
        "each, each in its own underlay block (a join inside it changes its cluster's gateways only); subnets = "
        "the same clusters declaring their blocks (nodeCIDRs); interleaved = the same clusters with their nodes' "
        "underlay addresses interleaved (a join changes the routes of every node outside its cluster: the worst "
        "case of gateway mode). Reflector keepalive "
        f"{KEEPALIVE_S:g}s; every agent has its own connection (unix socket)."
    )
    return report


def _relay_figures(report: bc.Report, shape: Shape, via: Phase, direct: Phase | None) -> None:
    """The relay phase beside the direct one of the same run (the baseline: 1.0 = as fast as
    N agents straight on the reflector; higher is better, so > 1 is the relays winning):
    ``relays{K}_...`` figures, a side-by-side progress line and a note with the relays' own cost.
    ``direct`` None: the direct phase did not finish within the budget (a note says how far it
    got); the figures then have no baseline (NaN)."""
    if direct is None:
        nan = float("nan")
        direct = Phase(bringup_s=nan, settle_s=nan, rss_per_agent_kib=nan, bringup_cpu_per_agent_ms=nan)

    def p99(phase: Phase) -> list[float]:
        return [bc.percentile(r, 99) for r in phase.join_ms]

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    k, sfx = via.relays, shape.suffix
    pairs = {
        f"relays{k}_bringup{sfx}": ([via.bringup_s], [direct.bringup_s], "s"),
        f"relays{k}_in_sync{sfx}": ([via.bringup_s + via.settle_s], [direct.bringup_s + direct.settle_s], "s"),
        f"relays{k}_join_fanout_p99{sfx}": (p99(via), p99(direct), "ms"),
        f"relays{k}_reflector_rss_per_agent{sfx}": ([via.rss_per_agent_kib], [direct.rss_per_agent_kib], "KiB"),
        f"relays{k}_reflector_bringup_cpu_per_agent{sfx}": (
            [via.bringup_cpu_per_agent_ms], [direct.bringup_cpu_per_agent_ms], "ms"),
        f"relays{k}_reflector_cpu_per_change{sfx}": (via.cpu_ms, direct.cpu_ms, "ms"),
        # The relays' own cost, per agent, beside what the reflector alone spent per agent direct.
        f"relays{k}_relays_bringup_cpu_per_agent{sfx}": (
            [via.relays_bringup_cpu_s * 1000 / shape.n], [direct.bringup_cpu_per_agent_ms], "ms"),
        f"relays{k}_relays_rss_per_agent{sfx}": ([via.relays_rss_kib / shape.n], [direct.rss_per_agent_kib], "KiB"),
    }  # fmt: skip
    for key, (ours, base, unit) in pairs.items():
        report.figures[key] = bc.figure(ours, {"": base}, higher_is_better=False)
        report.units[key] = unit
    line = (f"{shape.label}: direct vs via {k} relays: bring-up {direct.bringup_s:.1f}s vs {via.bringup_s:.1f}s, "
            f"all in sync {direct.bringup_s + direct.settle_s:.1f}s vs {via.bringup_s + via.settle_s:.1f}s, "
            f"join fan-out p99 {med(p99(direct)):.0f} ms vs {med(p99(via)):.0f} ms, "
            f"reflector RSS/agent {direct.rss_per_agent_kib:.0f} vs {via.rss_per_agent_kib:.0f} KiB, "
            f"reflector bring-up CPU/agent {direct.bringup_cpu_per_agent_ms:.2f} vs "
            f"{via.bringup_cpu_per_agent_ms:.2f} ms")  # fmt: skip
    bc.progress(NAME, line)
    report.notes.append(
        f"{line}; the {k} relays together: {via.relays_bringup_cpu_s:.1f} s CPU during bring-up, "
        f"{via.relays_rss_kib / 1024:.0f} MiB more RSS after it than before "
        f"({via.relays_rss_kib / shape.n:.0f} KiB per agent). "
        "relays*_ figures: the relay phase, baseline the direct phase of the same run (every process on this "
        "machine's shared cores)"
    )


def _causes(causes: dict[str, int]) -> str:
    """A phase's retry causes for its note (agents.NotAdmitted.cause), most frequent first."""
    if not causes:
        return "status not recorded"
    return "; ".join(f"{count:,} {cause!r}" for cause, count in sorted(causes.items(), key=lambda kv: -kv[1]))


def _shape_note(shape: Shape, ours: Phase) -> str:
    if shape.kind == "p2p":
        layout = "2 P2P clusters"
    else:
        layout = f"{shape.clusters} gateway-mode clusters of up to {-(-shape.n // shape.clusters)} nodes"
        layout += {"subnets": " declaring their node subnets (nodeCIDRs)",
                   "interleaved": ", their nodes' underlay addresses interleaved"}.get(shape.kind, "")
    return (
        f"{shape.label}: {layout}; a join or leave changes the plans of {ours.affected:,} of the {shape.n:,} "
        f"agents; after bring-up, the reflector needed {ours.settle_s:.1f}s more until every agent had applied the "
        "bring-up's deltas (changes are measured from then on)"
    )


def _figures(report: bc.Report, shape: Shape, ours: Phase, bare: Phase) -> None:
    def per_round(rounds: list[list[float]], p: float) -> list[float]:
        return [bc.percentile(r, p) for r in rounds]

    sfx = shape.suffix
    for p in (50, 99):
        report.figures[f"join_fanout_p{p}{sfx}"] = bc.figure(
            per_round(ours.join_ms, p), {"": per_round(bare.join_ms, p)}, higher_is_better=False
        )
        report.figures[f"leave_fanout_p{p}{sfx}"] = bc.figure(
            per_round(ours.leave_ms, p), {"": per_round(bare.join_ms, p)}, higher_is_better=False
        )
        report.units[f"join_fanout_p{p}{sfx}"] = report.units[f"leave_fanout_p{p}{sfx}"] = "ms"
    report.figures[f"server_cpu_per_change{sfx}"] = bc.figure(ours.cpu_ms, {"": bare.cpu_ms}, higher_is_better=False)
    report.units[f"server_cpu_per_change{sfx}"] = "ms"

    def per_agent(phase: Phase) -> list[float]:
        return [c * 1000 / max(1, phase.affected) for c in phase.cpu_ms]

    report.figures[f"server_cpu_per_agent_per_change{sfx}"] = bc.figure(
        per_agent(ours), {"": per_agent(bare)}, higher_is_better=False
    )
    report.units[f"server_cpu_per_agent_per_change{sfx}"] = "µs"
    report.figures[f"server_rss_per_agent{sfx}"] = bc.figure(
        [ours.rss_per_agent_kib], {"": [bare.rss_per_agent_kib]}, higher_is_better=False
    )
    report.units[f"server_rss_per_agent{sfx}"] = "KiB"
    report.figures[f"bringup{sfx}"] = bc.figure([ours.bringup_s], {"": [bare.bringup_s]}, higher_is_better=False)
    report.units[f"bringup{sfx}"] = "s"
