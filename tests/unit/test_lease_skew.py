"""The reflector replicas' leader Lease under skewed clocks (issue 21 §6), on simulated time.

Two or three :class:`~fabric.control.k8s_source.KubernetesSource` replicas run their real
``_lease_loop`` against one in-memory Lease with the API server's optimistic concurrency. Time
is simulated: an event loop whose clock only moves when nothing is ready (so a 15 s Lease plays
out in milliseconds and every instant is exact), each replica with a wall clock 30 s ahead of or
behind the others (it writes ``renewTime`` from it) and a monotonic clock of its own offset. A
replica's link to the API server applies a request when it is sent and answers after a latency;
cutting the link makes requests hang (``hang``: never applied, never answered), or (``mute``)
applies the first request after the cut without answering it and hangs the rest: the worst
case for the holder, whose renewal lands while it cannot know.

Checked, from the instants each replica's sink was told to lead or stand by:

- never two leaders at any instant, with the skews either way round;
- while the holder renews, the Lease never changes hands, whatever the skew;
- once the holder's link is cut, another replica leads no sooner than a lease duration after the
  holder's last renewal (it waits the lease out on its own clock) and no later than a lease
  duration after the first renewal the holder missed (plus the links' latency);
- the holder stuck in a renewal steps down at most one period short of a lease duration after it
  sent its last answered renewal, so before another replica can take over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import selectors
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fabric import types
from fabric.control import api as fapi
from fabric.control import k8s_source as ks
from fabric.lease import ObservedLease

DURATION = 15  # the default Lease duration (s)
PERIOD = DURATION / 3  # the replicas' renewal period
EPOCH = 1_800_000_000.0  # the wall clocks' reading at simulated time 0 (before skew)


class World:
    """Simulated time, shared by the loop and every replica's clocks."""

    def __init__(self) -> None:
        self.t = 0.0


class _Selector(selectors.SelectSelector):
    """No I/O happens here: waiting for ``timeout`` just moves simulated time on."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise AssertionError("simulation deadlocked: nothing ready and nothing scheduled")
        self.world.t += max(0.0, timeout)
        return []


class _Loop(asyncio.SelectorEventLoop):
    def __init__(self, world: World) -> None:
        self.world = world
        super().__init__(_Selector(world))

    def time(self) -> float:
        return self.world.t


class Leases:
    """The API server's one Lease: resourceVersion checked on replace (409), 404 when absent."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.obj: dict[str, Any] | None = None
        self.rv = 0
        #: (simulated time, holder) of every write that landed.
        self.writes: list[tuple[float, str]] = []

    def _store(self, body: dict[str, Any]) -> None:
        self.rv += 1
        self.obj = copy.deepcopy(body)
        self.obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        self.writes.append((self.world.t, str(body["spec"].get("holderIdentity") or "")))

    def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        if self.obj is None:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.obj)

    def create_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, body: dict[str, Any],
                                        **kw: Any) -> dict[str, Any]:  # fmt: skip
        if self.obj is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        self._store(body)
        return copy.deepcopy(body)

    def replace_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, name: str,
                                         body: dict[str, Any], **kw: Any) -> dict[str, Any]:  # fmt: skip
        assert self.obj is not None
        if (body.get("metadata") or {}).get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        self._store(body)
        return copy.deepcopy(body)


class Link(concurrent.futures.Executor):
    """A replica's Lease thread and its connection: a request is applied when sent and answered
    ``latency`` later; ``cut`` = "hang" (neither) or "mute" (the next one applied, never
    answered; then "hang")."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.cut = ""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self.cut == "hang":
            return fut
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args, **kwargs), None)
        except Exception as e:
            outcome = (None, e)
        if self.cut == "mute":
            self.cut = "hang"
            return fut

        def answer() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # the replica gave up waiting
            if outcome[1] is not None:
                fut.set_exception(outcome[1])
            else:
                fut.set_result(outcome[0])

        asyncio.get_running_loop().call_later(self.latency, answer)
        return fut


class Sink:
    """The reflector as the source drives it: records when it was told to lead or stand by."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.leading = False
        #: (simulated time, leading) at every change.
        self.changes: list[tuple[float, bool]] = []

    def set_config(self, config: types.FabricConfig) -> None:
        pass

    def status(self) -> fapi.FabricStatus:
        raise AssertionError("not used by the Lease loop")

    def set_leader(self, leading: bool, why: str, expected: Sequence[str] | None = None) -> None:
        if leading != self.leading:
            self.leading = leading
            self.changes.append((self.world.t, leading))

    def intervals(self, end: float) -> list[tuple[float, float]]:
        """[start, stop) of every stretch of leading (an open one stops at ``end``)."""
        out, start = [], None
        for t, leading in self.changes:
            if leading:
                start = t
            elif start is not None:
                out.append((start, t))
                start = None
        if start is not None:
            out.append((start, end))
        return out


class Replica:
    def __init__(self, world: World, leases: Leases, identity: str, skew: float, offset: float,
                 latency: float) -> None:  # fmt: skip
        self.identity = identity
        self.link = Link(latency)
        self.sink = Sink(world)
        spec = ks.LeaseSpec("kosmos-system", "refl", identity, duration_s=DURATION)
        self.source = ks.KubernetesSource(None, lease=spec, clock=lambda: EPOCH + world.t + skew,
                                          monotonic=lambda: world.t + offset)  # fmt: skip
        self.source._leaser.shutdown()
        self.source._writer.shutdown()
        self.source._leaser = self.link  # type: ignore[assignment]
        self.source._objects_api = leases
        self.source._sink = self.sink


def _simulate(world: World, replicas: Sequence[Replica], script: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        tasks = [asyncio.create_task(r.source._lease_loop()) for r in replicas]
        try:
            await script()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    loop = _Loop(world)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def _assert_one_leader_at_a_time(replicas: Sequence[Replica], end: float) -> None:
    spans = sorted((s, e, r.identity) for r in replicas for s, e in r.sink.intervals(end))
    for (s1, e1, who1), (s2, _e2, who2) in itertools.pairwise(spans):
        assert e1 <= s2, f"{who1} led over [{s1:.3f}, {e1:.3f}) and {who2} from {s2:.3f}: two leaders"


SKEWS = [(30.0, -30.0), (-30.0, 30.0), (30.0, 0.0), (-30.0, 0.0)]


@pytest.mark.parametrize("cut", ["hang", "mute"])
@pytest.mark.parametrize("latency", [0.0, 0.4])
@pytest.mark.parametrize("skews", SKEWS, ids=[f"{a:+g}s,{b:+g}s" for a, b in SKEWS])
def test_skewed_clocks_one_leader_and_takeover_within_the_lease(skews: tuple[float, float], latency: float,
                                                                cut: str) -> None:  # fmt: skip
    world = World()
    leases = Leases(world)
    # Monotonic clocks with nothing in common (boot times days apart), walls 30 s off.
    a = Replica(world, leases, "a", skews[0], 412_345.25, latency)
    b = Replica(world, leases, "b", skews[1], 17.5, latency)
    replicas = (a, b)
    seen: dict[str, Any] = {}

    async def script() -> None:
        await asyncio.sleep(120)  # both alive: the first to ask keeps the Lease
        leaders = [r for r in replicas if r.sink.leading]
        assert len(leaders) == 1, [r.sink.changes for r in replicas]
        holder = leaders[0]
        assert holder.sink.changes == [(holder.sink.changes[0][0], True)], "the Lease changed hands while renewed"
        other = b if holder is a else a
        assert other.sink.changes == [], "the standby led while the holder renewed"
        holder.link.cut = cut
        seen.update(holder=holder, other=other, cut_at=world.t)
        await asyncio.sleep(3 * DURATION)

    _simulate(world, replicas, script)
    end = world.t
    _assert_one_leader_at_a_time(replicas, end)
    holder, other = seen["holder"], seen["other"]
    last_renewal = max(t for t, who in leases.writes if who == holder.identity and t <= seen["cut_at"])
    if cut == "mute":  # the renewal sent after the cut landed too: the standby saw it
        last_renewal = max(t for t, who in leases.writes if who == holder.identity)
    assert other.sink.intervals(end), f"nobody took over in {3 * DURATION} s (the holder: {holder.sink.changes})"
    took_over = other.sink.intervals(end)[0][0]
    assert took_over >= last_renewal + DURATION, "taken over before the holder's renewal could have lapsed"
    first_missed = last_renewal + PERIOD + latency  # when the holder would have renewed next
    assert took_over <= first_missed + DURATION + 2 * latency, (took_over, last_renewal)
    assert not holder.sink.leading and other.sink.leading
    stepped_down = holder.sink.intervals(end)[0][1]
    assert stepped_down < took_over
    assert stepped_down <= last_renewal + DURATION - PERIOD + latency


def test_three_replicas_skewed_hand_over_in_turn_never_two_leaders() -> None:
    """Each holder in turn loses its link (its requests hang): the Lease moves on each time, one
    leader at a time, and each takeover waits the lease out."""
    world = World()
    leases = Leases(world)
    replicas = [Replica(world, leases, n, skew, off, 0.2)
                for n, skew, off in (("a", 30.0, 5.0), ("b", -30.0, 9e5), ("c", 0.0, 321.0))]  # fmt: skip
    holders: list[str] = []

    async def script() -> None:
        await asyncio.sleep(30)
        for _ in range(2):
            (holder,) = [r for r in replicas if r.sink.leading]
            holders.append(holder.identity)
            holder.link.cut = "hang"
            await asyncio.sleep(DURATION + 2 * PERIOD + 1)
        (holder,) = [r for r in replicas if r.sink.leading]
        holders.append(holder.identity)

    _simulate(world, replicas, script)
    _assert_one_leader_at_a_time(replicas, world.t)
    assert len(set(holders)) == 3, holders


def test_observed_lease_counts_from_the_change_it_saw() -> None:
    seen = ObservedLease()
    held = {"holderIdentity": "a", "leaseDurationSeconds": 10, "renewTime": "1999-01-01T00:00:00.000000Z"}
    assert seen.observe(held, 100.0) and seen.held_by_other("b", 100.0, 15)
    assert not seen.observe(dict(held), 105.0)  # unchanged: still counted from 100
    assert seen.held_by_other("b", 109.9, 15) and not seen.held_by_other("b", 110.0, 15)
    assert not seen.held_by_other("a", 101.0, 15)  # ours
    assert seen.observe({**held, "renewTime": "1970-01-01T00:00:00.000000Z"}, 109.0)  # a renewal (any time)
    assert seen.held_by_other("b", 118.9, 15) and seen.expires(15) == 119.0
    assert seen.observe({**held, "holderIdentity": ""}, 120.0) and not seen.held_by_other("b", 120.0, 15)
    assert seen.observe({"holderIdentity": "c"}, 200.0) and seen.expires(15) == 215.0  # no duration: ours
