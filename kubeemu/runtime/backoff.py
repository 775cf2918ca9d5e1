"""Container restart back-off, as upstream's ``flowcontrol.Backoff`` used by the kubelet.

The kubelet keys one entry per container (pod UID + name). ``is_in_backoff_since(key, finished)``
says whether a container that finished at ``finished`` must still wait; ``next(key, now)``
records a restart and doubles the delay: 10 s, 20 s, 40 s ... up to 300 s. An entry not updated
for twice the maximum (10 min: the container ran that long without a restart) starts again at
10 s. So the first restart is immediate, the second waits 10 s, and a crash-looping container
shows ``CrashLoopBackOff`` with "back-off 40s restarting failed container=...".
"""

from __future__ import annotations

from dataclasses import dataclass, field

INITIAL_S = 10.0
MAX_S = 300.0


@dataclass
class _Entry:
    backoff: float
    last_update: float


@dataclass
class Backoff:
    initial: float = INITIAL_S
    maximum: float = MAX_S
    entries: dict[str, _Entry] = field(default_factory=dict)

    def _expired(self, event_time: float, e: _Entry) -> bool:
        return event_time - e.last_update > 2 * self.maximum

    def get(self, key: str) -> float:
        """The current delay of ``key`` (0 when it has none)."""
        e = self.entries.get(key)
        return e.backoff if e else 0.0

    def next(self, key: str, now: float) -> None:
        """Record a restart of ``key`` at ``now``: the first delay, doubled, or reset when expired."""
        e = self.entries.get(key)
        if e is None or self._expired(now, e):
            self.entries[key] = _Entry(self.initial, now)
        else:
            e.backoff = min(e.backoff * 2, self.maximum)
            e.last_update = now

    def is_in_backoff_since(self, key: str, event_time: float, now: float) -> bool:
        """Whether a container of ``key`` that finished at ``event_time`` must still wait at ``now``."""
        e = self.entries.get(key)
        if e is None or self._expired(event_time, e):
            return False
        return now - event_time < e.backoff

    def remaining(self, key: str, event_time: float, now: float) -> float:
        e = self.entries.get(key)
        return 0.0 if e is None else max(0.0, e.backoff - (now - event_time))

    def forget(self, key: str) -> None:
        self.entries.pop(key, None)
