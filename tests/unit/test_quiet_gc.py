"""Full collections of the cyclic garbage collector at the reflector's quiet moments
(fabric/control/quiet_gc.py; "Garbage collection" in fabric/control/reflector.py).

The cause these guard against (measured with ``bench control`` at gateway N = 1,000): on the
interpreter's own schedule a full collection (130-140 ms of CPU there) started inside a flush
about every tenth change and delayed that change's whole fan-out. Here the interpreter is made
to want full collections all the time (tiny thresholds); with the reflector's policy installed
none may start while a flush runs or a fan-out is in flight, and a due one runs once the last
agent applied.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from fabric import types
from fabric.control import quiet_gc, reflector
from tests.unit.test_incremental_reflector import CONFIG, Driver, _node


@pytest.fixture
def gc_state() -> Iterator[list[int]]:
    """The collector as it was, restored after the test; yields the generations of the full
    collections started meanwhile (a gc callback records them)."""
    saved = gc.get_threshold()
    started: list[int] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            started.append(2)

    gc.callbacks.append(on_gc)
    try:
        yield started
    finally:
        gc.callbacks.remove(on_gc)
        gc.unfreeze()
        gc.set_threshold(*saved)


def _wanting_full_collections() -> None:
    """Make the interpreter want a full collection at almost every allocation burst: tiny
    thresholds, and the test process's objects frozen (so the oldest generation is nearly empty
    and a few promoted objects are more than a quarter of it, CPython's second condition)."""
    gc.collect()
    gc.freeze()
    gc.collect()
    gc.set_threshold(50, 1, 1)


class _Blocks:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self) -> int:
        return self.n


def test_a_full_collection_runs_only_when_due_and_quiet_or_after_waiting_too_long() -> None:
    blocks, now, runs = _Blocks(1000), [0.0], []
    c = quiet_gc.QuietCollector(0.25, 10.0, blocks=blocks, collect=lambda: runs.append(now[0]), clock=lambda: now[0])
    assert not c.poll(quiet=True) and runs == []  # nothing grew: nothing due
    blocks.n = 1250
    assert not c.due()  # exactly a quarter more: not yet
    blocks.n = 1300
    assert c.due()
    assert not c.poll(quiet=False)  # due, but a change is in flight
    now[0] = 9.9
    assert not c.poll(quiet=False)
    assert c.poll(quiet=True) and runs == [9.9] and c.forced == 0
    assert c.base == 1300 and not c.due()  # measured again from what is left after it
    blocks.n = 2000
    assert not c.poll(quiet=False)  # due from now (t = 9.9)
    now[0] = 20.0
    assert c.poll(quiet=False) and c.forced == 1, "a storm without a quiet moment must still collect"
    assert c.collections == 2 and c.due_since is None
    blocks.n = 1000  # memory freed (nodes gone): growth counts from here, not from 2000
    assert not c.poll(quiet=True) and c.base == 1000
    blocks.n = 1300
    assert c.poll(quiet=True) and c.collections == 3


def test_a_full_collection_waits_pace_times_the_last_ones_duration_quiet_or_not() -> None:
    """Memory that keeps growing (a bring-up) makes a collection due again at once; after one of
    d seconds the next waits until pace * d later, even when quiet, and then for the first quiet
    moment as usual: its wait for one (max_defer_s) counts from when pacing allowed it."""
    blocks, now, runs = _Blocks(1000), [0.0], []

    def collect() -> None:  # a full collection of 0.5 s
        runs.append(now[0])
        now[0] += 0.5

    c = quiet_gc.QuietCollector(0.25, 1.0, pace=19.0, blocks=blocks, collect=collect, clock=lambda: now[0])
    blocks.n = 1300
    assert c.poll(quiet=True) and runs == [0.0]
    assert c.not_before == 0.5 + 19.0 * 0.5
    blocks.n = 2000  # due again at once (t = 0.5)
    for t in (0.5, 3.0, 9.9):
        now[0] = t
        assert not c.poll(quiet=True), f"at t = {t}: paced, the last one took 0.5 s at t = 0"
    assert c.due_since == 0.5
    now[0] = 10.0
    assert not c.poll(quiet=False), "due for 9.5 s, but allowed only now: it waits for a quiet moment"
    now[0] = 10.9
    assert c.poll(quiet=True) and runs == [0.0, 10.9] and c.forced == 0
    blocks.n = 4000
    now[0] = 11.5
    assert not c.poll(quiet=True) and c.due_since == 11.5  # due again, paced until 10.9 + 0.5 + 9.5
    now[0] = 21.0
    assert not c.poll(quiet=False), "due for 9.5 s but allowed for 0.1 s: not forced into a change in flight"
    now[0] = 21.9
    assert c.poll(quiet=False) and c.forced == 1, "max_defer_s after pacing allowed it: quiet or not"
    unpaced = quiet_gc.QuietCollector(0.25, 10.0, pace=0.0, blocks=blocks, collect=collect, clock=lambda: now[0])
    blocks.n = 6000
    assert unpaced.poll(quiet=True) and unpaced.not_before == now[0]
    blocks.n = 9000
    assert unpaced.poll(quiet=True), "pace 0: CPython's rule alone"
    with pytest.raises(ValueError, match="pace"):
        quiet_gc.QuietCollector(pace=-1.0)


def test_installed_the_interpreter_starts_no_full_collection_and_uninstall_restores_it(
    gc_state: list[int],
) -> None:
    _wanting_full_collections()

    def churn() -> None:
        keep = [[i] for i in range(5_000)]  # survivors: promoted, as a fan-out's writes in flight
        del keep

    churn()
    assert gc_state, "setup: with these thresholds the interpreter runs full collections"
    c = quiet_gc.QuietCollector()
    c.install()
    try:
        assert gc.get_threshold()[:2] == (50, 1)  # young collections unchanged
        gc_state.clear()
        churn()
        assert gc_state == []
    finally:
        c.uninstall()
    assert gc.get_threshold() == (50, 1, 1)
    churn()
    assert gc_state


def test_no_full_collection_inside_a_flush_or_fan_out_and_a_due_one_runs_once_all_applied(
    gc_state: list[int],
) -> None:
    """The cause of the join fan-out p99 at N = 1,000: a full collection inside the flush of a
    change. On the interpreter's schedule (no policy) this setup starts several in the flush."""
    blocks = _Blocks(1)  # the policy's own view: due whenever the test says so
    policy = quiet_gc.QuietCollector(blocks=blocks)

    async def body(with_policy: bool) -> tuple[int, int]:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=0.002,
                                   gc_policy=policy if with_policy else None)  # fmt: skip
        refl._loop = asyncio.get_running_loop()
        d = Driver(refl)
        agents = [d.announce(_node(c, i)) for c in ("east", "west") for i in range(1, 40)]
        await d.settle()
        for a in agents:
            a.drain()
            refl._on_applied(a.session, a.version)
        assert not refl._fanout and refl._quiet()
        _wanting_full_collections()
        blocks.n = 1
        if with_policy:
            policy.install()  # measures growth from here
        try:
            blocks.n = 10  # a full collection is due
            gc_state.clear()
            joiner = d.announce(_node("east", 50))
            assert not refl._quiet()
            await asyncio.sleep(0)  # the join's flush (at once: after a quiet period)
            await asyncio.sleep(0)
            in_flush = len(gc_state)
            assert refl._fanout, "the join is fanned out to the synced agents"
            refl._gc_poll()  # the ticker's question while agents have not applied yet
            in_flight = len(gc_state) + policy.collections
            for a in agents:
                a.drain()
                refl._on_applied(a.session, a.version)
            joiner.drain()
            assert not refl._fanout
            await asyncio.sleep(0)  # the poll the last Applied asked for
            return in_flush, in_flight, list(gc_state)
        finally:
            policy.uninstall()
            await refl.stop(0)

    in_flush, _, _ = asyncio.run(asyncio.wait_for(body(False), 30))
    assert in_flush > 0, "setup: on the interpreter's schedule the flush starts full collections"
    gc.unfreeze()
    in_flush, in_flight, started = asyncio.run(asyncio.wait_for(body(True), 30))
    assert in_flush == 0, "a full collection started inside the flush of a change"
    assert in_flight == 0, "a full collection ran while the change's fan-out was in flight"
    assert policy.collections == 1 and policy.forced == 0, "the due collection runs once all agents applied"
    assert started == [2]


def test_the_reflector_asks_its_policy_every_poll_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reflector, "GC_POLL_S", 0.01)
    asked: list[bool] = []

    class Policy(quiet_gc.QuietCollector):
        def poll(self, quiet: bool) -> bool:
            asked.append(quiet)
            return False

    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, gc_policy=Policy())
        await refl.start(["127.0.0.1:0"])
        await asyncio.sleep(0.1)
        await refl.stop(0)
        n = len(asked)
        await asyncio.sleep(0.05)
        assert len(asked) == n, "the ticker outlived stop()"

    asyncio.run(asyncio.wait_for(body(), 10))
    assert len(asked) >= 3 and all(asked)  # nothing announced: quiet


def test_quiet_means_nothing_pending_in_flight_or_waiting() -> None:
    refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0)
    assert refl._quiet()
    refl._awaiting.add(types.NodeKey("east", "e1"))
    assert not refl._quiet()
    refl._awaiting.clear()
    refl._fanout[1] = (0.0, {types.NodeKey("east", "e1")})
    assert not refl._quiet()


@pytest.mark.parametrize("flag", [None, "quiet", "interpreter"])
def test_fabric_reflector_installs_the_policy_while_it_serves_and_restores_the_collector(
    monkeypatch: pytest.MonkeyPatch, flag: str | None
) -> None:
    from fabric.control import reflector_cli
    from tests.unit.test_reflector_bugs import EXAMPLES

    before = gc.get_threshold()
    seen: list[tuple[tuple[int, int, int], quiet_gc.QuietCollector | None]] = []

    async def serve(refl: reflector.Reflector, listen: object, credentials: object = None) -> None:
        seen.append((gc.get_threshold(), refl.gc_policy))

    monkeypatch.setattr(reflector_cli, "serve_until_stopped", serve)
    argv = ["--config", str(EXAMPLES / "lab.yaml"), "--listen", "127.0.0.1:0", "--insecure"]
    assert reflector_cli.main(argv + ([] if flag is None else ["--gc", flag])) == 0
    ((thresholds, policy),) = seen
    if flag == "interpreter":
        assert policy is None and thresholds == before
    else:  # the default
        assert policy is not None and thresholds[:2] == before[:2] and thresholds[2] > 1_000_000
    assert gc.get_threshold() == before, "fabric-reflector left this process's collector changed"


def test_the_reflector_counts_its_full_collections_in_its_metrics() -> None:
    from prometheus_client import CollectorRegistry

    blocks, now = _Blocks(100), [0.0]
    policy = quiet_gc.QuietCollector(blocks=blocks, collect=lambda: None, clock=lambda: now[0])
    refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, gc_policy=policy)
    reg = CollectorRegistry()
    reg.register(refl.collector())
    blocks.n = 200
    assert policy.poll(quiet=True)
    blocks.n = 400
    assert not policy.poll(quiet=False)
    now[0] = 60.0
    assert policy.poll(quiet=False)
    assert reg.get_sample_value("fabric_reflector_gc_full_collections_total", {"when": "quiet"}) == 1
    assert reg.get_sample_value("fabric_reflector_gc_full_collections_total", {"when": "waited"}) == 1
    assert reg.get_sample_value("fabric_reflector_gc_full_collection_seconds_total") == policy.seconds
    plain = CollectorRegistry()
    plain.register(reflector.Reflector(CONFIG, grace_period=100, startup_hold=0).collector())
    assert plain.get_sample_value("fabric_reflector_gc_full_collections_total", {"when": "quiet"}) is None
