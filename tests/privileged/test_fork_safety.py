"""Issue 13: process creation is fork-safe in a process that has used gRPC.

gRPC registers fork handlers; a ``fork()`` that runs them (a ``preexec_fn``, ``os.fork``,
pyroute2's ``netns=`` helper) can deadlock inside ``fork()`` where no Python timeout reaches, and
the test suite hung that way in ``bench restart``. Each check runs in a child interpreter with a
hard bound, so a regression fails this test instead of hanging the run.

The child counts how often the interpreter's own at-fork hooks run (``os.register_at_fork``):
they run on exactly the forks that execute code before ``exec``, the kind gRPC's handlers ride
on. With the old ``preexec_fn`` spawn every spawn counted one; now none may.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, subprocess, sys, threading, time
from concurrent import futures

import grpc

from fabric import netns as namespaces
from fabric.netlink import rawnl
from fabric.netlink.dataplane import KernelDataplane
from tools import nsutil

ns, threads, per_thread = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

# Use gRPC for real: a server, a channel, a call; then close both (their threads linger).
server = grpc.server(futures.ThreadPoolExecutor(2))
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
    "t", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
    assert ch.unary_unary("/t/Echo")(b"ping", timeout=10) == b"ping"
server.stop(None).wait()

forks = []
os.register_at_fork(before=lambda: forks.append(1))
want = f"net:[{namespaces.inode(ns)}]"
bad, done = [], []

def work():
    for i in range(per_thread):
        p = nsutil.spawn_in_netns(ns, ["readlink", "/proc/self/ns/net"], stdout=subprocess.PIPE)
        out = p.communicate()[0].decode().strip()
        if p.returncode != 0 or out != want:
            bad.append((p.returncode, out))
        if i % 10 == 0:  # netlink sockets inside the namespace, through every path we have
            KernelDataplane(netns=ns).close()
            rawnl.NetlinkSocket(netns=ns).close()
            with namespaces.iproute(ns) as ipr:
                names = [l.get_attr("IFLA_IFNAME") for l in ipr.get_links()]
                if names != ["lo"]:
                    bad.append(("links", names))
        done.append(1)

t0 = time.monotonic()
ts = [threading.Thread(target=work) for _ in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps({"forks": len(forks), "spawned": len(done), "bad": bad[:5],
                  "seconds": round(time.monotonic() - t0, 2)}))
"""


def test_spawning_into_a_namespace_after_grpc_never_runs_fork_handlers(netns: str) -> None:
    threads, per_thread = 4, 50
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, netns, str(threads), str(per_thread)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"spawning hung for 120 s (a fork deadlock?); stderr:\n{e.stderr!r}") from None
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["bad"] == [], "a child ran outside its namespace, or failed"
    assert result["spawned"] == threads * per_thread
    assert result["forks"] == 0, f"{result['forks']} forks ran at-fork handlers (a preexec_fn or os.fork)"


def test_spawn_returns_with_the_child_inside_its_namespace(netns: str) -> None:
    """Callers look the process up by namespace at once (lab down, bench cleanup)."""
    from fabric import netns as namespaces
    from tools import nsutil

    proc = nsutil.spawn_in_netns(netns, ["sleep", "30"])
    try:
        assert nsutil.pid_netns_inode(proc.pid) == namespaces.inode(netns)
        assert nsutil.pid_netns_inode(proc.pid) != nsutil.pid_netns_inode(os.getpid())
        assert nsutil.pids_in_netns([namespaces.inode(netns) or 0]) == [proc.pid]
        # The PID is the program's own (nsenter execs it in place): once nsenter has exec'd, the
        # same PID shows the program's name.
        wait_until(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep", 10,
                   f"pid {proc.pid} to exec sleep")
    finally:
        proc.kill()
        proc.wait()
