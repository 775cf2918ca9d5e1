"""What one reconcile pass did, per table: the currency between owners, Reconciler and agent.

Error philosophy: a failed kernel entry never aborts a pass. Each owner records the failure here
(count, errno histogram, first message) and carries on; the Reconciler turns any failure into
``resync_needed`` so the next pass starts from a fresh kernel view.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import logging

_log = logging.getLogger(__name__)

#: Table names in programming order (adds); deletes run in reverse. ``translator`` is the
#: global-IP translator (maps and tc filters; fabric/agent/translator.py), applied after the netlink
#: tables in the same pass and reported with them.
TABLES = ("links", "addresses", "rules", "neighbours", "fdb", "nexthops", "routes", "translator")


@dataclasses.dataclass(slots=True)
class TableStats:
    adds: int = 0
    updates: int = 0
    deletes: int = 0
    failures: int = 0
    #: errno -> how many entries failed with it.
    errnos: dict[int, int] = dataclasses.field(default_factory=dict)
    first_error: str | None = None

    def fail(self, table: str, code: int, message: str) -> None:
        """Record one failed entry; log only the first of the table in this pass."""
        self.failures += 1
        self.errnos[code] = self.errnos.get(code, 0) + 1
        if self.first_error is None:
            name = errno_mod.errorcode.get(code, str(code))
            self.first_error = f"{table}: [{name}] {message}"
            _log.warning("%s", self.first_error)


@dataclasses.dataclass(slots=True)
class ApplyReport:
    tables: dict[str, TableStats] = dataclasses.field(default_factory=lambda: {t: TableStats() for t in TABLES})
    resync_needed: bool = False

    @property
    def failures(self) -> int:
        return sum(t.failures for t in self.tables.values())

    @property
    def changes(self) -> int:
        return sum(t.adds + t.updates + t.deletes for t in self.tables.values())

    @property
    def first_error(self) -> str | None:
        for name in TABLES:
            if self.tables[name].first_error is not None:
                return self.tables[name].first_error
        return None

    def summary(self) -> str:
        parts = [
            f"{name} +{s.adds} ~{s.updates} -{s.deletes}" + (f" !{s.failures}" if s.failures else "")
            for name, s in self.tables.items()
            if s.adds or s.updates or s.deletes or s.failures
        ]
        return ", ".join(parts) or "no changes"
