"""``python -m tools.bench.control.inproc``: the reflector's state machine bringing up a shape
in-process (no gRPC), to see how its per-join cost grows with N (issue 21 section 1).

What it drives is what a SyncNode stream drives: :meth:`Reflector._admit` per agent, the
reflector's own flushes (scheduled on the running event loop, bounded by ``flush_slice``), its
reachability recomputes; what it stands in for is gRPC: every loop turn it admits up to
``--per-turn`` agents, then drains every session's queue, serializing each message as the
gRPC face would (pre-encoded bytes as they are, protobuf messages with ``SerializeToString``)
and answering ``Applied`` for the version it read, then drops what it read (a harness that held
every queued message skewed memory and GC). Per block of ``--block`` nodes adopted it prints
the wall time of the flushes per node adopted, split into full plans, snapshots and the rest,
and the admission and drain cost per agent: flat rows mean a per-join cost independent of N.
``--profile FILE`` writes a cProfile of the whole bring-up. ``--gc quiet`` (the default, as
``fabric-reflector``'s) installs the reflector's collection policy
(:mod:`fabric.control.quiet_gc`) and polls it as the reflector's tick does; every run reports the
time the collector took (``gc_s``, ``gc_full_s``), which a profile charges to whatever function
allocated when a collection started.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from tools.bench import common as bc
from tools.bench.control import shapes

_log = logging.getLogger(__name__)


class _GcTimer:
    """The cyclic collector's time, from ``gc.callbacks``: in all and in full collections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full_s = 0.0
        self.full = 0
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
            return
        took = time.perf_counter() - self._t
        self.seconds += took
        if info.get("generation") == 2:
            self.full_s += took
            self.full += 1


class _Stats:
    """Cumulative costs (seconds) sampled at block boundaries."""

    def __init__(self) -> None:
        self.flush_s = 0.0
        self.flushes = 0
        self.admit_s = 0.0
        self.drain_s = 0.0
        self.reach_s = 0.0
        self.bytes = 0
        self.rows: list[dict[str, Any]] = []
        self.mark: dict[str, float] = {}


def _snapshot(refl: Any, st: _Stats) -> dict[str, float]:
    p = refl._planner
    return {
        "t": time.perf_counter(),
        "adopted": len(refl.topology.nodes),
        "flush": st.flush_s,
        "flushes": st.flushes,
        "plan": p.full_plan_seconds,
        "union": p.union_seconds,
        "changes": p.changes_seconds,
        "snap": st.snap_s if hasattr(st, "snap_s") else 0.0,
        "admit": st.admit_s,
        "drain": st.drain_s,
        "reach": st.reach_s,
    }


async def bring_up(
    kind: str,
    n: int,
    per_turn: int,
    block: int,
    flush_slice: float,
    until: int | None = None,
    gc_policy: str = "quiet",
) -> dict[str, Any]:
    """Bring up ``n`` agents of shape ``kind`` (or stop once ``until`` are adopted); returns the
    per-block rows and totals."""
    from fabric.control import quiet_gc, reflector
    from fabric.control.generated import fabric_pb2 as pb  # noqa: F401  (the messages' module)

    shape = shapes.Shape(kind, n)
    policy = quiet_gc.QuietCollector() if gc_policy == "quiet" else None
    refl = reflector.Reflector(
        shape.fabric_config(), grace_period=300, startup_hold=0, flush_slice=flush_slice, gc_policy=policy
    )
    timer = _GcTimer()
    gc.callbacks.append(timer)
    if policy is not None:
        policy.install()
    try:
        return await _bring_up(refl, shape, _Stats(), timer, n, per_turn, block, until)
    finally:
        gc.callbacks.remove(timer)
        if policy is not None:
            policy.uninstall()


async def _bring_up(
    refl: Any, shape: shapes.Shape, st: _Stats, timer: _GcTimer, n: int, per_turn: int, block: int,
    until: int | None,
) -> dict[str, Any]:  # fmt: skip
    from fabric.control import reflector

    st.snap_s = 0.0  # type: ignore[attr-defined]

    flush, send_snaps, publish = refl._flush, refl._send_waiting_snapshots, refl._publish_reachability

    def timed_flush() -> None:
        t = time.perf_counter()
        flush()
        st.flush_s += time.perf_counter() - t
        st.flushes += 1

    def timed_snaps(*a: Any, **kw: Any) -> tuple[float, int]:
        t = time.perf_counter()
        r: tuple[float, int] = send_snaps(*a, **kw)
        st.snap_s += time.perf_counter() - t  # type: ignore[attr-defined]
        return r

    def timed_publish() -> None:
        t = time.perf_counter()
        publish()
        st.reach_s += time.perf_counter() - t

    refl._flush = timed_flush  # type: ignore[method-assign]
    refl._send_waiting_snapshots = timed_snaps  # type: ignore[method-assign]
    refl._publish_reachability = timed_publish  # type: ignore[method-assign]

    dirty: dict[int, Any] = {}  # the sessions something was queued to since the last drain

    class Session(reflector._Session):
        def send(self, msg: Any, size: int | None = None, *, bounded: bool = True) -> None:
            dirty[self.id] = self
            super().send(msg, size, bounded=bounded)

    applied: dict[int, int] = {}

    def drain() -> None:
        t = time.perf_counter()
        todo = list(dirty.values())
        dirty.clear()
        for s in todo:
            q = s.queue
            version = 0
            while not q.empty():
                m = q.get_nowait()
                if isinstance(m, reflector._Encoded):
                    st.bytes += len(m.data)
                    if m is s.keepalive_queued:
                        s.keepalive_queued = None
                    m = m.message
                elif isinstance(m, reflector._Close):
                    continue
                else:
                    st.bytes += len(m.SerializeToString())
                kind_ = m.WhichOneof("message")
                if kind_ == "end_of_snapshot":
                    version = m.end_of_snapshot.version
                elif kind_ == "delta":
                    version = m.delta.version
            if version > applied.get(s.id, 0):
                applied[s.id] = version
                refl._on_applied(s, version)
        st.drain_s += time.perf_counter() - t

    async def gc_ticks() -> None:  # the reflector's own tick (Reflector.start, which this skips)
        while True:
            await asyncio.sleep(reflector.GC_POLL_S)
            refl._gc_poll()

    ticker = asyncio.create_task(gc_ticks())
    started = time.perf_counter()
    last = _snapshot(refl, st)
    next_row = block
    i = 0
    while True:
        t = time.perf_counter()
        for _ in range(per_turn):
            if i >= n:
                break
            ann = shape.announcement(i)
            s = Session(ann.key, f"agent-{i}", refl.clock())
            if refl._admit(ann, s) is not None:
                raise RuntimeError(f"agent {i} ({ann.key}) was rejected: {refl._rejections.get(str(ann.key))}")
            i += 1
        st.admit_s += time.perf_counter() - t
        await asyncio.sleep(0)
        drain()
        adopted = len(refl.topology.nodes)
        if adopted >= next_row or (i >= n and adopted >= n):
            now = _snapshot(refl, st)
            d = {k: now[k] - last[k] for k in now}
            nodes = max(1, int(d["adopted"]))
            row = {
                "adopted": adopted,
                "wall_s": round(now["t"] - started, 2),
                "flushes": int(d["flushes"]),
                "flush_ms_per_join": round(d["flush"] / nodes * 1000, 3),
                "plan_ms_per_join": round(d["plan"] / nodes * 1000, 3),
                "union_ms_per_join": round(d["union"] / nodes * 1000, 3),
                "changes_ms_per_join": round(d["changes"] / nodes * 1000, 3),
                "snap_ms_per_join": round(d["snap"] / nodes * 1000, 3),
                "admit_ms_per_join": round(d["admit"] / nodes * 1000, 3),
                "drain_ms_per_join": round(d["drain"] / nodes * 1000, 3),
                "reach_ms_per_join": round(d["reach"] / nodes * 1000, 3),
                "block_ms_per_join": round((now["t"] - last["t"]) / nodes * 1000, 3),
            }
            st.rows.append(row)
            print(json.dumps(row), flush=True)
            last = now
            while next_row <= adopted:
                next_row += block
        if i >= n and adopted >= n and not refl._awaiting and refl._flush_handle is None:
            break
        if until is not None and adopted >= until:
            break
        if i >= n:
            await asyncio.sleep(0.001)
    total = time.perf_counter() - started
    ticker.cancel()
    return {
        "shape": shape.kind,
        "n": n,
        "adopted": len(refl.topology.nodes),
        "per_turn": per_turn,
        "flush_slice": refl.flush_slice,
        "bring_up_s": round(total, 2),
        "ms_per_join": round(total / n * 1000, 3),
        "flushes": st.flushes,
        "flush_s": round(st.flush_s, 2),
        "snapshots_s": round(st.snap_s, 2),  # type: ignore[attr-defined]
        "full_plans_s": round(refl._planner.full_plan_seconds, 2),
        "unions_s": round(refl._planner.union_seconds, 2),
        "changes_s": round(refl._planner.changes_seconds, 2),
        "admit_s": round(st.admit_s, 2),
        "drain_s": round(st.drain_s, 2),
        "reachability_s": round(st.reach_s, 2),
        "gc": "quiet" if refl.gc_policy is not None else "interpreter",
        "gc_s": round(timer.seconds, 2),
        "gc_full_s": round(timer.full_s, 2),
        "gc_full_collections": timer.full,
        "bytes_sent": st.bytes,
        "rows": st.rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench.control.inproc",
        description="The reflector's state machine bringing up N simulated agents in-process (no gRPC): "
        "per-join cost (flushes, full plans, snapshots, admission, draining) per block of nodes adopted.",
    )
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 5000, 10000], help="agents (one run each)")
    ap.add_argument("--shape", default="gateway", choices=bc.CONTROL_SHAPES)
    ap.add_argument("--per-turn", type=int, default=50, help="admissions per event-loop turn (default 50)")
    ap.add_argument("--block", type=int, default=1000, help="print a row per this many nodes adopted")
    ap.add_argument("--flush-slice", type=float, default=0.5, help="the reflector's flush slice (s)")
    ap.add_argument("--until", type=int, help="stop once this many nodes are adopted (profiling a large N)")
    ap.add_argument(
        "--gc",
        choices=("quiet", "interpreter"),
        default="quiet",
        help="the collector policy, as fabric-reflector --gc (default quiet)",
    )
    ap.add_argument("--profile", help="write a cProfile of the (last) run here")
    ap.add_argument("--json", help="write the results (a list, one per N) here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    for n in args.n:
        gc.collect()
        prof = cProfile.Profile() if args.profile else None
        if prof is not None:
            prof.enable()
        res = asyncio.run(bring_up(args.shape, n, args.per_turn, args.block, args.flush_slice, args.until, args.gc))
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)
        summary = {k: v for k, v in res.items() if k != "rows"}
        print(json.dumps(summary), flush=True)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
