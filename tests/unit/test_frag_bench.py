"""``fabric-tool bench frag`` in its tiny configuration: it runs through the suite's entry point and
every metric has ours beside LeastAllocated and MostAllocated of the same run (a comparison is a
printed figure, not an assert)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tools.bench import frag as bench_frag
from tools.bench import suite as bench

pytestmark = pytest.mark.unit


def test_the_tiny_run_reports_every_metric_beside_both_baselines(tmp_path: Path) -> None:
    out = tmp_path / "frag.json"
    assert bench.main(["frag", "--tiny", "--repeat", "1", "--nodes", "30", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())["frag"]
    for metric in ("fitted_prefix", "placed", "cpu_allocated", "frag_end"):
        fig = doc[f"{metric}_30"]
        assert fig["median"] > 0 and fig["baseline_median"] > 0 and fig["most_baseline_median"] > 0
        assert math.isfinite(fig["ratio"]) and math.isfinite(fig["most_ratio"])


def test_every_policy_sees_the_same_fleet_and_keeps_within_capacity() -> None:
    import random

    rng = random.Random(5)
    caps, frees = bench_frag.fleet(rng, 20)
    shapes, pop = bench_frag.shape_mix(rng)
    arrivals = [bench_frag.Demand.of(rng.choices(shapes, pop)[0]).amounts for _ in range(300)]
    for policy in ("frag", "least", "most"):
        r = bench_frag.simulate(caps, frees, arrivals, policy)
        assert 0 < r["fitted_prefix"] <= r["placed"] <= len(arrivals)
        assert 0 < r["cpu_allocated"] <= 1
