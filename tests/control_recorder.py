"""The test agents' SessionHandler, the one every control-channel test uses.

An :class:`~fabric.control.client.AgentSession` needs a handler; the tests want to know what it
was told and, usually, to report each version applied so the reflector sees the agent in sync.
:class:`Recorder` does both. With ``counts_only`` it keeps per-kind counts and nothing else, for
tests that measure the reflector's memory (a recorder holding every state and delta would be
measured with it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fabric import types
from fabric.control import client


class Recorder:
    """A SessionHandler that records every callback in order and reports each version applied.

    Reports go through ``session`` once a test attaches it (``rec.session = s`` after creating
    the AgentSession with ``rec``) and while ``report`` is True; without a session nothing is
    reported (an agent that never applies). ``count`` works in both modes; the event list and
    what is read from it (``last``, ``lost``, ``rejected``) only without ``counts_only``.
    """

    def __init__(self, *, counts_only: bool = False) -> None:
        self.counts_only = counts_only
        self.events: list[tuple[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.session: client.AgentSession | None = None
        self.report = True

    def _record(self, kind: str, value: Any) -> None:
        self.counts[kind] += 1
        if not self.counts_only:
            self.events.append((kind, value))

    def _events(self, kind: str) -> list[Any]:
        if self.counts_only:
            raise AssertionError(f"this Recorder keeps counts only: no {kind!r} events to read")
        return [v for k, v in self.events if k == kind]

    def count(self, kind: str) -> int:
        """How many ``kind`` callbacks ("snapshot", "delta", "connection", "rejected") came."""
        return self.counts[kind]

    def last(self, kind: str) -> Any:
        """The value of the latest ``kind`` callback (IndexError if none came)."""
        return self._events(kind)[-1]

    @property
    def snapshots(self) -> int:
        return self.counts["snapshot"]

    @property
    def deltas(self) -> int:
        return self.counts["delta"]

    @property
    def lost(self) -> list[str]:
        """The reason of every lost connection, in order."""
        return [reason for connected, reason in self._events("connection") if not connected]

    @property
    def rejected(self) -> list[str]:
        """The reason of every rejection, in order."""
        return list(self._events("rejected"))

    async def on_snapshot(self, state: types.NodeState, version: int) -> None:
        self._record("snapshot", (state, version))
        if self.report and self.session is not None:
            await self.session.report_applied(version)

    async def on_delta(self, delta: types.StateDelta, version: int) -> None:
        self._record("delta", (delta, version))
        if self.report and self.session is not None:
            await self.session.report_applied(version)

    async def on_connection(self, connected: bool, reason: str) -> None:
        self._record("connection", (connected, reason))

    async def on_rejected(self, reason: str) -> None:
        self._record("rejected", reason)
