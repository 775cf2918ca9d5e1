"""When an agent tells the reflector about its tunnels' quality: rate limiting of the per-peer
RTT and loss it adds to its peer reports (issue 19: per cluster-pair RTT and loss on the
control channel, aggregated by the reflector, rate-limited).

The prober resolves ten probes a second per peer; sending each would make every agent a steady
stream of reports that change nothing the reflector acts on. So a quality report goes out only
when it says something new (:class:`QualityGate`): a peer appeared or left, a peer's RTT moved
by more than :data:`MOVE` (a fifth) of what was last sent, its loss by more than a fifth or
:data:`LOSS_STEP` (whichever is larger: a loss of 0.02 against 0 is noise), a peer started or
stopped answering at all; or :data:`EVERY_S` (30 s) passed and something moved at all.

"Moved" is judged at the rounding the reachability records carry
(:func:`fabric.control.reachability.round_rtt`: two significant digits;
:func:`~fabric.control.reachability.round_loss`: hundredths), on both sides: what was sent is
remembered rounded, and the current values are rounded before they are compared. A median RTT
is a float that differs in some digit at every look; compared raw, "something moved" was always
true and every agent reported every 30 s. Now a quiet tunnel sends nothing; a move the records
could show goes out within 30 s, one of a fifth at once. (A record is a median over the source
cluster's probers, so one agent's move may still leave it unchanged: the gate only drops what
cannot change it.) The 30 s is no keepalive: the reflector keeps the last report of a session
for as long as the session lives, so nothing needs refreshing.

Changes of the unreachable set are not gated here: the agent sends them at once, with the
current quality (and that counts as a send).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fabric.control.reachability import round_loss, round_rtt

#: A peer's measurement: (median round trip in ms, or None when nothing answered; loss 0..1).
Quality = tuple[float | None, float]

#: Relative move of a value that is worth a report.
MOVE = 0.2
#: Absolute move of a loss ratio below which it is noise (one probe of the 50 of the window).
LOSS_STEP = 0.02
#: Longest a moved value waits.
EVERY_S = 30.0
#: RTTs below this (ms) count as this when judging a relative move (sub-0.1 ms jitter is noise).
_RTT_FLOOR_MS = 0.1


def rounded(q: Quality) -> Quality:
    """A measurement as the reachability records would show it."""
    rtt, loss = q
    return (None if rtt is None else round_rtt(rtt), round_loss(loss))


class QualityGate:
    """Decides whether the current measurements are worth a report (pure; the caller's clock).
    ``sent`` holds what was last sent, rounded as the records round (module docstring)."""

    def __init__(self, move: float = MOVE, every_s: float = EVERY_S) -> None:
        self.move = move
        self.every_s = every_s
        self.sent: dict[str, Quality] = {}
        self.sent_at = -math.inf

    def _moved(self, now: Quality, then: Quality) -> bool:
        (rtt, loss), (rtt0, loss0) = now, then
        if (rtt is None) != (rtt0 is None):
            return True
        if rtt is not None and rtt0 is not None and abs(rtt - rtt0) > self.move * max(rtt0, _RTT_FLOOR_MS):
            return True
        return abs(loss - loss0) > max(LOSS_STEP, self.move * loss0)

    def due(self, current: Mapping[str, Quality], now: float) -> bool:
        """Is ``current`` (peer -> quality, as measured) worth sending at ``now``?"""
        if current.keys() != self.sent.keys():
            return True
        shown = {n: rounded(q) for n, q in current.items()}
        if any(self._moved(q, self.sent[n]) for n, q in shown.items()):
            return True
        return now - self.sent_at >= self.every_s and shown != self.sent

    def mark(self, current: Mapping[str, Quality], now: float) -> None:
        """``current`` (as measured) was sent at ``now``."""
        self.sent = {n: rounded(q) for n, q in current.items()}
        self.sent_at = now
