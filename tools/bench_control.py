"""Control-plane benchmark: topology change -> the last of N simulated agents reporting it applied.

Processes (all on this machine, talking over unix sockets in a private temporary directory; no
namespaces, no kernel objects, so no root needed)::

    driver (this module's run())
      |-- fabric-reflector  (python -m fabric.control.reflector; --grace-period 0 so a leave is
      |                      immediate, --startup-hold 0, keepalives every 30 s)
      |-- W worker processes (python -m tools.bench_control worker): N light agents in total,
      |                      each its own channel (own connection) and SyncNode stream
      '-- 1 joiner process   (the same worker code with one agent that joins/leaves on command)

A **light agent** speaks the real SyncNode protocol with the generated stubs: Announce, a
Keepalive, then it validates every message it receives (each entry decoded by
``fabric.control.codec``; chunks only before END_OF_SNAPSHOT; deltas only after it, with
increasing versions; every removal must name an entry it holds) and answers every END_OF_SNAPSHOT
and Delta with ``Applied(version)``, stamping ``time.monotonic()`` (one clock for every process
of the machine) as it sends it. Workers aggregate per version and report to the driver on stdout
(JSON lines) when all their agents applied it.

One **change** = the joiner announces a new node (every agent's plan gains a peer, and the other
cluster's agents a route), then leaves again (the reflector withdraws it at once: a second change).
Fan-out time = the last agent's Applied stamp - the moment the joiner opened its stream (join) or
cancelled it (leave). Reflector CPU per change comes from /proc/PID/stat around each change,
memory per agent from VmRSS before the agents and after they all synced.

**Baseline**, same run and same client code: a bare grpc.aio server (``bare-server`` below) that
answers each stream's Announce with END_OF_SNAPSHOT and, on a trigger RPC, writes the same
serialized Delta bytes a join produces to all N streams (no planning, no per-node diff or
encoding). Ratios: baseline / ours for times, CPU and memory (higher is better, 1.0 = as cheap as
pushing bytes).

Feasibility is measured, not assumed: the agents of one N must all be synced within ``--budget``
seconds; if not, that N is reported as not feasible with how far the bring-up got, and larger N
are not attempted (bring-up cost only grows with N).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import queue
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tools import bench_common as bc

_log = logging.getLogger(__name__)
NAME = "control"
HELP = ("time from a node join/leave to the last of N simulated agents reporting it applied, reflector CPU and "
        "memory per agent, vs a bare grpc.aio server pushing the same bytes")  # fmt: skip

KEEPALIVE_S = 30.0
BARE_STREAM = "/kft.bench.Bare/Stream"
BARE_BROADCAST = "/kft.bench.Bare/Broadcast"


def agent_channel_options() -> list[tuple[str, Any]]:
    """What real agents use (fabric.control.client), plus a connection of its own per agent (no
    shared subchannel), as agents on separate nodes have."""
    from fabric.control import client

    return [*client.CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


CHANGE_TIMEOUT_S = 300.0


def requires(opts: bc.Options) -> list[str]:
    return bc.need_control_stubs()


# -- who the agents are ----------------------------------------------------------------------


def announcement(i: int) -> Any:
    """Simulated node ``i``: clusters a/b alternate, unique underlay address and /24 pod CIDR."""
    from fabric import types

    cluster = "a" if i % 2 == 0 else "b"
    base = int(ipaddress.ip_address("10.0.0.0" if cluster == "a" else "10.128.0.0"))
    cidr = f"{ipaddress.ip_address(base + (i // 2) * 256)}/24"
    underlay = str(ipaddress.ip_address(int(ipaddress.ip_address("198.18.0.10")) + i))
    return types.NodeAnnouncement(cluster, f"n{i}", underlay, (cidr,))


#: The joiner's index: above any N this benchmark runs; even, so it joins cluster a.
JOINER = 60_000


def config_doc() -> dict[str, Any]:
    return {
        "clusters": [
            {"name": "a", "mode": "p2p", "podCIDRs": ["10.0.0.0/9"]},
            {"name": "b", "mode": "p2p", "podCIDRs": ["10.128.0.0/9"]},
        ]
    }


def join_delta_bytes(version: int) -> bytes:
    """The Delta an agent of cluster b receives when the joiner joins (its peer and route)."""
    from fabric import types
    from fabric.control import codec, planner

    ann = announcement(JOINER)
    via = planner.overlay_address(ann.underlay_ip, types.DEFAULT_BRIDGE_CIDR_V4).partition("/")[0]
    peer = types.Peer(types.VX_BRIDGE, via, planner.device_mac(ann.key, types.VX_BRIDGE), ann.underlay_ip, str(ann.key))
    route = types.RouteEntry(ann.pod_cidrs[0], via, types.VX_BRIDGE)
    msg = codec.delta_message(types.StateDelta(upserts=(peer, route)), version)
    return bytes(msg.SerializeToString())


# -- the worker: light agents ----------------------------------------------------------------


class AgentError(Exception):
    """A simulated agent saw something the protocol forbids (or its stream failed)."""


class NotAdmitted(AgentError):
    """The stream failed before the snapshot arrived: like the real AgentSession, retry later.

    Seen when the reflector's event loop is too busy to pick up new streams: gRPC core cancels
    an RPC the application has not accepted within 30 s (server_max_unrequested_time_in_server).
    """


class _Worker:
    """N light agents in one asyncio process, reporting to the driver through stdout."""

    def __init__(self, target: str, mode: str, first: int, count: int) -> None:
        from fabric.control.generated import fabric_pb2 as pb

        self.pb = pb
        self.target = target
        self.mode = mode
        self.indexes = list(range(first, first + count))
        self.count = count
        self.ready = 0
        self.applied: dict[int, list[float]] = {}  # version -> [agents, last stamp]
        self.outboxes: list[asyncio.Queue[Any]] = []
        self.calls: dict[int, Any] = {}
        self.channels: list[Any] = []
        #: Version of the last END_OF_SNAPSHOT any agent of this worker received (the joiner's).
        self.last_eos = -1
        #: Agents whose stream we cancel on purpose (the joiner leaving).
        self.leaving: set[int] = set()
        #: Streams that failed before their snapshot and were retried.
        self.retries = 0

    def emit(self, **ev: Any) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    def _stream(self, channel: Any, requests: AsyncIterator[Any]) -> Any:
        pb = self.pb
        if self.mode == "bare":
            method = channel.stream_stream(
                BARE_STREAM,
                request_serializer=pb.SyncNodeRequest.SerializeToString,
                response_deserializer=pb.SyncNodeResponse.FromString,
            )
            return method(requests)
        from fabric.control.generated import fabric_pb2_grpc as pb_grpc

        return pb_grpc.FabricStub(channel).SyncNode(requests)

    async def agent(self, i: int, channel: Any, on_ready: asyncio.Future[float] | None = None) -> None:
        """One agent's session until the stream ends; raises AgentError on any violation."""
        import grpc

        from fabric import types
        from fabric.control import codec

        pb = self.pb
        ann = announcement(i)
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.outboxes.append(outbox)

        async def requests() -> AsyncIterator[Any]:
            yield pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(ann)))
            yield pb.SyncNodeRequest(keepalive=codec.keepalive_message(KEEPALIVE_S))
            while True:
                msg = await outbox.get()
                if msg is None:
                    return
                yield msg

        call = self._stream(channel, requests())
        self.calls[i] = call
        state: dict[str, Any] | None = {}
        held: dict[str, Any] = {}
        version = -1
        try:
            async for msg in call:
                kind = msg.WhichOneof("message")
                if kind == "keepalive":
                    continue
                if kind == "snapshot":
                    if state is None:
                        raise AgentError(f"agent {ann.key}: snapshot chunk after END_OF_SNAPSHOT")
                    for e in msg.snapshot.entries:
                        entry = codec.entry_from_pb(e)
                        state[types.entry_key(entry)] = entry
                elif kind == "end_of_snapshot":
                    if state is None:
                        raise AgentError(f"agent {ann.key}: second END_OF_SNAPSHOT")
                    held, state = state, None
                    version = msg.end_of_snapshot.version
                    self.last_eos = version
                    outbox.put_nowait(pb.SyncNodeRequest(applied=pb.Applied(version=version)))
                    if on_ready is not None and not on_ready.done():
                        on_ready.set_result(time.monotonic())
                    self.ready += 1
                    if self.ready == self.count and on_ready is None:
                        self.emit(ev="ready", n=self.count, retries=self.retries)
                elif kind == "delta":
                    if state is not None:
                        raise AgentError(f"agent {ann.key}: delta before END_OF_SNAPSHOT")
                    d = msg.delta
                    if d.version <= version:
                        raise AgentError(f"agent {ann.key}: delta version {d.version} after version {version}")
                    delta = codec.delta_from_pb(d)
                    for k in delta.removals:
                        if held.pop(k, None) is None:
                            raise AgentError(f"agent {ann.key}: delta {d.version} removes {k!r}, which it never had")
                    for entry in delta.upserts:
                        held[types.entry_key(entry)] = entry
                    version = d.version
                    outbox.put_nowait(pb.SyncNodeRequest(applied=pb.Applied(version=version)))
                    self._applied(version, time.monotonic())
                elif kind == "rejected":
                    raise AgentError(f"agent {ann.key} rejected: {msg.rejected.reason}")
                else:
                    raise AgentError(f"agent {ann.key}: unknown message {kind!r}")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and i in self.leaving:
                return
            if state is not None:
                raise NotAdmitted(f"agent {ann.key}: {e.code().name}: {e.details()}") from e
            raise AgentError(f"agent {ann.key}: stream failed: {e.code().name}: {e.details()}") from e
        finally:
            self.calls.pop(i, None)

    async def agent_with_retries(self, i: int, channel: Any) -> None:
        """:meth:`agent`, retried with a jittered exponential backoff (0.2 s .. 5 s) while it was
        not admitted, as fabric.control.client.AgentSession does."""
        delay = 0.2
        while True:
            try:
                await self.agent(i, channel)
                return
            except NotAdmitted:
                self.retries += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(5.0, delay * 2)

    def _applied(self, version: int, stamp: float) -> None:
        slot = self.applied.setdefault(version, [0, 0.0])
        slot[0] += 1
        slot[1] = max(slot[1], stamp)
        if slot[0] == self.count:
            self.emit(ev="applied", v=version, n=self.count, t=slot[1])
            del self.applied[version]

    async def keepalives(self) -> None:
        from fabric.control import codec

        while True:
            await asyncio.sleep(KEEPALIVE_S)
            for q in self.outboxes:
                q.put_nowait(self.pb.SyncNodeRequest(keepalive=codec.keepalive_message(KEEPALIVE_S)))

    async def progress(self) -> None:
        while self.ready < self.count:
            await asyncio.sleep(2.0)
            self.emit(ev="progress", ready=self.ready, retries=self.retries)

    async def run_agents(self) -> None:
        import grpc

        agents: dict[asyncio.Task[None], int] = {}
        for i in self.indexes:
            channel = grpc.aio.insecure_channel(self.target, options=agent_channel_options())
            self.channels.append(channel)
            agents[asyncio.create_task(self.agent_with_retries(i, channel))] = i
        helpers = [asyncio.create_task(self.keepalives()), asyncio.create_task(self.progress())]
        commands = asyncio.create_task(_read_commands())
        try:
            done, _ = await asyncio.wait([*agents, commands], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is commands:
                    continue
                t.result()  # raises the agent's AgentError
                raise AgentError(f"agent {announcement(agents[t]).key}: the server ended its stream")
        finally:
            for t in [*agents, *helpers, commands]:
                t.cancel()
            for ch in self.channels:
                await ch.close(grace=None)

    async def run_joiner(self) -> None:
        """One agent that joins on ``join`` and leaves on ``leave`` (stdin commands)."""
        import grpc

        i = self.indexes[0]
        channel = grpc.aio.insecure_channel(self.target, options=agent_channel_options())
        await channel.channel_ready()
        task: asyncio.Task[None] | None = None
        lines = _stdin_lines()
        try:
            async for line in lines:
                if line == "join":
                    self.leaving.discard(i)
                    ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                    self.outboxes.clear()
                    t0 = time.monotonic()
                    task = asyncio.create_task(self.agent(i, channel, ready))
                    await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
                    if not ready.done():
                        task.result()  # raises the agent's error
                        raise AgentError("the joining agent's stream ended before END_OF_SNAPSHOT")
                    self.emit(ev="joined", t0=t0, v=self.last_eos)
                elif line == "leave":
                    self.leaving.add(i)
                    t0 = time.monotonic()
                    call = self.calls.get(i)
                    if call is not None:
                        call.cancel()
                    if task is not None:
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    self.emit(ev="left", t0=t0)
                elif line == "quit":
                    return
        finally:
            if task is not None:
                task.cancel()
            await channel.close(grace=None)


async def _stdin_lines() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        raw = await reader.readline()
        if not raw:
            return
        yield raw.decode().strip()


async def _read_commands() -> None:
    """Returns when the driver says ``quit`` or closes our stdin."""
    async for line in _stdin_lines():
        if line == "quit":
            return


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def worker_main(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    w = _Worker(args.target, args.mode, args.first, args.count)
    try:
        asyncio.run(w.run_joiner() if args.joiner else w.run_agents())
    except AgentError as e:
        w.emit(ev="error", msg=str(e))
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# -- the baseline server ---------------------------------------------------------------------


async def _bare_serve(listen: str) -> None:
    """A bare grpc.aio server: EOS to every stream's first message, bytes broadcast on demand."""
    import grpc

    from fabric.control.generated import fabric_pb2 as pb

    eos = pb.SyncNodeResponse(end_of_snapshot=pb.EndOfSnapshot(version=0, epoch="bare")).SerializeToString()
    streams: set[asyncio.Queue[bytes | None]] = set()

    async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        first = await anext(requests)
        if not first:
            return
        streams.add(q)

        async def drain() -> None:
            async for _ in requests:  # Keepalive and Applied: read and dropped, as bytes
                pass

        reader = asyncio.create_task(drain())
        try:
            yield eos
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item
        finally:
            reader.cancel()
            streams.discard(q)

    async def broadcast(payload: bytes, context: Any) -> bytes:
        for q in streams:
            q.put_nowait(payload)
        return str(len(streams)).encode()

    handler = grpc.method_handlers_generic_handler(
        "kft.bench.Bare",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
            "Broadcast": grpc.unary_unary_rpc_method_handler(broadcast),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(listen)
    await server.start()
    print(json.dumps({"ev": "listening"}), flush=True)
    await _read_commands()
    await server.stop(0.5)


def bare_server_main(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_bare_serve(args.listen))
    return 0


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
    """One server kind at one N: bring-up, memory, and per change times and CPU."""

    bringup_s: float = 0.0
    #: Agent streams cancelled before admission during bring-up and retried.
    retries: int = 0
    rss_per_agent_kib: float = 0.0
    join_ms: list[list[float]] = dataclasses.field(default_factory=list)  # per round
    leave_ms: list[list[float]] = dataclasses.field(default_factory=list)
    cpu_ms: list[float] = dataclasses.field(default_factory=list)  # per change, averaged per round


class _Run:
    """One phase: a server (reflector or bare), workers, optionally the joiner."""

    def __init__(self, procs: bc.Procs, mode: str, n: int, tmp: Path, budget_s: float) -> None:
        self.procs, self.mode, self.n, self.tmp, self.budget_s = procs, mode, n, tmp, budget_s
        self.events = _Events()
        self.sock = f"unix:{tmp}/{mode}.sock"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.counts: dict[str, int] = {}
        self.retries = 0
        self.pending: dict[int, dict[str, Any]] = {}  # version -> {"n": agents, "t": last stamp}
        self.server: subprocess.Popen[bytes] | None = None
        self.joiner: subprocess.Popen[bytes] | None = None
        self.log = open(tmp / "reflector.log", "wb")  # noqa: SIM115 - closed by stop()

    def _py(self, *args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
        return self.procs.spawn(None, [sys.executable, "-m", *args], stdout=stdout, stdin=subprocess.PIPE,
                                stderr=None)  # fmt: skip

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
            cfg.write_text(yaml.safe_dump(config_doc(), sort_keys=False))
            self.server = self.procs.spawn(None, [
                sys.executable, "-m", "fabric.control.reflector", "--config", str(cfg), "--listen", self.sock,
                "--grace-period", "0", "--startup-hold", "0", "--keepalive-interval", f"{KEEPALIVE_S:g}",
                "--log-level", "info",
            ], stderr=self.log)  # fmt: skip
            from fabric.control import client

            deadline = time.monotonic() + 30
            while True:
                try:
                    client.get_status_sync(self.sock, 1.0)
                    return
                except client.ReflectorUnavailable:
                    if time.monotonic() > deadline or self.server.poll() is not None:
                        raise RuntimeError(f"fabric-reflector did not start{self.log_tail()}") from None
                    time.sleep(0.1)
        self.server = self._py("tools.bench_control", "bare-server", "--listen", self.sock)
        self.events.attach("server", self.server)
        self._wait("listening", time.monotonic() + 30, "server")

    def bring_up(self) -> float:
        workers = 1 if self.n <= 50 else 2 if self.n <= 500 else 4
        t0 = time.monotonic()
        first = 0
        for w in range(workers):
            count = self.n // workers + (1 if w < self.n % workers else 0)
            name = f"worker{w}"
            proc = self._py("tools.bench_control", "worker", "--target", self.sock, "--mode", self.mode,
                            "--first", str(first), "--count", str(count))  # fmt: skip
            self.workers[name] = proc
            self.counts[name] = count
            self.events.attach(name, proc)
            first += count
        deadline = t0 + self.budget_s
        ready: set[str] = set()
        progress: dict[str, int] = {}
        last_report = 0.0
        while len(ready) < len(self.workers):
            item = self.events.next(deadline)
            if item is None:
                got = sum(self.counts[w] if w in ready else progress.get(w, 0) for w in self.workers)
                raise Infeasible(
                    f"bringing up {self.n} agents on the {self.mode} server did not finish within the "
                    f"{self.budget_s:g}s budget: about {got} of {self.n} agents had their snapshot"
                )
            src, ev = item
            self._note(src, ev)
            if ev["ev"] == "ready":
                ready.add(src)
                self.retries += int(ev.get("retries", 0))
            elif ev["ev"] == "progress":
                progress[src] = int(ev["ready"])
                now = time.monotonic()
                if now - last_report > 10:
                    total = sum(progress.values())
                    bc.progress(NAME, f"N={self.n} {self.mode}: {total}/{self.n} agents synced after {now - t0:.0f}s")
                    last_report = now
        return time.monotonic() - t0

    def wait_applied(self, version: int, what: str) -> float:
        deadline = time.monotonic() + CHANGE_TIMEOUT_S
        while self.pending.get(version, {}).get("n", 0) < self.n:
            item = self.events.next(deadline)
            if item is None:
                got = self.pending.get(version, {}).get("n", 0)
                raise Infeasible(f"{what} at N={self.n}: only {got} agents applied version {version} within "
                                 f"{CHANGE_TIMEOUT_S:g}s")  # fmt: skip
            self._note(*item)
        return float(self.pending.pop(version)["t"])

    def send(self, proc: subprocess.Popen[bytes], line: str) -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()

    def stop(self) -> None:
        everyone = [p for p in (*self.workers.values(), self.joiner, self.server) if p is not None]
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
        """Join then leave (two changes); returns (join ms, leave ms)."""
        if self.joiner is None:
            self.joiner = self._py("tools.bench_control", "worker", "--target", self.sock, "--mode", "fabric",
                                   "--first", str(JOINER), "--count", "1", "--joiner")  # fmt: skip
            self.events.attach("joiner", self.joiner)
        self.send(self.joiner, "join")
        ev = self._wait("joined", time.monotonic() + CHANGE_TIMEOUT_S, "joiner")
        version = int(ev["v"])
        join_ms = (self.wait_applied(version, "join") - float(ev["t0"])) * 1000
        self.send(self.joiner, "leave")
        ev = self._wait("left", time.monotonic() + CHANGE_TIMEOUT_S, "joiner")
        leave_ms = (self.wait_applied(version + 1, "leave") - float(ev["t0"])) * 1000
        return join_ms, leave_ms

    def bare_change(self, channel: Any, version: int) -> float:
        """One broadcast of the join's Delta bytes; returns ms to the last Applied."""
        payload = join_delta_bytes(version)
        broadcast = channel.unary_unary(BARE_BROADCAST)
        t0 = time.monotonic()
        broadcast(payload, timeout=CHANGE_TIMEOUT_S)
        return (self.wait_applied(version, "broadcast") - t0) * 1000


def _phase(mode: str, n: int, rounds: int, changes: int, budget_s: float) -> Phase:
    import grpc

    out = Phase()
    with tempfile.TemporaryDirectory(prefix="kft-ctl-") as tmp, bc.procs() as procs:
        run = _Run(procs, mode, n, Path(tmp), budget_s)
        try:
            run.start_server()
            time.sleep(0.3)
            rss0 = _rss_kib(run.server_pid)
            bc.progress(NAME, f"N={n} {mode}: bringing up {n} agents (budget {budget_s:g}s)")
            out.bringup_s = run.bring_up()
            out.retries = run.retries
            time.sleep(1.0)  # let the last Applied/keepalives settle before reading memory
            out.rss_per_agent_kib = (_rss_kib(run.server_pid) - rss0) / n
            bc.progress(NAME, f"N={n} {mode}: {n} agents synced in {out.bringup_s:.1f}s; "
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
                            j = run.bare_change(channel, version)
                        joins.append(j)
                    # CPU per change over the whole round: clock-tick resolution (10 ms) needs many changes.
                    out.cpu_ms.append((run.server_cpu_ms() - cpu0) / (changes * (2 if leaves else 1)))
                    out.join_ms.append(joins)
                    if leaves:
                        out.leave_ms.append(leaves)
        except RuntimeError:
            if mode == "fabric":
                run.log.flush()
                kept = Path(tempfile.gettempdir()) / f"kft-bench-control-{os.getpid()}-n{n}.log"
                shutil.copyfile(run.log.name, kept)
                bc.progress(NAME, f"N={n}: failed; the reflector's log is kept in {kept}")
            raise
        finally:
            run.stop()
    return out


def run(opts: bc.Options) -> bc.Report:
    rounds = opts.repeat
    report = bc.Report()
    infeasible_from: int | None = None
    for n in opts.n:
        if infeasible_from is not None:
            report.notes.append(f"N={n:,}: not attempted, N={infeasible_from:,} already did not complete (bring-up "
                                "only gets slower with N)")  # fmt: skip
            continue
        changes = 2 if opts.tiny else 10 if n <= 300 else 5
        try:
            bare = _phase("bare", n, rounds, changes, opts.budget_s)
            ours = _phase("fabric", n, rounds, changes, opts.budget_s)
        except Infeasible as e:
            report.notes.append(f"N={n:,}: NOT FEASIBLE on this machine: {e}")
            infeasible_from = n
            continue
        except RuntimeError as e:  # a protocol violation or a broken stream: a finding, reported
            first_line = str(e).splitlines()[0]
            report.notes.append(f"N={n:,}: FAILED: {first_line}")
            bc.progress(NAME, f"N={n}: FAILED: {e}")
            infeasible_from = n
            continue
        _figures(report, n, ours, bare, changes)
        for phase, what in ((ours, "fabric-reflector"), (bare, "bare server")):
            if phase.retries:
                report.notes.append(
                    f"N={n:,}: during bring-up, {phase.retries} agent streams to the {what} were cancelled before "
                    "admission (gRPC cancels a stream the server's busy event loop has not accepted within 30 s) and "
                    "were retried with backoff, as real agents do"
                )
    report.notes.append(
        "fanout = ms from the change (joiner opens/cancels its stream; baseline: broadcast RPC) to the last agent "
        "sending Applied; p50/p99 over the changes of a round, then median/min/max over rounds (p99 of fewer than "
        "100 changes is their maximum). Leave figures share the join's baseline (the same bytes). Reflector "
        f"keepalive {KEEPALIVE_S:g}s; every agent has its own connection (unix socket)."
    )
    return report


def _figures(report: bc.Report, n: int, ours: Phase, bare: Phase, changes: int) -> None:
    def per_round(rounds: list[list[float]], p: float) -> list[float]:
        return [bc.percentile(r, p) for r in rounds]

    sfx = f"_n{n}"
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
    report.figures[f"server_cpu_per_agent_per_change{sfx}"] = bc.figure(
        [c * 1000 / n for c in ours.cpu_ms], {"": [c * 1000 / n for c in bare.cpu_ms]}, higher_is_better=False
    )
    report.units[f"server_cpu_per_agent_per_change{sfx}"] = "µs"
    report.figures[f"server_rss_per_agent{sfx}"] = bc.figure(
        [ours.rss_per_agent_kib], {"": [bare.rss_per_agent_kib]}, higher_is_better=False
    )
    report.units[f"server_rss_per_agent{sfx}"] = "KiB"
    report.figures[f"bringup{sfx}"] = bc.figure([ours.bringup_s], {"": [bare.bringup_s]}, higher_is_better=False)
    report.units[f"bringup{sfx}"] = "s"


# -- entry point of the helper processes -----------------------------------------------------


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_control", description="helper processes of bench control")
    sub = p.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker", help="light agents (or the joiner) for the control benchmark")
    w.add_argument("--target", required=True)
    w.add_argument("--mode", choices=("fabric", "bare"), required=True)
    w.add_argument("--first", type=int, required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--joiner", action="store_true")
    s = sub.add_parser("bare-server", help="the baseline: a bare grpc.aio server")
    s.add_argument("--listen", required=True)
    args = p.parse_args(list(argv))
    return worker_main(args) if args.role == "worker" else bare_server_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
