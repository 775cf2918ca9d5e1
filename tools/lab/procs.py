"""The lab's processes: the reflector and one agent per node, started inside their
namespaces by exec (:func:`tools.nsutil.spawn_in_netns`), and waiting for the reflector to
answer and for every node to report its planned version applied.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fabric.control import api
from tools import nsutil
from tools.lab import labpki
from tools.lab.state import LabError, LabState, NodeRecord, ProcRecord, Progress, bpf_dir, quiet, save_state

_log = logging.getLogger(__name__)

# -- processes -------------------------------------------------------------------------------


def _venv_bin(program: str) -> Path:
    """Console scripts live next to the interpreter running us (the venv's bin), not on PATH."""
    path = Path(sys.executable).parent / program
    if not path.exists():
        raise LabError(f"{program} not found at {path}: is the project installed in this virtualenv (./dev.sh setup)?")
    return path


#: ``ProcRecord.netns`` of the processes that run in the root namespace (the Kubernetes API
#: servers listen on 127.0.0.1 for kubectl, and their kubelets talk to them there).
ROOT_NETNS = ""


def start_process(netns: str, argv: list[str], log_path: Path) -> ProcRecord:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        where = netns or "the root namespace"
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting in {where}: {' '.join(argv)}\n".encode())
        log.flush()
        if netns == ROOT_NETNS:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)  # fmt: skip
        else:
            proc = nsutil.spawn_in_netns(netns, argv, stdout=log, stderr=subprocess.STDOUT)
    # The Popen object is dropped on purpose: the process outlives us. subprocess reaps it if it
    # exits while we still run; afterwards init does.
    return ProcRecord(pid=proc.pid, start=nsutil.start_time(proc.pid), netns=netns, log=str(log_path), argv=argv)


def still_running(rec: ProcRecord | None, argv: list[str], progress: Progress = quiet,
                  restarting: str | None = None) -> ProcRecord | None:
    """``rec`` if it runs ``argv``; else None, and a ``rec`` that runs another command line is
    stopped first (``restarting`` said to ``progress``): the caller starts the new one."""
    if rec is not None and rec.running():
        if rec.argv == argv:
            return rec
        if restarting is not None:
            progress(restarting)
        nsutil.terminate([(rec.pid, rec.start)])
    return None


def log_tail(path: str, lines: int = 8) -> str:
    try:
        tail = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n    " + "\n    ".join(tail) if tail else ""


def start_reflector(state: LabState) -> ProcRecord:
    """Start the lab's reflector: on the lab's own topology file, or with ``state.reflector_args``
    when something (``fabric-tool install``) gave it others. The listen addresses, metrics port
    and log level are the lab's either way, so agents and tools always find it."""
    sock = state.reflector_socket
    server, ca = labpki.reflector_dirs(state)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    source = (
        ["--config", str(state.topology_copy)] if state.reflector_args is None else list(state.reflector_args)
    )
    argv = [
        str(_venv_bin("fabric-reflector")),
        *source,
        "--listen", state.reflector_address,
        "--listen", f"unix:{sock}",
        "--grace-period", _num(state.grace_period_s if state.grace_period_s is not None else 30.0),
        "--metrics-listen", f"{state.gateway}:{api.DEFAULT_REFLECTOR_METRICS_PORT}",
        # Install: the lab's CA signs the reflector's certificate and, through it, node certificates.
        "--tls-dir", str(server), "--ca-dir", str(ca),
        *(("--node-cert-lifetime", _num(state.node_cert_lifetime_s)) if state.node_cert_lifetime_s else ()),
        "--log-level", "info",
    ]  # fmt: skip
    rec = start_process(state.ul_netns, argv, state.state_dir / "logs" / "reflector.log")
    state.reflector = rec
    save_state(state)
    return rec


def start_relay(state: LabState, index: int) -> ProcRecord:
    """Start the lab's relay ``index`` (``lab up --relays K``) in the underlay namespace, beside
    the reflector: mutual TLS both ways (a server certificate for the agents, ``relay/relay-<i>``
    towards the reflector), metrics and probes on port ``api.DEFAULT_RELAY_METRICS_PORT`` + i
    (9478-9493 for up to 16 relays; the underlay namespace's other listeners are the reflector's
    4880 and 9477 and the relays' 7947 + i, and the lab's other processes listen in node
    namespaces or on 127.0.0.1 of the root namespace)."""
    server, client_tls = labpki.relay_dirs(state, index)
    argv = [
        str(_venv_bin("fabric-relay")),
        "--upstream", state.reflector_address,
        "--listen", state.relay_address(index),
        "--tls-dir", str(server), "--upstream-tls-dir", str(client_tls),
        "--metrics-listen", f"{state.gateway}:{api.DEFAULT_RELAY_METRICS_PORT + index}",
        "--log-level", "info",
    ]  # fmt: skip
    rec = start_process(state.ul_netns, argv, state.state_dir / "logs" / f"relay-{index}.log")
    state.relay_procs[index] = rec
    save_state(state)
    return rec


def start_agent(state: LabState, node: NodeRecord) -> ProcRecord:
    argv = [
        str(_venv_bin("fabric-agent")),
        "--reflector", state.session_target(node.key),
        # Certificates (the first, with the bootstrap credential, and renewals) from the reflector
        # itself: relays carry sessions only.
        "--certificates-from", state.reflector_address,
        "--cluster", node.cluster,
        "--node", node.name,
        "--underlay-ip", node.underlay_ip,
        *(a for c in node.pod_cidrs for a in ("--pod-cidr", c)),
        *(("--underlay-ip6", node.underlay_ip6) if node.underlay_ip6 else ()),
        "--metrics-listen", f"0.0.0.0:{api.DEFAULT_AGENT_METRICS_PORT}",
        "--bpf-pin-root", str(bpf_dir(state.name)),
        # Join: the cluster's bootstrap credential; the agent makes its key and gets its own certificate.
        "--tls-dir", str(labpki.node_dir(state, node.cluster, node.name)),
        "--bootstrap-dir", str(labpki.bootstrap_path(state, node.cluster)),
        "--log-level", "info",
    ]  # fmt: skip
    if state.resync_period_s is not None:
        argv[-2:-2] = ["--resync-period", _num(state.resync_period_s)]
    rec = start_process(node.netns, argv, state.state_dir / "logs" / f"agent-{node.cluster}-{node.name}.log")
    node.agent = rec
    save_state(state)
    return rec


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def status_client() -> Any:
    """The control channel's client, imported late: the lab's plumbing works without it."""
    try:
        # importlib keeps this module importable (and type-checkable) before the client exists.
        client = importlib.import_module("fabric.control.client")
    except ImportError as e:
        raise LabError(
            f"the control-channel client (fabric.control.client) is not available: {e}. "
            "Run ./dev.sh setup (it also generates the gRPC stubs)."
        ) from e
    return client


def query_status(state: LabState, timeout_s: float = 2.0) -> tuple[api.FabricStatus | None, str | None]:
    """The reflector's status through its unix socket, or ``(None, reason)``."""
    client = status_client()
    if not state.reflector_socket.exists():
        return None, f"no reflector socket at {state.reflector_socket}"
    try:
        return client.get_status_sync(f"unix:{state.reflector_socket}", timeout_s, labpki.reader_tls(state)), None
    except Exception as e:  # any failure of the remote end is reported, not raised
        return None, f"{type(e).__name__}: {e}".strip()


def wait_reflector(state: LabState, deadline: float, progress: Progress) -> None:
    last = ""
    while True:
        st, err = query_status(state, 1.0)
        if st is not None:
            return
        assert state.reflector is not None
        if not state.reflector.running():
            log = state.reflector.log
            raise LabError(f"fabric-reflector exited at start; see {log}{log_tail(log)}")
        if time.monotonic() > deadline:
            raise LabError(
                f"fabric-reflector did not answer on {state.reflector_socket} in time ({err}); "
                f"see {state.reflector.log}"
            )
        if err != last:
            progress(f"lab {state.name}: waiting for the reflector ({err})")
            last = err or ""
        time.sleep(0.2)


def laggards(state: LabState, status: api.FabricStatus | None) -> dict[str, str]:
    """Nodes not yet in sync, each with why (what the reflector says, or that it is silent)."""
    out: dict[str, str] = {}
    by_key = {n.key: n for n in status.nodes()} if status is not None else {}
    for node in state.nodes():
        ns = by_key.get(node.key)
        if node.agent is None or not node.agent.running():
            out[node.key] = "agent not running"
        elif status is None:
            out[node.key] = "reflector unreachable"
        elif ns is None:
            out[node.key] = "not announced to the reflector"
        elif not ns.connected:
            out[node.key] = "session not connected"
        elif not ns.in_sync:
            out[node.key] = f"applied version {ns.applied_version} of planned {ns.planned_version}"
    return out


def wait_in_sync(state: LabState, timeout_s: float, progress: Progress = quiet) -> None:
    """Poll the reflector until every node of the lab reports its planned version applied."""
    deadline = time.monotonic() + timeout_s
    total = sum(1 for _ in state.nodes())
    last_report = ""
    last_time = 0.0
    status: api.FabricStatus | None = None
    err: str | None = None
    while True:
        status, err = query_status(state, 2.0)
        lag = laggards(state, status)
        if not lag:
            progress(f"lab {state.name}: all {total} nodes in sync")
            return
        dead = [k for k, why in lag.items() if why == "agent not running"]
        if dead:
            node = state.node(dead[0])
            assert node is not None
            log = node.agent.log if node.agent else "(never started)"
            raise LabError(f"the agent of {dead[0]} is not running; see {log}{log_tail(log)}")
        report = f"{total - len(lag)}/{total} nodes in sync; waiting for " + ", ".join(sorted(lag))
        now = time.monotonic()
        if report != last_report or now - last_time > 5:
            progress(f"lab {state.name}: {report}")
            last_report, last_time = report, now
        if now > deadline:
            lines = []
            for key, why in sorted(lag.items()):
                node = state.node(key)
                log = node.agent.log if node and node.agent else "?"
                lines.append(f"  {key}: {why} (log: {log})")
            extra = f"\nreflector: {err}" if err else ""
            if state.reflector:
                extra += f"\nreflector log: {state.reflector.log}"
            raise LabError(
                f"lab {state.name}: not in sync after {timeout_s:g} s; laggards:\n"
                + "\n".join(lines)
                + extra
                + f"\nthe lab is left up for inspection; 'fabric-tool lab down --name {state.name}' removes it"
            )
        time.sleep(0.25)
