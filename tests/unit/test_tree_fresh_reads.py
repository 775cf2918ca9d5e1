"""Coalesced root reads (:class:`tree.deps.FreshReads`): callers that ask while a GET is in flight
share the next GET (never the one already sent, which may predate a change they must see);
a failed GET's error reaches every caller that waited for it; other objects are not held up."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.waiting import wait_until
from tree.deps import FreshReads

Obj = dict[str, Any]


class SlowRoot:
    """A fake root GET: each call blocks until released, and answers the version current when it was sent."""

    def __init__(self) -> None:
        self.version = 0
        self.sent: list[int] = []
        self.release: list[threading.Event] = []
        self.lock = threading.Lock()
        self.fail = False

    def get(self, plural: str, ns: str | None, name: str) -> Obj | None:
        with self.lock:
            version = self.version
            gate = threading.Event()
            self.sent.append(version)
            self.release.append(gate)
        gate.wait(10)
        if self.fail:
            raise OSError("refused")
        return {"metadata": {"name": name, "namespace": ns}, "version": version}


def ask(reads: FreshReads, out: list[Any], name: str = "default") -> threading.Thread:
    def run() -> None:
        try:
            out.append(reads.get("serviceaccounts", "ns", name))
        except Exception as e:
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_callers_during_a_get_share_the_next_one_which_sees_later_changes() -> None:
    root = SlowRoot()
    reads = FreshReads(root.get)
    first: list[Any] = []
    t0 = ask(reads, first)
    wait_until(lambda: len(root.sent) == 1, 5, "the first GET sent")
    root.version = 1  # changed after the first GET was sent: later callers must see it
    later: list[Any] = []
    threads = [ask(reads, later) for _ in range(5)]
    wait_until(lambda: reads._state[("serviceaccounts", "ns", "default")][0] is not None, 5, "callers gathering")
    assert len(root.sent) == 1  # the gathered GET waits for the one in flight
    root.release[0].set()
    t0.join(5)
    assert first[0]["version"] == 0
    wait_until(lambda: len(root.sent) == 2, 5, "the second GET sent")
    root.release[1].set()
    for t in threads:
        t.join(5)
    assert [o["version"] for o in later] == [1] * 5
    assert len(root.sent) == 2  # six callers, two GETs
    assert reads._state == {}


def test_a_failed_get_raises_in_every_caller_that_waited_for_it() -> None:
    root = SlowRoot()
    reads = FreshReads(root.get)
    first: list[Any] = []
    t0 = ask(reads, first)
    wait_until(lambda: len(root.sent) == 1, 5, "the first GET sent")
    later: list[Any] = []
    threads = [ask(reads, later) for _ in range(3)]
    wait_until(lambda: reads._state[("serviceaccounts", "ns", "default")][0] is not None, 5, "callers gathering")
    root.fail = True
    root.release[0].set()
    t0.join(5)
    wait_until(lambda: len(root.sent) == 2, 5, "the second GET sent")
    root.release[1].set()
    for t in threads:
        t.join(5)
    assert len(later) == 3 and all(isinstance(e, OSError) for e in later)
    with pytest.raises(OSError):
        raise first[0]


def test_another_object_is_not_held_up() -> None:
    root = SlowRoot()
    reads = FreshReads(root.get)
    a: list[Any] = []
    ask(reads, a, "a")
    wait_until(lambda: len(root.sent) == 1, 5, "the GET of a sent")
    b: list[Any] = []
    tb = ask(reads, b, "b")
    wait_until(lambda: len(root.sent) == 2, 5, "the GET of b sent while a's is in flight")
    root.release[1].set()
    tb.join(5)
    assert b[0]["metadata"]["name"] == "b" and not a
    root.release[0].set()
