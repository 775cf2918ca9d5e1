"""Exponential back-off with jitter: the one retry pacing of the project.

Every "try again later" (the agent's reflector session, its failed reconcile passes, the Cluster
list/watch of the reflector's Kubernetes source, the benchmark's light agents) uses
:class:`Backoff`, so all of them grow, cap and jitter their waits the same way::

    backoff = Backoff(initial=0.2, maximum=5.0)
    while True:
        try:
            work()
            backoff.reset()          # after a success the next failure starts small again
        except Failure:
            sleep(backoff.next())

**Formula.** The nominal delay of the n-th wait since the last reset is
``d = min(maximum, initial * factor**n)``; the wait returned is ``d * (1 - jitter * U)`` with ``U``
uniform in [0, 1). With the default ``jitter=0.5`` that is "equal jitter": uniform in
``[d/2, d]``. Why this one and not "full jitter" (uniform in ``[0, d]``): full jitter spreads a
herd slightly better, but it can return a wait of almost nothing at every step, so a caller whose
failure is immediate (connection refused, a kernel error) would spin; equal jitter keeps at least
half the nominal delay, so the growth the caller asked for is guaranteed, while clients that failed
together (every agent of a fabric when the reflector restarts) still spread over half the window.
It is also what the agent's session did before this module existed.
"""

from __future__ import annotations

import random


class Backoff:
    """The waits of one retry loop: ``next()`` before each retry, ``reset()`` after a success.

    ``rng`` is for tests (a seeded :class:`random.Random`); otherwise each instance has its own
    generator seeded from the OS, so processes started together do not jitter alike.
    Not thread-safe: one instance belongs to one loop.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"back-off needs 0 < initial <= maximum, got initial={initial!r} maximum={maximum!r}")
        if factor < 1:
            raise ValueError(f"back-off factor must be at least 1 (waits never shrink), got {factor!r}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"back-off jitter is a fraction of the delay in [0, 1], got {jitter!r}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._delay = initial
        #: Waits handed out since the last reset (0: the last attempt succeeded, or none failed).
        self.attempts = 0

    @property
    def delay(self) -> float:
        """The nominal (un-jittered) delay the next :meth:`next` starts from."""
        return self._delay

    def next(self) -> float:
        """The wait before the next retry, in seconds; grows the nominal delay for the one after."""
        d = self._delay
        self._delay = min(self.maximum, d * self.factor)
        self.attempts += 1
        return d * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """The retried thing worked: the next failure waits ``initial`` again."""
        self._delay = self.initial
        self.attempts = 0
