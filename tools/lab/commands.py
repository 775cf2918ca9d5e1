"""The lab's verbs: ``up``, ``add-node``, ``down``, ``exec``, ``stop-agent`` /
``start-agent``, ``stop-reflector`` / ``start-reflector``. Each takes the lab's lock, records
every step in the state file before the next, and changes nothing that already runs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fabric import netns as namespaces
from fabric import topology
from tools import nsutil
from tools.lab import labpki
from tools.lab import mcs as labmcs
from tools.lab import tree as labtree
from tools.lab.bpf import mount_bpffs, umount_bpffs
from tools.lab.kube import start_kubernetes, umount_kubelet_roots, wait_kube_nodes
from tools.lab.planning import merge_plan, plan
from tools.lab.plumbing import build, delete_netns
from tools.lab.procs import start_agent, start_reflector, start_relay, wait_in_sync, wait_reflector
from tools.lab.state import (
    BPF_ROOT,
    DEFAULT_NAME,
    DEFAULT_TOPOLOGY,
    DEFAULT_UP_TIMEOUT_S,
    LabError,
    LabState,
    LabUsageError,
    ProcRecord,
    Progress,
    StateError,
    bpf_dir,
    check_lab_name,
    find_node,
    load_state,
    lock_path,
    locked,
    require_root,
    require_state,
    resolve_target,
    save_state,
    state_dir,
    stderr_progress,
)

_log = logging.getLogger(__name__)

# -- the commands ----------------------------------------------------------------------------


def _load_topology(path: str | Path) -> topology.TopologyFile:
    try:
        return topology.load(path)
    except topology.TopologyError as e:
        raise LabUsageError(str(e)) from e


def up(
    topology_path: str | Path = DEFAULT_TOPOLOGY,
    name: str = DEFAULT_NAME,
    *,
    timeout_s: float = DEFAULT_UP_TIMEOUT_S,
    grace_period_s: float | None = None,
    resync_period_s: float | None = None,
    node_cert_lifetime_s: float | None = None,
    relays: int = 0,
    start_processes: bool = True,
    progress: Progress = stderr_progress,
) -> LabState:
    """Build (or complete) lab ``name`` from a topology file and wait until it is in sync.

    ``start_processes=False`` builds only the plumbing (namespaces, links, addresses, the
    intra-cluster routes): the fabric's processes are not started and nothing is awaited.
    """
    check_lab_name(name)
    topo = _load_topology(topology_path)  # before anything is created
    wanted = plan(name, topo)
    require_root()
    with locked(name):
        try:
            current = load_state(name)
        except StateError as e:
            raise LabError(f"{e}; run 'fabric-tool lab down --name {name}' to clear the lab") from e
        if current is not None and not namespaces.exists(current.ul_netns):
            progress(f"lab {name}: recorded lab has no {current.ul_netns} namespace any more; clearing leftovers")
            _down_locked(name, current, progress)
            current = None
        if current is None:
            leftovers = _scan_netns(name)
            if leftovers:
                progress(f"lab {name}: clearing {len(leftovers)} leftover namespaces of an earlier lab")
                _down_locked(name, None, progress)
            state = wanted
            state.grace_period_s, state.resync_period_s = grace_period_s, resync_period_s
            state.node_cert_lifetime_s = node_cert_lifetime_s
            state.relay_procs = [None] * relays
            added = [n.key for n in state.nodes()]
            clusters_changed = True
            config_doc: Any = _read_yaml(topology_path)
        else:
            # Addresses the file leaves to automatic assignment are pinned to what runs, so a
            # node added in the middle of the file does not shift the nodes after it.
            config_doc = pin_running(_read_yaml(topology_path), current)
            try:
                topo = topology.parse(config_doc, str(topology_path))
            except topology.TopologyError as e:
                raise LabUsageError(str(e)) from e
            state, added, clusters_changed = merge_plan(current, plan(name, topo))
            for attr, value in (("grace_period_s", grace_period_s), ("resync_period_s", resync_period_s)):
                if value is not None and getattr(state, attr) != value:
                    progress(f"lab {name}: note: {attr} stays {getattr(state, attr)} for running processes")
            if relays and relays != len(state.relay_procs):
                progress(f"lab {name}: note: the lab keeps its {len(state.relay_procs)} relays "
                         "(--relays is for a new lab)")
        state.state_dir.mkdir(parents=True, exist_ok=True)
        # The reflector reads its configuration (clusters, expected nodes) from this copy.
        tmp = state.topology_copy.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config_doc, sort_keys=False))
        os.replace(tmp, state.topology_copy)
        save_state(state)
        build(state, progress)
        if added and current is not None:
            progress(f"lab {name}: added {', '.join(added)}")
        if not start_processes:
            return state
        deadline = time.monotonic() + timeout_s
        refl = state.reflector
        if refl is not None and refl.running() and clusters_changed and current is not None:
            # New clusters exist only in the configuration file: the reflector must re-read it.
            progress(f"lab {name}: restarting the reflector for the new cluster configuration")
            nsutil.terminate([(refl.pid, refl.start)])
            refl = None
        if refl is None or not refl.running():
            progress(f"lab {name}: starting fabric-reflector in {state.ul_netns} on {state.reflector_address}")
            start_reflector(state)
        wait_reflector(state, deadline, progress)
        for i, rec in enumerate(state.relay_procs):
            if rec is None or not rec.running():
                progress(f"lab {name}: starting fabric-relay {i} in {state.ul_netns} on {state.relay_address(i)}")
                start_relay(state, i)
        mount_bpffs(state)
        for c in state.clusters:  # join: each cluster's bootstrap credential (tools.lab.labpki)
            labpki.bootstrap_dir(state, c.name)
        for node in state.nodes():
            if node.agent is None or not node.agent.running():
                progress(f"lab {name}: starting fabric-agent for {node.key} in {node.netns}")
                start_agent(state, node)
        if state.kubernetes:
            start_kubernetes(state, added if current is not None else [], progress)
        wait_in_sync(state, max(0.0, deadline - time.monotonic()), progress)
        if state.kubernetes:
            wait_kube_nodes(state, max(1.0, deadline - time.monotonic()), progress)
            if state.host_cluster is not None:
                # ClusterTree: the manager against the host, the leaves joined.
                labtree.start_tree(state, progress)
                labtree.join_leaves(state, max(1.0, deadline - time.monotonic()), progress)
            # Multi-cluster services (tools.lab.mcs).
            labmcs.start_mcs(state, progress)
            contexts = ", ".join(c.name for c in state.clusters)
            progress(
                f"lab {name}: kubeconfig {state.kubeconfig} (contexts: {contexts}); e.g. "
                f"kubectl --kubeconfig {state.kubeconfig} --context {state.clusters[0].name} get nodes -o wide"
            )
        # The supervisor that restarts crashed agents, the reflector and the add-ons (every lab;
        # imported here: ``python -m tools.lab.supervisor`` runs it as __main__).
        from tools.lab.supervisor import ensure_supervisor

        ensure_supervisor(state, progress)
        return state


def _read_yaml(path: str | Path) -> Any:
    """The raw document of an already validated topology file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:  # validated a moment ago; only a race gets here
        raise LabUsageError(f"{path}: cannot read: {e}") from e


def pin_running(doc: Any, state: LabState) -> Any:
    """Copy of topology document ``doc`` with the running nodes' automatically assigned
    ``underlay`` and ``podCIDR`` written in explicitly (values the file sets are left alone)."""
    doc = copy.deepcopy(doc)
    if not isinstance(doc, dict) or not isinstance(doc.get("clusters"), list):
        return doc
    for c in doc["clusters"]:
        if not isinstance(c, dict) or not isinstance(c.get("nodes"), list):
            continue
        for n in c["nodes"]:
            if not isinstance(n, dict):
                continue
            rec = state.node(f"{c.get('name')}/{n.get('name')}")
            if rec is not None:
                n.setdefault("underlay", rec.underlay_ip)
                if rec.underlay_ip6:
                    n.setdefault("underlay6", rec.underlay_ip6)
                # One CIDR as before; a list of one per family for a dual-stack or IPv6 node.
                cidrs = list(rec.pod_cidrs)
                n.setdefault("podCIDR", cidrs[0] if cidrs == [rec.pod_cidr] else cidrs)
    return doc


def add_node(
    name: str,
    cluster: str,
    node: str,
    *,
    pods: int = 2,
    pod_cidr: str | None = None,
    underlay: str | None = None,
    timeout_s: float = DEFAULT_UP_TIMEOUT_S,
    progress: Progress = stderr_progress,
) -> LabState:
    """Add one node to a running lab: rewrite its topology with the node appended, then ``up``."""
    state = require_state(name)
    try:
        doc = yaml.safe_load(state.topology_copy.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LabError(f"cannot read the lab's topology copy {state.topology_copy}: {e}") from e
    clusters = doc.get("clusters", []) if isinstance(doc, dict) else []
    target = next((c for c in clusters if isinstance(c, dict) and c.get("name") == cluster), None)
    if target is None:
        known = ", ".join(str(c.get("name")) for c in clusters if isinstance(c, dict))
        raise LabUsageError(f"cluster {cluster!r} is not in lab {name} (clusters: {known})")
    entry: dict[str, Any] = {"name": node, "pods": pods}
    if pod_cidr is not None:
        entry["podCIDR"] = pod_cidr
    if underlay is not None:
        entry["underlay"] = underlay
    target.setdefault("nodes", []).append(entry)
    new_file = state.state_dir / "topology.add-node.yaml"
    new_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        return up(new_file, name, timeout_s=timeout_s, progress=progress)
    finally:
        with contextlib.suppress(FileNotFoundError):
            new_file.unlink()


def _scan_netns(name: str) -> list[str]:
    """Namespaces under /run/netns that belong to lab ``name`` by their name."""
    return [ns for ns in namespaces.list_all() if ns.startswith(f"{name}-")]


def down(name: str = DEFAULT_NAME, progress: Progress = stderr_progress) -> bool:
    """Remove every process, namespace, pinned BPF object and the state of lab ``name``.

    Works from the state file when it can be read, and in any case from a scan of /run/netns
    and /proc. Idempotent; returns True if anything was removed.
    """
    check_lab_name(name)
    require_root()
    with locked(name):
        try:
            state = load_state(name)
        except StateError as e:
            progress(f"lab {name}: ignoring unusable state ({e}); scanning namespaces instead")
            state = None
        changed = _down_locked(name, state, progress)
        # The lock file goes too (down leaves nothing). A command waiting on it right now holds
        # a lock on the unlinked file; it finds no lab and behaves as on a fresh machine.
        with contextlib.suppress(FileNotFoundError):
            lock_path(name).unlink()
        return changed


def _down_locked(name: str, state: LabState | None, progress: Progress) -> bool:
    owned = list(state.namespaces()) if state else []
    scanned = _scan_netns(name)
    owned += [ns for ns in sorted(scanned, key=lambda s: -s.count("-")) if ns not in owned]
    # Processes, in two steps. First those recorded (PID + start time): the reflector, agents
    # and the Kubernetes processes. A kubelet still running while its containers are killed
    # restarts them (restartPolicy), so the containers go only once every kubelet is gone: then
    # sweeps of the container shims and processes the kubelets recorded and anything else of
    # the lab's, found afresh each time (_sweep_containers).
    daemons: dict[int, int | None] = {}
    if state is not None:
        sup = state.supervisor
        if sup is not None and sup.running():
            # First, alone: it would restart what is stopped next.
            progress(f"lab {name}: stopping the supervisor ({sup.pid})")
            nsutil.terminate([(sup.pid, sup.start)])
        kube = [r for c in state.clusters
                for r in (c.kubelet, c.controller_manager, c.proxy, c.scheduler_proc, c.dns_proc, c.apiserver)]
        for rec in [state.reflector, *state.relay_procs, *(n.agent for n in state.nodes()), state.tree_proc,
                    state.mcs_proc, *kube]:
            if rec is not None and rec.running():
                daemons[rec.pid] = rec.start
    changed = False
    if daemons:
        progress(f"lab {name}: stopping {len(daemons)} processes ({', '.join(map(str, sorted(daemons)))})")
        nsutil.terminate(sorted(daemons.items()))
        changed = True
    if _sweep_containers(name, owned, progress):
        changed = True
    gone = delete_netns([ns for ns in owned if namespaces.exists(ns)])
    if gone:
        progress(f"lab {name}: deleted {len(gone)} namespaces")
        changed = True
    for root in umount_kubelet_roots(name):
        progress(f"lab {name}: unmounted the kubelet root (tmpfs) at {root}")
        changed = True
    if umount_bpffs(name):
        progress(f"lab {name}: unmounted its bpf filesystem (translator pins) at {bpf_dir(name)}")
        changed = True
    pins = BPF_ROOT / name
    if pins.exists():
        shutil.rmtree(pins, ignore_errors=True)
        progress(f"lab {name}: removed pinned BPF objects under {pins}")
        changed = True
    sd = state_dir(name)
    if sd.exists():
        shutil.rmtree(sd, ignore_errors=True)
        changed = True
    if not changed:
        progress(f"lab {name}: nothing to remove")
    return changed


#: At most this many sweeps of the lab's containers (see :func:`_sweep_containers`).
SWEEPS = 5


def _lab_processes(name: str, owned: Sequence[str]) -> dict[int, int | None]:
    """``pid -> start time`` of what is left of lab ``name`` once its daemons are gone: the
    container shims and processes its kubelets recorded, every process in one of its
    namespaces, and every process naming its state directory on its command line (each process
    the lab starts does; a shim carries its spawner's, so one forked after its kubelet recorded
    the last is found too)."""
    from kubeemu.runtime.pods import recorded_processes  # lab kubelets' container shims and processes

    found: dict[int, int | None] = {}
    for root in state_dir(name).glob("kubelet-*"):
        for pid, start in recorded_processes(root):
            if nsutil.same_process(pid, start):
                found.setdefault(pid, start)
    inodes = [i for i in (namespaces.inode(ns) for ns in owned) if i is not None]
    mine = set(nsutil.ancestors(os.getpid()))  # never a target, whatever their command lines say
    for pid in [*nsutil.pids_in_netns(inodes), *nsutil.pids_naming(f"{state_dir(name)}/")]:
        if pid not in mine:
            found.setdefault(pid, nsutil.start_time(pid))
    return found


def _sweep_containers(name: str, owned: Sequence[str], progress: Progress) -> bool:
    """Stop what :func:`_lab_processes` finds, again until a sweep finds nothing (at most
    :data:`SWEEPS`). One sweep is not enough: a spawn request a kubelet sent before it exited
    is still being served when the spawner is killed, and its shim appears after the sweep
    listed the processes (as do containers a shim started before it was stopped). Each sweep
    kills the spawners and their in-flight children with the rest, so the second finds the last
    of them and the third nothing. Returns True if anything was stopped."""
    stopped = False
    for _ in range(SWEEPS):
        targets = _lab_processes(name, owned)
        if not targets:
            return stopped
        progress(f"lab {name}: stopping {len(targets)} processes in its namespaces and containers "
                 f"({', '.join(map(str, sorted(targets)))})")
        nsutil.terminate(sorted(targets.items()))
        stopped = True
    left = _lab_processes(name, owned)
    if left:
        progress(f"lab {name}: processes still appearing after {SWEEPS} sweeps, left running: "
                 f"{', '.join(map(str, sorted(left)))}")
    return stopped


def exec_in(name: str, target: str, cmd: Sequence[str]) -> int:
    """Run ``cmd`` in a pod's or node's namespace (``ip netns exec``, so /sys matches too)."""
    if not cmd:
        raise LabUsageError("lab exec: no command given (usage: lab exec POD -- CMD...)")
    state = require_state(name)
    ns = resolve_target(state, target)
    try:
        return subprocess.call(["ip", "netns", "exec", ns, *cmd])
    except KeyboardInterrupt:
        return 130


def stop_agent(name: str, spec: str, progress: Progress = stderr_progress) -> bool:
    """SIGTERM one node's agent and wait for it to exit. Its dataplane stays as it is."""
    require_root()
    with locked(name):
        state = require_state(name)
        node = find_node(state, spec)
        stopped = _stop_recorded(name, node.agent, f"the agent of {node.key}", progress)
        node.agent = None
        save_state(state)
        return stopped


def _stop_recorded(name: str, rec: ProcRecord | None, what: str, progress: Progress) -> bool:
    """SIGTERM the process ``rec`` records and wait (10 s, then SIGKILL) for it to exit; False
    when it was not running. The caller forgets the record and saves the state either way."""
    if rec is None or not rec.running():
        progress(f"lab {name}: {what} is not running")
        return False
    nsutil.terminate([(rec.pid, rec.start)], grace_s=10.0)
    progress(f"lab {name}: stopped {what} (pid {rec.pid})")
    return True


def start_agent_cmd(
    name: str, spec: str, *, wait: bool = True, timeout_s: float = 30.0, progress: Progress = stderr_progress
) -> bool:
    """Start one node's agent (if it is not running) and, with ``wait``, wait until it is in sync."""
    require_root()
    with locked(name):
        state = require_state(name)
        node = find_node(state, spec)
        if node.agent is not None and node.agent.running():
            progress(f"lab {name}: the agent of {node.key} already runs (pid {node.agent.pid})")
            return False
        rec = start_agent(state, node)
        progress(f"lab {name}: started the agent of {node.key} (pid {rec.pid}, log {rec.log})")
        if wait:
            wait_in_sync(state, timeout_s, progress)
        return True


def stop_reflector(name: str, progress: Progress = stderr_progress) -> bool:
    """SIGTERM the lab's reflector and wait for it to exit; the agents keep their dataplane."""
    require_root()
    with locked(name):
        state = require_state(name)
        stopped = _stop_recorded(name, state.reflector, "the reflector", progress)
        state.reflector = None
        save_state(state)
        return stopped


def start_reflector_cmd(
    name: str, *, wait: bool = True, timeout_s: float = 60.0, progress: Progress = stderr_progress
) -> bool:
    """Start the lab's reflector if it is not running; with ``wait``, until every node is in sync."""
    require_root()
    with locked(name):
        state = require_state(name)
        if state.reflector is not None and state.reflector.running():
            progress(f"lab {name}: the reflector already runs (pid {state.reflector.pid})")
            return False
        deadline = time.monotonic() + timeout_s
        rec = start_reflector(state)
        progress(f"lab {name}: started the reflector (pid {rec.pid}, log {rec.log})")
        wait_reflector(state, deadline, progress)
        if wait:
            wait_in_sync(state, max(0.0, deadline - time.monotonic()), progress)
        return True
