"""The lab's supervisor (``python -m tools.lab.supervisor --lab NAME``): restarts the fabric's
agents and reflector, ``kosmos-tree`` and the schedulers when they die, as the kubelet restarts
a DaemonSet's or a Deployment's container.

It runs in every lab, root namespace, started by ``lab up`` (which restarts it too when it
died) and stopped first by ``lab down``. Every second it reads the state file; a supervised
process (:func:`supervised`: every node's ``fabric-agent`` (``agent/<cluster>/<node>``: in
production a DaemonSet's pod, issue 21 section 5), the ``fabric-reflector`` (``reflector``: a
Deployment), the relays of ``lab up --relays K`` (``relay/<i>``), the tree manager, each
cluster's scheduler other than ``none`` (in labs with a host only) and each cluster's DNS
(:func:`tools.lab.kube.start_dns`),
and ``kosmos-mcs`` (:func:`tools.lab.mcs.start_mcs`, while every API server runs),
all only while their API server runs) that is recorded
but no longer running is started again by the lab's own starter
(:func:`tools.lab.tree.start_tree`, :func:`tools.lab.schedulers.start_scheduler`), under the
lab's lock, taken without waiting (a busy lab is retried next round), the state re-read under it,
so it never races ``lab up`` or ``lab down``. A process nobody has started yet (recorded as
None) is ``lab up``'s business, not restarted here; so is one stopped on purpose (``lab
stop-agent`` / ``stop-reflector`` forget its record): only a process that died while recorded
as running - crashed or killed - is restarted. A restarted agent loses no packets (its
dataplane stays in the kernel meanwhile and it adopts it: DESIGN.md), and the reflector keeps a
gateway's roles across its agent's restart (a session loss alone is no dead gateway:
:mod:`fabric.control.election`).

Back-off as the kubelet's CrashLoopBackOff: the first restart at once, then 10 s, doubling to
300 s; a process that ran 600 s since its last start is forgiven. The count of restarts is kept
in the state file (``LabState.restarts``, shown by ``lab status``); the back-off clock is kept in
memory (a restarted supervisor begins with a fresh one, as a restarted kubelet does).

Processes are started by exec (:func:`tools.lab.procs.start_process`: ``subprocess.Popen``
without ``preexec_fn``); this process never uses gRPC.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from fabric import logs
from tools.lab import kube as labkube
from tools.lab import mcs as labmcs
from tools.lab import schedulers
from tools.lab import tree as labtree
from tools.lab.procs import ROOT_NETNS, start_agent, start_process, start_reflector, start_relay, still_running
from tools.lab.state import (
    LAB_ROOT,
    LabState,
    ProcRecord,
    Progress,
    StateError,
    load_state,
    lock_path,
    quiet,
    save_state,
)

_log = logging.getLogger(__name__)

INITIAL_BACKOFF_S = 10.0
MAX_BACKOFF_S = 300.0
#: A process that ran this long since its last (re)start has its back-off reset.
FORGIVE_AFTER_S = 600.0
POLL_S = 1.0


def supervised(state: LabState) -> dict[str, tuple[ProcRecord | None, Callable[[LabState], object]]]:
    """What the supervisor keeps running: key -> (its record, the function that starts it)."""
    out: dict[str, tuple[ProcRecord | None, Callable[[LabState], object]]] = {}
    if state.reflector is not None:
        out["reflector"] = (state.reflector, start_reflector)
    for i, rec in enumerate(state.relay_procs):
        if rec is None:
            continue

        def start_one_relay(st: LabState, index: int = i) -> object:
            return start_relay(st, index)

        out[f"relay/{i}"] = (rec, start_one_relay)
    for node in state.nodes():
        if node.agent is None:
            continue

        def start_node_agent(st: LabState, key: str = node.key) -> object:
            n = next(x for x in st.nodes() if x.key == key)
            return start_agent(st, n)

        out[f"agent/{node.key}"] = (node.agent, start_node_agent)
    host = state.host_cluster
    if host is not None and host.apiserver is not None and host.apiserver.running() and host.api_url:
        out["tree"] = (state.tree_proc, labtree.start_tree)
    for c in state.clusters:
        # Schedulers only in ClusterTree labs, as before kosmos-mcs brought the supervisor to
        # every Kubernetes lab: a plain lab's scheduler stays down when killed, which its HA test
        # relies on (a killed holder is a lost node there; `lab up` starts it again).
        if host is None:
            break
        if c.scheduler == "none" or c.apiserver is None or not c.apiserver.running() or not c.api_url:
            continue
        name = c.name

        def start(st: LabState, name: str = name) -> object:
            cl = next(x for x in st.clusters if x.name == name)
            return schedulers.start_scheduler(st, cl)

        out[f"scheduler/{name}"] = (c.scheduler_proc, start)
    for c in state.clusters:
        if c.apiserver is None or not c.apiserver.running() or not c.api_url:
            continue

        def start_dns(st: LabState, name: str = c.name) -> object:
            cl = next(x for x in st.clusters if x.name == name)
            return labkube.start_dns(st, cl)

        out[f"dns/{c.name}"] = (c.dns_proc, start_dns)
    if labmcs.enabled(state) and all(c.apiserver is not None and c.apiserver.running() and c.api_url
                                     for c in state.clusters):
        out["mcs"] = (state.mcs_proc, labmcs.start_mcs)
    return out


def backoff(failures: int, initial: float = INITIAL_BACKOFF_S, cap: float = MAX_BACKOFF_S) -> float:
    """Seconds before restart number ``failures + 1`` (kubelet: at once, then 10 s doubling to 300 s)."""
    if failures <= 0:
        return 0.0
    return float(min(cap, initial * 2 ** (failures - 1)))


@dataclass
class _Track:
    failures: int = 0
    dead_since: float | None = None
    started: float | None = None


@contextlib.contextmanager
def try_locked(name: str) -> Iterator[bool]:
    """The lab's lock if free right now (True), else False: a busy lab is retried later."""
    path = lock_path(name)
    if not path.exists():
        yield False  # lab down removed it: the lab is going away
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


class Supervisor:
    def __init__(self, name: str, *, initial: float = INITIAL_BACKOFF_S, cap: float = MAX_BACKOFF_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.initial, self.cap = initial, cap
        self.clock = clock
        self.tracks: dict[str, _Track] = {}

    def round(self) -> list[str]:
        """One look at the lab; returns the keys restarted."""
        try:
            state = load_state(self.name)
        except StateError as e:
            _log.warning("lab %s: %s", self.name, e)
            return []
        if state is None:
            return []
        now = self.clock()
        due: list[str] = []
        for key, (rec, _start) in supervised(state).items():
            t = self.tracks.setdefault(key, _Track())
            if rec is None:
                continue
            if rec.running():
                t.dead_since = None
                if t.started is not None and now - t.started >= FORGIVE_AFTER_S:
                    t.failures, t.started = 0, None
                continue
            if t.dead_since is None:
                t.dead_since = now
                _log.info("lab %s: %s (pid %d) is not running; restart in %.0f s", self.name, key, rec.pid,
                          backoff(t.failures, self.initial, self.cap))
            if now - t.dead_since >= backoff(t.failures, self.initial, self.cap):
                due.append(key)
        if not due:
            return []
        done: list[str] = []
        with try_locked(self.name) as got:
            if not got:
                return []
            state = load_state(self.name)
            if state is None:
                return []
            for key in due:
                rec, start = supervised(state).get(key, (None, None))  # type: ignore[assignment]
                if start is None or rec is None or rec.running():
                    continue
                t = self.tracks[key]
                t.failures += 1
                try:
                    start(state)
                except Exception as e:  # counted as a failed start: the back-off applies to the next try
                    t.dead_since = now
                    _log.warning("lab %s: restarting %s failed (next try in %.0f s): %s", self.name, key,
                                 backoff(t.failures, self.initial, self.cap), e)
                    continue
                state.restarts[key] = state.restarts.get(key, 0) + 1
                save_state(state)
                t.dead_since, t.started = None, now
                _log.info("lab %s: restarted %s (restart %d)", self.name, key, state.restarts[key])
                done.append(key)
        return done

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(POLL_S):
            try:
                self.round()
            except Exception:  # one bad round (a failed start) must not end the supervisor
                _log.exception("lab %s: supervisor round failed", self.name)


def supervisor_argv(state: LabState) -> list[str]:
    return [sys.executable, "-m", "tools.lab.supervisor", "--lab", state.name]


def ensure_supervisor(state: LabState, progress: Progress = quiet) -> ProcRecord | None:
    """Start the lab's supervisor unless it runs (every lab: it restarts the agents and the reflector)."""
    argv = supervisor_argv(state)
    if (rec := still_running(state.supervisor, argv)) is not None:
        return rec
    rec = start_process(ROOT_NETNS, argv, state.state_dir / "logs" / "supervisor.log")
    state.supervisor = rec
    save_state(state)
    progress(f"lab {state.name}: supervisor started (pid {rec.pid}, log {rec.log}): restarts the agents, the "
             "reflector, kosmos-tree, kosmos-mcs, the schedulers and the cluster DNS when they die")
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.lab.supervisor", description=__doc__.split("\n")[0])
    p.add_argument("--lab", required=True, help="the lab's name")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logs.setup(args.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _log.info("supervising lab %s (state under %s)", args.lab, LAB_ROOT)
    Supervisor(args.lab).run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
