"""The VM tier (issue 22): the fabric on three real Debian 12 kernels booted with qemu.

vagrant/settings.yaml: east (P2P, vm1, also the reflector) and west (gateway mode, vm2 + vm3,
both gateway candidates), one pod per VM. Both clusters use the same pod and service ranges,
so they reach each other only through their global CIDRs, translated by the BPF programs the
agents compile and load in the guests' 6.1 kernels.

Tests run in file order on one environment and each leaves it as it found it (in sync).
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import re
import selectors
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.waiting import wait_until
from tools.lab.state import LabState, PodRecord
from tools.vm import image as imagemod
from tools.vm import runner

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3000)]

PROGRAMS = {"xlate_tunnel_ingress", "xlate_tunnel_egress", "xlate_hairpin"}
PY = f"cd {imagemod.GUEST_SRC} && {imagemod.GUEST_VENV}/bin/python"


def _pod(lab: LabState, key: str) -> PodRecord:
    node = lab.node(key)
    assert node is not None and node.pods, key
    return node.pods[0]


def _global(lab: LabState, cluster: str, ip: str) -> str:
    c = next(c for c in lab.clusters if c.name == cluster)
    g = c.global_ip(ip)
    assert g is not None, f"{cluster} has no global address for {ip}"
    return g


def _west(st: runner.VMState) -> dict[str, Any]:
    doc = runner.status(st)
    assert "error" not in doc, doc
    return next(c for c in doc["clusters"] if c["name"] == "west")


def test_check_passes_every_pod_and_service_pair_through_global_ips(vmenv: runner.VMState) -> None:
    result = runner.run_check(vmenv, timeout_s=3.0, services=True)
    failed = [f"{p.src} -> {p.dst} ({p.dst_ip}): {p.error}" for p in result.pairs if not p.ok]
    assert not failed, "\n".join(failed)
    # 3 pods: 6 pod pairs, and each pod probes the other cluster's lab service.
    assert len(result.pairs) == 9
    cross = [p for p in result.pairs if p.src.split("/")[0] != p.dst.split("/")[0]]
    assert len(cross) == 7
    # Other clusters see only the global ranges (east 172.20/172.21, west 172.22/172.23).
    assert all(p.dst_ip.startswith("172.2") for p in cross), [(p.src, p.dst, p.dst_ip) for p in cross]


def test_translation_is_done_in_the_guest_kernels(vmenv: runner.VMState) -> None:
    """east/vm1/p0 and west/vm2/p0 have the same address (10.10.0.2): a ping from one to the other
    arrives with the sender's global source and the receiver's own address as destination."""
    lab = runner.lab_of(vmenv)
    src, dst = _pod(lab, "east/vm1"), _pod(lab, "west/vm2")
    assert src.ip == dst.ip
    want_src = _global(lab, "east", src.ip)
    cap = subprocess.Popen(runner.ssh_argv(vmenv, vmenv.vm("vm2"),
                                           f"timeout 90 ip netns exec {dst.netns} tcpdump -l -n -c 1 "
                                           f"'icmp[icmptype] == icmp-echo and src {want_src}'"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        # tcpdump starts slowly under TCG: ping once it says it is capturing, not after a guess.
        started = _read_until(cap, "listening on", 60)
        ping = runner.ssh(vmenv, "vm1", f"ip netns exec {src.netns} ping -c 5 -i 1 -W 2 {_global(lab, 'west', dst.ip)}",
                          check=False)  # fmt: skip
        out, err = cap.communicate(timeout=90)
    finally:
        if cap.poll() is None:
            cap.kill()
    assert ping.returncode == 0, ping.stdout.decode()
    assert re.search(rf"IP {re.escape(want_src)} > {re.escape(dst.ip)}: ICMP echo request", out), started + out + err


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """``proc``'s stderr up to the line holding ``marker`` (what was read, for a failure message)."""
    assert proc.stderr is not None
    lines: list[str] = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stderr.readline()
                if not line:
                    break
                lines.append(line)
                if marker in line:
                    return "".join(lines)
    raise AssertionError(f"no {marker!r} from {proc.args[-1]!r} in {timeout_s:g} s: {''.join(lines)[-500:]}")


def test_bpf_programs_load_on_the_guest_kernel_and_the_host_kernel(vmenv: runner.VMState) -> None:
    """Each program's verifier instruction count per kernel: the guests' (read from the
    programs their agents loaded) and this machine's (the same sources compiled and loaded here
    in a private bpffs); a program that does not load on either fails the test."""
    # A private mount namespace with a bpffs of its own: nothing is left on the machine's mounts.
    verifier = (f'd=$(mktemp -d) && mount -t bpf bpf "$d" && {sys.executable} -m tools.vm.guest verifier '
                '--pin-root "$d"; umount "$d"; rmdir "$d"')
    # The host's compile and the three guests' reads at once: each is one process on one thread
    # (a guest's is its TCG thread), so one after another they keep only one of the two cores busy.
    host_proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", verifier],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=str(runner.REPO))  # fmt: skip

    def loaded(v: runner.VMRecord) -> dict[str, Any]:
        agent_pid = "$(systemctl show -p MainPID --value fabric-agent)"
        r = runner.ssh(vmenv, v, f"{PY} -m tools.vm.guest loaded --pid {agent_pid}")
        doc: dict[str, Any] = json.loads(r.stdout.decode())
        return doc

    counts: dict[str, dict[str, Any]] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(vmenv.vms)) as pool:
            for v, doc in zip(vmenv.vms, pool.map(loaded, vmenv.vms), strict=True):
                assert doc["kernel"].startswith("6.1."), doc
                counts[f"{v.name} ({doc['kernel']})"] = doc["programs"]
        out, err = host_proc.communicate(timeout=600)
    finally:
        if host_proc.poll() is None:
            host_proc.kill()
            host_proc.communicate()
    host = subprocess.CompletedProcess(host_proc.args, host_proc.returncode, out, err)
    lines = host.stdout.strip().splitlines()
    hdoc: dict[str, Any] = json.loads(lines[-1]) if lines else {"programs": {}, "kernel": "?"}
    counts[f"host ({hdoc['kernel']})"] = hdoc["programs"]
    print("\nverifier instructions per kernel:")
    for where, progs in counts.items():
        print(f"  {where:<34} " + "  ".join(f"{p}={progs.get(p, 'NOT LOADED')}" for p in sorted(PROGRAMS)))
    missing = {where: sorted(PROGRAMS - {p for p, n in progs.items() if isinstance(n, int) and n > 0})
               for where, progs in counts.items()}  # fmt: skip
    assert not any(missing.values()), f"programs that did not load: {missing}; host stderr: {host.stderr[-500:]}"


def _start_ping(st: runner.VMState, vm: str, pod: PodRecord, dst: str, out: str) -> int:
    r = runner.ssh(st, vm, f"nohup ip netns exec {pod.netns} ping -n -i 0.2 -W 2 {dst} > {out} 2>&1 & echo $!")
    return int(r.stdout.decode().split()[-1])


def _stop_ping(st: runner.VMState, vm: str, pid: int, out: str) -> tuple[int, list[int], list[int]]:
    """(packets sent, sequence numbers never answered except the last one, which may still be
    in flight when ping is stopped, received sequence numbers)."""
    runner.ssh(st, vm, f"kill -INT {pid}; sleep 2")
    text = runner.ssh(st, vm, f"cat {out}").stdout.decode()
    m = re.search(r"(\d+) packets transmitted", text)
    assert m, text[-500:]
    sent = int(m.group(1))
    got = sorted({int(x) for x in re.findall(r"icmp_seq=(\d+) ttl=", text)})
    lost = sorted(set(range(1, sent)) - set(got))
    return sent, lost, got


def _largest_gap_s(got: list[int], interval_s: float = 0.2) -> float:
    return max((b - a for a, b in itertools.pairwise(got)), default=1) * interval_s - interval_s


def _first_sync_line(st: runner.VMState, vm: str) -> str:
    """The running agent's "dataplane in sync" log line (its first complete snapshot applied),
    or "" while it has not got there (this invocation of the unit only)."""
    r = runner.ssh(st, vm, "journalctl -o cat _SYSTEMD_INVOCATION_ID=$(systemctl show -p InvocationID --value "
                           "fabric-agent) | grep -m1 'dataplane in sync' || true", check=False)  # fmt: skip
    return r.stdout.decode(errors="replace").strip()


def test_agent_restart_loses_no_packets(vmenv: runner.VMState) -> None:
    """Restart the agents on the path (east/vm1 and west's active gateway) while a pod pings a
    pod of the other cluster behind that gateway: not one echo goes unanswered."""
    lab = runner.lab_of(vmenv)
    active = _west(vmenv)["active_gateway"]
    other = next(v.name for v in vmenv.vms if v.cluster == "west" and v.name != active)
    src, dst = _pod(lab, "east/vm1"), _pod(lab, f"west/{other}")
    out = "/tmp/kf-restart-ping.out"
    pid = _start_ping(vmenv, "vm1", src, _global(lab, "west", dst.ip), out)
    try:
        time.sleep(3)
        t0 = time.monotonic()
        for vm in ("vm1", active):
            runner.ssh(vmenv, vm, "systemctl restart fabric-agent")
        synced: dict[str, str] = {}
        for vm in ("vm1", active):
            synced[vm] = wait_until(functools.partial(_first_sync_line, vmenv, vm), 600,
                                    f"the restarted agent of {vm} to apply its first snapshot", interval=2)  # fmt: skip
        elapsed = time.monotonic() - t0
        time.sleep(3)
    finally:
        sent, lost, _got = _stop_ping(vmenv, "vm1", pid, out)
    print(f"\nagents of vm1 and {active} restarted, both in sync after {elapsed:.0f} s: {sent} echoes, "
          f"{len(lost)} lost; " + "; ".join(f"{vm}: {line}" for vm, line in synced.items()))
    assert sent > 20
    assert lost == [], f"lost sequence numbers {lost}"


def test_gateway_failover_keeps_the_other_cluster_reachable(vmenv: runner.VMState) -> None:
    """Cut west's active gateway off the private network (its tap down: a dead machine to the
    others): the standby takes the role and east's pod reaches west's surviving pod again;
    put it back and everything is in sync again."""
    lab = runner.lab_of(vmenv)
    west = _west(vmenv)
    active, standby = west["active_gateway"], west["standby_gateway"]
    assert {active, standby} == {"vm2", "vm3"}, west
    src, dst = _pod(lab, "east/vm1"), _pod(lab, f"west/{standby}")
    out = "/tmp/kf-failover-ping.out"
    pid = _start_ping(vmenv, "vm1", src, _global(lab, "west", dst.ip), out)
    try:
        time.sleep(3)
        runner.set_link(vmenv, active, False)
        t0 = time.monotonic()
        wait_until(lambda: _west(vmenv)["active_gateway"] == standby, 120,
                   "the standby to become west's active gateway", interval=2)  # fmt: skip
        moved = time.monotonic() - t0
        time.sleep(10)
    finally:
        runner.set_link(vmenv, active, True)
        sent, _lost, got = _stop_ping(vmenv, "vm1", pid, out)
    assert got and got[-1] >= sent - 5, f"east's pod does not reach west/{standby} after the failover ({sent} sent)"
    print(f"\nwest's gateway {active} cut: {standby} active after {moved:.1f} s (reflector's view); "
          f"largest gap in a 0.2 s ping {_largest_gap_s(got):.1f} s")  # fmt: skip
    wait_until(lambda: all(n["in_sync"] for n in runner.status(vmenv).get("nodes", [])), 420,
               "every node in sync again after the heal", interval=2)  # fmt: skip
    assert runner.run_check(vmenv, timeout_s=3.0).ok
