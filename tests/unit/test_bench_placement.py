"""``fabric-tool bench placement`` in its tiny configuration: it runs through the suite's entry
point, writes the JSON keys the issue asks for, and the invariants of the model hold in any run
(no figures are asserted: they are printed beside the baselines)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tools.bench import placement as bench_placement
from tools.bench import suite as bench

pytestmark = pytest.mark.unit


def test_the_tiny_run_writes_every_figure_beside_every_baseline(tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    assert bench.main(["placement", "--tiny", "--seeds", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())["placement"]
    for metric in bench_placement.METRICS:
        fig = doc[metric]
        assert {"median", "min", "max", "unit"} <= fig.keys(), metric
        for b in bench_placement.BASELINES:
            assert f"{b}_baseline_median" in fig, (metric, b)
    packing = doc["packing"]
    assert 0 < packing["median"] <= 1 and math.isfinite(packing["ratio"])
    assert packing["ratio"] == pytest.approx(packing["median"] / packing["baseline_median"])
    assert packing["baseline_median"] == packing["flat_oracle_baseline_median"]
    for b in bench_placement.BASELINES:
        assert math.isfinite(packing[f"{b}_own_ratio"]), b
    assert doc["decision_p99_ms"]["median"] > 0
    notes = "\n".join(doc["notes"])
    assert bench_placement.DEFAULT_SCORE_NAME in notes and "goal 0 false binds" in notes
    assert "pinned to the node ours reserved" in notes and "pinLeafNode: false" in notes


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_invariants_of_the_model_hold_for_every_policy(seed: int) -> None:
    """The flat oracle places pods itself: never a false bind. Ours, the leaf honouring the pin to
    the node ours reserved, never false-binds either (with the fragmentation score and with
    another); no policy overcommits a node or breaks a pod's leaf placement, and every pod is
    placed, refused by its leaf or rejected at the root."""
    fleet = bench_placement.make_fleet(seed, host=6, leaves=3, leaf_sizes=(15, 30), pods=600)
    out = bench_placement.run_seed(fleet)
    assert set(out) == set(bench_placement.POLICIES)
    for name, o in out.items():
        assert o.overcommitted == 0 and o.violations == 0, name
        assert 0 < o.cpu_share <= 1 and 0 < o.memory_share <= 1, name
        assert o.placed + o.false_binds + o.rejected == o.pods == len(fleet.arrivals), name
        assert o.placed_before_first_false_bind <= o.placed, name
        assert len(o.decision_s) == o.pods, name
    assert out["flat_oracle"].false_binds == 0
    assert out["ours"].false_binds == 0
    other = bench_placement.simulate(fleet, "ours", bench_placement.best_fit_leaf_score)
    assert other.false_binds == 0 and other.overcommitted == 0
    unpinned = bench_placement.simulate(fleet, "ours", pin=False)
    assert unpinned.overcommitted == 0 and unpinned.placed + unpinned.false_binds + unpinned.rejected == unpinned.pods


def test_the_leaf_score_is_pluggable() -> None:
    """A score that prefers the host for everything sends no pod to a leaf while the host has room."""
    fleet = bench_placement.make_fleet(4, host=5, leaves=2, leaf_sizes=(10, 12), pods=50)
    calls: list[str] = []

    def host_first(view: bench_placement.LeafView, demand: bench_placement.Demand,
                   placement: bench_placement.Placement) -> float:
        calls.append(view.name)
        return 1.0 if view.name == "host" else 0.0

    o = bench_placement.simulate(fleet, "ours", host_first)
    assert "host" in calls and o.pods == 50
