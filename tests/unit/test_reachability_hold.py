"""Reachability records are not recomputed during a startup hold, and are put once it ends.

A bring-up starts thousands of sessions while the reflector holds (the record store's hold, and
the node hold of a restarted reflector or a new leader); each start asked for a recompute (up
to 20 a second, 2.8 ms each at 1,000 nodes) whose result nobody could see. Checked on a real
reflector on 127.0.0.1 with real agent sessions, counting derivations
(``reachability_rules.derive``): none while either hold is on; when the record store's hold
ends, the records are put before the waiting subscriber gets its snapshot (its first snapshot
has every pair); when the node hold ends, the records follow.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from fabric.control import reachability_rules, reflector
from fabric.control.reachability import KIND, PUBLISHER
from tests.unit.test_reachability_reflector import A1, B1, C1, CONFIG, PAIRS, Fabric, run
from tests.waiting import wait_until_async

HOLD = 600.0  # never elapses here: each test ends the hold by what ends it in production


@pytest.fixture
def derivations(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The times of every derivation of the reachability records."""
    seen: list[float] = []
    real = reachability_rules.derive

    def counting(*args: Any, **kw: Any) -> Any:
        seen.append(asyncio.get_running_loop().time())
        return real(*args, **kw)

    monkeypatch.setattr(reachability_rules, "derive", counting)
    return seen


def _nodes(refl: reflector.Reflector) -> int:
    return sum(len(c.nodes) for c in refl.status().clusters)


def _held(refl: reflector.Reflector) -> set[str]:
    return {r.name for r in refl.records.records(KIND, PUBLISHER)}


def test_no_recompute_during_the_record_hold_and_the_first_snapshot_has_every_pair(derivations: list[float]) -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=0.3, keepalive_interval=0.1, startup_hold=0,
                                   records_startup_hold=HOLD)  # fmt: skip
        (target,) = await refl.start(["127.0.0.1:0"])
        f = Fabric(refl, target)
        try:
            assert refl.records.holding
            for ann in (A1, B1, C1):
                f.agent(ann)
            await wait_until_async(lambda: _nodes(refl) == 3, 10, "three agents announced")
            assert derivations == [] and not _held(refl), "recomputed during the record store's hold"
            assert not f.watch.synced
            refl.records.release()  # what the hold's timer does
            assert len(derivations) == 1 and len(_held(refl)) == len(PAIRS)
            await wait_until_async(lambda: f.changes, 5, "the subscriber's snapshot")
            first = f.changes[0]
            assert first.resynced and len(first.upserts) == len(PAIRS), first
        finally:
            await f.close()
            await refl.stop(0)

    run(body())


def test_no_recompute_during_the_node_hold_and_records_once_it_ends(derivations: list[float]) -> None:
    async def body() -> None:
        config = dataclasses.replace(CONFIG, expected_nodes=tuple(str(a.key) for a in (A1, B1, C1)))
        refl = reflector.Reflector(config, grace_period=0.3, keepalive_interval=0.1, startup_hold=HOLD,
                                   records_startup_hold=0)  # fmt: skip
        (target,) = await refl.start(["127.0.0.1:0"])
        f = Fabric(refl, target)
        try:
            assert refl.holding
            f.agent(A1)
            f.agent(B1)
            await wait_until_async(lambda: _nodes(refl) == 2, 10, "two of the three expected nodes announced")
            await asyncio.sleep(0)  # a recompute asked for would run on this turn
            assert refl.holding and refl._reach_handle is None
            assert derivations == [] and not _held(refl), "recomputed during the node hold"
            f.agent(C1)  # the last expected node: the hold ends
            await wait_until_async(lambda: len(_held(refl)) == len(PAIRS), 10, "the records after the hold")
            assert not refl.holding and derivations
        finally:
            await f.close()
            await refl.stop(0)

    run(body())
