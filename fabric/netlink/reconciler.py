"""The Reconciler: one pass over every kernel table we own, in the written-down order.

The agent hands it the full desired :class:`KernelState` (``set_desired``) and calls ``apply``
from one worker thread. Each table has one owner (``links``, ``addresses``, ``rules``,
``neighbours``, ``fdb``, ``routes`` with its nexthops) holding a desired set and a kernel view;
``apply`` pushes only the difference:

1. adds/updates: link, address, rule, neighbour, FDB, nexthop, route - a route never exists
   before the neighbour and FDB entry of its next hop, otherwise the kernel ARPs on the tunnel
   (learning is off, nobody answers) and the first packets are lost;
2. if a link was created, recreated or brought up, the kernel flushed what hung off it, so the
   dependent tables are re-read right there and re-added in the same pass (no blackhole until
   the next resync, which is what Kosmos did);
3. deletes in reverse: route, nexthop, FDB, neighbour, rule, address, link;
4. the route adds the kernel refused with ``EEXIST`` in step 1, once more: with routes in
   ``main``, the prefix may have been held by the connected route of an address deleted in
   step 3 (a node changing role), and the route lands in this pass instead of the next resync.

Failures: a failed entry is counted in the :class:`ApplyReport` (per table, errno histogram,
first message) and the pass carries on; any failure sets ``resync_needed`` and makes the next
``apply`` re-read the kernel first. An errno meaning "already gone" on delete or "our identical
object is already there" on add is success: :mod:`fabric.netlink.tolerated` is the one table.
Only kernel failures are counted (the owners catch ``DataplaneError``, a failed dump here is an
``OSError``); anything else is a bug and leaves ``apply`` at once, so the agent crashes into a
clean resync (DESIGN.md) instead of retrying it forever as a "failure".

Contract with the agent: nothing is ever deleted before the first ``set_desired`` (the agent
calls it only once it holds its first complete snapshot), so a restarting agent does not flush
a working dataplane. ``cleanup_all`` is the one explicit exception (``fabric-agent --cleanup``).
"""

from __future__ import annotations

import logging
import time

from fabric.netlink.addresses import AddressOwner
from fabric.netlink.dataplane import Dataplane
from fabric.netlink.fdb import FdbOwner
from fabric.netlink.links import LinkOwner
from fabric.netlink.neighbours import NeighbourOwner
from fabric.netlink.objects import DEFAULT_RULE_PRIORITY, DEFAULT_TABLE, KernelState
from fabric.netlink.report import ApplyReport, TableStats
from fabric.netlink.routes import RouteOwner
from fabric.netlink.rules import RuleOwner

_log = logging.getLogger(__name__)

__all__ = ["ApplyReport", "Reconciler", "TableStats"]


class Reconciler:
    def __init__(
        self,
        dp: Dataplane,
        *,
        table: int = DEFAULT_TABLE,
        rule_priority: int = DEFAULT_RULE_PRIORITY,
        link_names: frozenset[str],
    ) -> None:
        if not link_names:
            raise ValueError("Reconciler needs the names of the links it owns (link_names is empty)")
        self._dp = dp
        self._table = table
        self._rule_priority = rule_priority
        self._links = LinkOwner(dp, link_names)
        self._addresses = AddressOwner(dp, link_names)
        self._rules = RuleOwner(dp)
        self._neighbours = NeighbourOwner(dp, link_names)
        self._fdb = FdbOwner(dp, link_names)
        self._routes = RouteOwner(dp, link_names, table)
        self._desired: KernelState | None = None
        self._stale = True

    # --- desired state --------------------------------------------------------------------

    def set_desired(self, state: KernelState) -> None:
        """Replace the whole desired state (validated: a bad state is a programming bug)."""
        for rule in state.rules:
            if (rule.table, rule.priority) != (self._table, self._rule_priority):
                raise ValueError(
                    f"desired rule {rule} does not select our table {self._table} at priority {self._rule_priority}"
                )
        self._links.set_desired(state.links)
        self._addresses.set_desired(state.addresses)
        self._rules.set_desired(state.rules)
        self._neighbours.set_desired(state.neighbours)
        self._fdb.set_desired(state.fdb)
        self._routes.set_desired(state.routes)
        self._desired = state

    # --- kernel view --------------------------------------------------------------------------

    def resync(self) -> None:
        """Re-read the kernel view of every table (raises :class:`OSError` if a dump fails)."""
        start = time.monotonic()
        self._links.resync()
        self._rules.resync()
        self._resync_dependents()
        self._stale = False
        _log.debug("resync took %.3f s", time.monotonic() - start)

    def _resync_dependents(self) -> None:
        self._addresses.resync()
        self._neighbours.resync()
        self._fdb.resync()
        self._routes.resync()

    # --- apply -----------------------------------------------------------------------------------

    def apply(self) -> ApplyReport:
        report = ApplyReport()
        if self._desired is None:
            _log.debug("apply skipped: no desired state yet (waiting for the first complete snapshot)")
            return report
        t = report.tables
        if self._stale and not self._try(report, "resync", self.resync):
            return report
        touched = self._links.apply_adds(t["links"])
        if touched:
            _log.info("links %s created or brought up: re-reading what the kernel flushed", sorted(touched))
            if not self._try(report, "resync", self._resync_dependents):
                return report
        self._addresses.apply_adds(t["addresses"])
        self._rules.apply_adds(t["rules"])
        self._neighbours.apply_adds(t["neighbours"])
        self._fdb.apply_adds(t["fdb"])
        self._routes.apply_adds(t["nexthops"], t["routes"])
        self._deletes(report)
        self._routes.apply_clashed(t["routes"])
        self._finish(report)
        return report

    def _deletes(self, report: ApplyReport) -> None:
        t = report.tables
        self._routes.apply_deletes(t["nexthops"], t["routes"])
        self._fdb.apply_deletes(t["fdb"])
        self._neighbours.apply_deletes(t["neighbours"])
        self._rules.apply_deletes(t["rules"])
        self._addresses.apply_deletes(t["addresses"])
        self._links.apply_deletes(t["links"])

    def _finish(self, report: ApplyReport) -> None:
        if report.failures:
            report.resync_needed = True
            self._stale = True
        if report.changes or report.failures:
            _log.info("apply: %s", report.summary())

    def _try(self, report: ApplyReport, what: str, fn: object) -> bool:
        assert callable(fn)
        try:
            fn()
        except OSError as exc:
            code = getattr(exc, "code", None) or exc.errno or 0
            report.tables["links"].fail("links", int(code), f"{what} failed: {exc}")
            report.resync_needed = True
            self._stale = True
            return False
        return True

    def cleanup_all(self) -> ApplyReport:
        """Remove everything we own (routes, nexthops, FDB, neighbours, rules, addresses, links)."""
        report = ApplyReport()
        if not self._try(report, "resync", self.resync):
            return report
        for owner in (self._links, self._addresses, self._rules, self._neighbours, self._fdb, self._routes):
            owner.clear_desired()
        self._desired = KernelState()
        self._deletes(report)
        self._finish(report)
        return report

    # --- metrics ------------------------------------------------------------------------------------

    def desired_counts(self) -> dict[str, int]:
        nexthops, routes = self._routes.desired_counts()
        return {
            "links": self._links.desired_count(),
            "addresses": self._addresses.desired_count(),
            "rules": self._rules.desired_count(),
            "neighbours": self._neighbours.desired_count(),
            "fdb": self._fdb.desired_count(),
            "nexthops": nexthops,
            "routes": routes,
        }

    def programmed_counts(self) -> dict[str, int]:
        nexthops, routes = self._routes.programmed_counts()
        return {
            "links": self._links.programmed_count(),
            "addresses": self._addresses.programmed_count(),
            "rules": self._rules.programmed_count(),
            "neighbours": self._neighbours.programmed_count(),
            "fdb": self._fdb.programmed_count(),
            "nexthops": nexthops,
            "routes": routes,
        }

    def nexthop_id(self, link: str, gateway: str) -> int | None:
        """The nexthop object id in use for (link, gateway), for diagnostics and tests."""
        return self._routes.nexthop_id(link, gateway)
