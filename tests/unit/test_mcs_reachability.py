"""The fabric's reachability records into mcs: the map the controller's ``unreachable`` hook
reads, and a real in-process reflector whose store holds the records (put there as the
reflector's own publisher puts them) kicking a pass at once: the cut-off cluster's endpoints
turn not ready in the importer long before any resync, and ready again when the record heals."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fabric.control import api, reachability, reflector
from mcs.controller import Controller, Member
from mcs.reachability import Reachability, unreachable_map
from scheduler.kube import Api
from tests.unit.test_control_session import CONFIG
from tests.unit.test_mcs_controller import CLUSTERS, _endpoints, _serve
from tests.unit.test_mcs_controller import members as members
from tests.waiting import wait_until


def _record(source: str, target: str, ok: bool, *, publisher: str = reachability.PUBLISHER,
            data: bytes | None = None, version: int = 1) -> api.Record:
    state = reachability.PairState(source, target, ok, "probes" if ok else "all tunnels down")
    return api.Record(reachability.KIND, reachability.record_name(source, target), version,
                      reachability.encode(state) if data is None else data, publisher)


def test_the_map_holds_the_pairs_reported_unreachable_only() -> None:
    bad: list[str] = []
    got = unreachable_map([
        _record("south", "east", False), _record("south", "west", True), _record("west", "east", False),
        _record("east", "east", False),  # a cluster always reaches itself
        _record("north", "east", False, publisher="admin/someone"),  # not the fabric's word
        _record("north", "west", False, data=b"{not json"),
    ], lambda r, why: bad.append(why))
    assert got == {"south": frozenset({"east"}), "west": frozenset({"east"})}
    assert len(bad) == 1 and "'north/west'" in bad[0]


def test_only_a_change_of_the_map_kicks() -> None:
    kicks: list[int] = []
    r = Reachability("unused:0", on_change=lambda: kicks.append(1))
    assert r.update([_record("south", "east", False)]) and r.unreachable("south") == {"east"}
    assert not r.update([_record("south", "east", False, version=2), _record("south", "west", True)])
    assert r.update([_record("south", "east", True)]) and r.unreachable("south") == frozenset()
    assert len(kicks) == 2 and r.changes == 2


class _ReflectorThread:
    """A reflector serving on 127.0.0.1 from its own event loop; ``call`` runs on that loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.refl = reflector.Reflector(CONFIG, grace_period=1, keepalive_interval=0.1, startup_hold=0,
                                        records_startup_hold=0, reachability_records=False)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        (self.target,) = self.run(self.refl.start(["127.0.0.1:0"]))

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrap() -> Any:
            return fn()
        return self.run(wrap())

    def put(self, source: str, target: str, ok: bool) -> None:
        data = reachability.encode(reachability.PairState(source, target, ok, "test"))
        # As the reflector publishes its own records (no session may open as fabric/reflector).
        self.call(lambda: self.refl.records.put_own(reachability.PUBLISHER, reachability.KIND,
                                                    {reachability.record_name(source, target): data}))

    def stop(self) -> None:
        self.run(self.refl.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def fabric() -> Iterator[_ReflectorThread]:
    r = _ReflectorThread()
    try:
        yield r
    finally:
        r.stop()


def test_a_reported_cut_kicks_a_pass_at_once(fabric: _ReflectorThread, members: dict[str, Api]) -> None:
    fabric.put("south", "west", True)
    ctl = Controller([Member(c, members[c]) for c in CLUSTERS], resync_s=600.0)
    reach = Reachability(fabric.target, on_change=ctl.kick, watch=None)
    ctl.unreachable = reach.unreachable
    reach.start()
    ctl.start()
    try:
        wait_until(reach.synced.is_set, 10, "the reachability watch synced")
        _serve(members["east"], 1)
        south = members["south"]
        wait_until(lambda: _endpoints(south) == {"east": [("10.1.0.1", True)]}, 15, "east's endpoint in south")
        passes = ctl.passes
        began = time.monotonic()
        fabric.put("south", "east", False)
        # resync_s is 600: only the kick of the record's change can make this pass.
        wait_until(lambda: _endpoints(south).get("east") == [("10.1.0.1", False)], 10, "east's endpoint not ready")
        cut = time.monotonic() - began
        assert _endpoints(members["west"]).get("east") == [("10.1.0.1", True)], "only south is cut off"
        assert ctl.passes > passes
        began = time.monotonic()
        fabric.put("south", "east", True)
        wait_until(lambda: _endpoints(south).get("east") == [("10.1.0.1", True)], 10, "east's endpoint ready again")
        print(f"\nreachability record -> importer's endpoint: not ready after {cut * 1000:.0f} ms, "
              f"ready again after {(time.monotonic() - began) * 1000:.0f} ms (goal: 1000 ms)")
    finally:
        reach.stop()
        ctl.stop()
