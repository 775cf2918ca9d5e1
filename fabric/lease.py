"""When a ``coordination.k8s.io`` Lease held by someone else has expired, judged without
trusting anybody's wall clock: client-go's ``observedRecord`` / ``observedTime``.

A Lease's ``renewTime`` is written from the holder's wall clock; comparing it with ours makes
two replicas both lead (our clock ahead of the holder's) or neither (ours behind) as soon as
the clocks disagree by more than the lease's margin. client-go's ``tryAcquireOrRenew`` never
reads ``renewTime``: a candidate remembers the record it last saw and when it *saw it change*,
on its own monotonic clock, and takes the Lease over only once the record has stayed the same
for ``leaseDurationSeconds`` of that clock. Since the holder wrote the record no later than the
candidate saw it change, and the holder stops acting on a renewal before a lease duration
counted from when it *sent* that renewal, the two never overlap whatever the wall clocks say;
all that is assumed is that monotonic clocks run at about the same rate.

In order, for each read of the Lease (:meth:`ObservedLease.observe`):

1. The record (the Lease's ``spec``) differs from the one remembered: remember it and the
   monotonic time now (a first read counts as a change, so a replica that has just started
   waits a full lease duration before taking over a held Lease, as client-go).
2. :meth:`ObservedLease.held_by_other`: the remembered holder is not empty, not us, and the
   remembered change is younger than the record's ``leaseDurationSeconds`` (ours when absent).
   Then the Lease is someone else's; otherwise it may be taken (with optimistic concurrency:
   that is the writer's business).

Shared by the reflector's replicas (:mod:`fabric.control.k8s_source`) and the add-ons' elector
(:mod:`scheduler.election`), so both judge expiry the one way. No I/O, no clock of its own: the
caller passes monotonic times, which is also how the tests inject skewed clocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ObservedLease:
    """The Lease record last seen and when it was seen to change (caller's monotonic clock)."""

    __slots__ = ("at", "record")

    def __init__(self) -> None:
        #: The ``spec`` last read or written (None: never seen).
        self.record: dict[str, Any] | None = None
        #: Monotonic time at which ``record`` was first seen (meaningless while it is None).
        self.at = 0.0

    def observe(self, spec: Mapping[str, Any], now: float) -> bool:
        """Remember ``spec`` as read (or written by us) at monotonic ``now`` if it differs from
        the record remembered: True when it did (the expiry then counts from ``now``)."""
        if self.record is not None and spec == self.record:
            return False
        self.record, self.at = dict(spec), now
        return True

    def holder(self) -> str:
        return str((self.record or {}).get("holderIdentity") or "")

    def duration(self, default: float) -> float:
        """The record's ``leaseDurationSeconds`` (its holder's), else ``default``."""
        try:
            return float((self.record or {}).get("leaseDurationSeconds") or default)
        except (TypeError, ValueError):  # a hand-edited record: judge by our own duration
            return default

    def expires(self, default_duration: float) -> float:
        """Monotonic time from which the remembered record, unchanged, may be taken over."""
        return self.at + self.duration(default_duration)

    def held_by_other(self, identity: str, now: float, default_duration: float) -> bool:
        """Someone else holds the Lease and we have not seen it unchanged for its duration."""
        holder = self.holder()
        return bool(holder) and holder != identity and now < self.expires(default_duration)
