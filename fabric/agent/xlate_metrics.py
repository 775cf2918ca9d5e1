"""Global-IP translation metrics of the agent, read from the pinned BPF maps at scrape time.

* ``fabric_agent_translation_packets_total{direction,local,global}`` and
  ``fabric_agent_translation_bytes_total{...}``: per mapping, ``direction="in"`` counts
  destination global -> local rewrites (tunnel ingress, hairpin), ``"out"`` source local ->
  global (tunnel egress, hairpin). Per-CPU counters in the kernel, summed here.
* ``fabric_agent_translation_drops_total{reason}``: packets a mapping matched but that could
  not be translated whole (dropped rather than sent corrupted).

Why a collector and not counters the agent increments: the kernel counts, the agent only
reads. Reading by pin path (no handle shared with the reconcile worker) makes a scrape
thread-safe, and since the maps are pinned the series continue across agent restarts instead of
resetting (they are monotonic for as long as the node's pins live). Nothing is exported while
the node has no translator pins (a cluster without global CIDRs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from fabric.bpf import translate

_log = logging.getLogger(__name__)


class TranslationCollector(Collector):
    def __init__(self, instance: str, pin_root: Path) -> None:
        self.instance = instance
        self.pin_root = pin_root

    def describe(self) -> Iterator[CounterMetricFamily]:
        """The families this collector exports (so registries and dashboards can know them
        before the first translated packet)."""
        yield from self._families()

    def collect(self) -> Iterator[CounterMetricFamily]:
        packets, octets, drops = self._families()
        doc = self._read()
        if doc is None:
            return
        for m in doc["mappings"]:
            for direction in ("in", "out"):
                labels = [direction, m["local"], m["global"]]
                packets.add_metric(labels, m[f"{direction}_packets"])
                octets.add_metric(labels, m[f"{direction}_bytes"])
        for reason, n in doc["drops"].items():
            drops.add_metric([reason], n)
        yield packets
        yield octets
        yield drops

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        packets = CounterMetricFamily(
            "fabric_agent_translation_packets", "Packets translated by the global-IP translator, per mapping",
            labels=["direction", "local", "global"],
        )
        octets = CounterMetricFamily(
            "fabric_agent_translation_bytes", "Bytes translated by the global-IP translator, per mapping",
            labels=["direction", "local", "global"],
        )
        drops = CounterMetricFamily(
            "fabric_agent_translation_drops", "Packets matching a mapping that could not be translated whole",
            labels=["reason"],
        )
        return packets, octets, drops

    def _read(self) -> dict[str, Any] | None:
        try:
            if not translate.pin_dir_for(self.instance, self.pin_root).is_dir():
                return None
            return translate.dump_pinned(self.instance, self.pin_root)
        except translate.TranslatorError as e:
            _log.debug("translation metrics unavailable: %s", e)
            return None


def register(instance: str, pin_root: Path,
             registry: prometheus_client.CollectorRegistry = prometheus_client.REGISTRY) -> TranslationCollector:
    """Export the translation counters of ``instance`` in ``registry`` (once per process)."""
    collector = TranslationCollector(instance, pin_root)
    registry.register(collector)
    return collector
