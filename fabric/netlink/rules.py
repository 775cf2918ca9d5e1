"""Owner of the policy-routing rules that send traffic to our route table.

Ownership: rules whose protocol is ``RTPROT_FABRIC`` (FRA_PROTOCOL, kernel >= 4.17), in both
address families; a rule selecting the same table with another protocol is someone else's and
left alone. Rules go in after links and addresses and before any route: a rule pointing at an
empty table is harmless (lookups fall through to ``main``).
"""

from __future__ import annotations

import logging
import socket

from fabric.netlink import tolerated
from fabric.netlink.dataplane import Dataplane, DataplaneError, KernelRule
from fabric.netlink.objects import RTPROT_FABRIC, Rule
from fabric.netlink.report import TableStats

_log = logging.getLogger(__name__)
TABLE = "rules"


class RuleOwner:
    def __init__(self, dp: Dataplane) -> None:
        self._dp = dp
        self._desired: set[Rule] | None = None
        self._kernel: dict[Rule, KernelRule] = {}

    def set_desired(self, rules: frozenset[Rule]) -> None:
        for r in rules:
            if r.family not in (socket.AF_INET, socket.AF_INET6):
                raise ValueError(f"desired rule {r} has family {r.family}, not AF_INET or AF_INET6")
        self._desired = set(rules)

    def resync(self) -> None:
        self._kernel = {
            Rule(kr.family, kr.table, kr.priority): kr
            for fam in (socket.AF_INET, socket.AF_INET6)
            for kr in self._dp.list_rules(fam)
            if kr.protocol == RTPROT_FABRIC
        }

    def desired_count(self) -> int:
        return len(self._desired or ())

    def programmed_count(self) -> int:
        return len(self._kernel)

    def apply_adds(self, stats: TableStats) -> None:
        for r in (self._desired or set()) - self._kernel.keys():
            try:
                self._dp.add_rule(r)
            except DataplaneError as exc:
                if not tolerated.already_there(TABLE, exc.code):
                    stats.fail(TABLE, exc.code, str(exc))
                    continue
            stats.adds += 1
            self._kernel[r] = KernelRule(r.family, r.table, r.priority, RTPROT_FABRIC)

    def apply_deletes(self, stats: TableStats) -> None:
        if self._desired is None:
            return
        for r in [r for r in self._kernel if r not in self._desired]:
            try:
                self._dp.del_rule(self._kernel[r])
            except DataplaneError as exc:
                if not tolerated.already_gone(TABLE, exc.code):
                    stats.fail(TABLE, exc.code, str(exc))
                    continue
            stats.deletes += 1
            del self._kernel[r]

    def clear_desired(self) -> None:
        self._desired = set()
