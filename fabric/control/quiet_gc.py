"""Full collections of Python's cyclic garbage collector at the reflector's quiet moments.

Why (issue 21, measured with ``fabric-tool bench control --n 1000 --shape gateway``): the
reflector of 1,000 agents holds about 210,000 objects the collector tracks (most of them the
grpc.aio machinery of 1,000 open streams), and a full (generation 2) collection walks them all:
130-140 ms of CPU, 200-330 ms of wall time on the shared 2-core machine. CPython starts one when
the objects promoted into the oldest generation since the last one exceed a quarter of those
there, and it counts every promotion, also of objects freed since: a fan-out to 902 streams has
thousands of writes in flight (their coroutines, futures and operation tags) when a young
collection runs during it, so about every 10th change promoted enough, and since allocation is
what starts a collection, the pause fell inside a flush, i.e. inside that change's fan-out
(a join's p99 of 495-744 ms against 170-300 ms for the others; with 5 joins a round the p99 is
their maximum, and whether the pause hit a join or a leave depended on where the run's
bring-up had left the collector's count).

What :class:`QuietCollector` does: automatic full collections are switched off (the oldest
generation's threshold set out of reach); young collections run as before. The owner calls
:meth:`QuietCollector.poll` saying whether it is quiet (the reflector: no flush pending, no
fan-out in flight, no snapshot waiting). A full collection runs when one is *due* and the owner
is quiet, or when it has been due for ``max_defer_s`` whatever the owner does (a storm that never
ends still collects). Due: the interpreter's allocated memory blocks (``sys.getallocatedblocks``,
O(1)) grew by ``growth`` (a quarter, CPython's own ratio) over the least seen since the last
full collection (after it, or lower when memory was freed since, e.g. by nodes gone). Garbage
cycles that outlive the young collections hold blocks until a full collection frees them, so
this bounds what they can hold as CPython's rule does, without counting objects already freed.
In a steady state (changes, deltas, Applied) nothing grows, so nothing is due.

Paced: after a full collection that took ``d`` seconds, the next one waits at least ``pace * d``
(19 by default: collections are at most a twentieth of the process's time), quiet or not. In a
bring-up the memory grows by a quarter again and again as streams arrive, and the objects it
grows by are the streams, not garbage: unpaced, a fabric-relay taking up 5,000 agents ran 2-3
full collections within the 15 s (0.2-0.75 s each, a fifth of its CPU; measured with
``bench control --n 10000 --relays 2``, issue 21). Pacing bounds what garbage cycles can hold
by time instead: what the process allocates in ``pace * d`` seconds.

The collector's thresholds are process-wide: only a process's main program installs one
(``fabric-reflector``), never a library or a test that shares the process with others
(:meth:`QuietCollector.uninstall` restores what was there).
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable

_log = logging.getLogger(__name__)

#: Growth of allocated blocks since the last full collection that makes the next one due.
DEFAULT_GROWTH = 0.25
#: The longest a due full collection waits for a quiet moment.
DEFAULT_MAX_DEFER_S = 10.0
#: After a full collection of d seconds, the next waits at least this many times d (module docstring).
DEFAULT_PACE = 19.0
#: The oldest generation's threshold while installed: never reached (counted in young collections).
_NEVER = 1 << 30


class QuietCollector:
    """Full collections when due and quiet (see the module docstring). ``blocks``, ``collect``
    and ``clock`` are injectable for tests; by default the interpreter's own."""

    def __init__(
        self,
        growth: float = DEFAULT_GROWTH,
        max_defer_s: float = DEFAULT_MAX_DEFER_S,
        *,
        pace: float = DEFAULT_PACE,
        blocks: Callable[[], int] = sys.getallocatedblocks,
        collect: Callable[[], object] = lambda: gc.collect(2),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if growth <= 0:
            raise ValueError(f"growth must be positive, got {growth}")
        self.growth = growth
        self.max_defer_s = max(0.0, max_defer_s)
        if pace < 0:
            raise ValueError(f"pace must be >= 0, got {pace}")
        self.pace = pace
        #: No full collection before this time (``clock``): the last one's duration times ``pace``.
        self.not_before = float("-inf")
        self._blocks, self._collect, self._clock = blocks, collect, clock
        #: Allocated blocks after the last full collection (or at the start), or fewer when
        #: memory was freed since: growth is measured from the least seen, so what was freed
        #: (nodes gone) does not make room for garbage.
        self.base = blocks()
        #: Since when the next full collection is due (None: not due).
        self.due_since: float | None = None
        #: Full collections run, and how many of them because they waited ``max_defer_s``.
        self.collections = 0
        self.forced = 0
        #: Seconds they took, in all and the longest.
        self.seconds = 0.0
        self.longest_s = 0.0
        self._saved: tuple[int, int, int] | None = None

    # -- the process's collector --

    def install(self) -> None:
        """Switch off automatic full collections in this process (young ones stay)."""
        if self._saved is None:
            self._saved = gc.get_threshold()
            t0, t1, _ = self._saved
            gc.set_threshold(t0, t1, _NEVER)
        self.base = self._blocks()

    def uninstall(self) -> None:
        """Give the oldest generation its threshold back."""
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    @property
    def installed(self) -> bool:
        return self._saved is not None

    # -- the owner's calls --

    def due(self) -> bool:
        """Is a full collection due (the allocated blocks grew by ``growth`` since the last)?"""
        blocks = self._blocks()
        self.base = min(self.base, blocks)
        return blocks > self.base * (1 + self.growth)

    def poll(self, quiet: bool) -> bool:
        """Run a due full collection now if the owner is ``quiet`` or it has waited
        ``max_defer_s``, and the last one is ``pace`` times its duration ago; returns whether
        one ran."""
        now = self._clock()
        if not self.due():
            self.due_since = None
            return False
        if self.due_since is None:
            self.due_since = now
        if now < self.not_before:
            return False  # paced: the last one was too recent
        # Waiting for a quiet moment counts from when pacing allowed one: a paced collection
        # still goes to the first quiet moment after that, not into a change in flight.
        forced = now - max(self.due_since, self.not_before) >= self.max_defer_s
        if not quiet and not forced:
            return False
        self._collect()
        took = max(0.0, self._clock() - now)
        self.not_before = now + took + self.pace * took
        self.base = self._blocks()
        self.due_since = None
        self.collections += 1
        self.forced += forced
        self.seconds += took
        self.longest_s = max(self.longest_s, took)
        _log.debug("full collection%s in %.1f ms (%d blocks after it)", " (waited too long for a quiet moment)"
                   if forced and not quiet else "", took * 1000, self.base)  # fmt: skip
        return True
