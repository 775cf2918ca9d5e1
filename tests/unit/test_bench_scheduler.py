"""The scheduler benchmark's machinery (tools/bench/scheduler.py) at smoke size: nodes and pods
created in fresh kubeemu processes, the bare-bind baseline, the watch-based rate and p99, RSS
figures and the report. The scheduler here is the test stand-in binder (tests/standin_binder.py):
this checks the benchmark, not the scheduler; ``fabric-tool bench scheduler --quick`` runs it
with the real one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from tools.bench import common as bc
from tools.bench import scheduler as bs
from tools.bench import suite

pytestmark = pytest.mark.unit

STANDIN = Path(__file__).resolve().parents[1] / "standin_binder.py"


def test_objects_and_placement() -> None:
    sc = bs.Scenario("spread", 40, 200)
    assert sc.name == "spread_40n" and sc.group == 20
    pod = bs.pod_object(sc, 45, None)
    assert pod["metadata"]["labels"]["group"] == "g2" and "schedulerName" not in pod["spec"]
    anti = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti == {"labelSelector": {"matchLabels": {"group": "g2"}}, "topologyKey": "kubernetes.io/hostname"}
    assert pod["spec"]["topologySpreadConstraints"][0]["maxSkew"] == 1
    # the baseline's placement honours the scenario: distinct nodes within a group, zones balanced
    for s in (sc, bs.Scenario("spread", 12, 60), bs.Scenario("spread", 1000, 10_000), bs.Scenario("spread", 5, 10)):
        zones_n = min(bs.ZONES, s.nodes)
        for g in range(s.pods // s.group):
            nodes = [bs.placement(s, g * s.group + j) for j in range(s.group)]
            assert len(set(nodes)) == s.group, (s, g)
            assert all(int(n.split("-")[1]) < s.nodes for n in nodes)
            zones = [int(n.split("-")[1]) % zones_n for n in nodes]
            assert max(zones.count(z) for z in range(zones_n)) - min(zones.count(z) for z in range(zones_n)) <= 1
    assert bs.pod_object(bs.Scenario("basic", 5, 5), 1, bs.BARE_SCHEDULER)["spec"]["schedulerName"] == "bench-bare"
    assert [s.name for s in bs.scenarios((1000, 5000), 10)] == ["basic_1000n", "basic_5000n", "spread_1000n"]
    assert bs.scheduler_argv("http://x")[:5] == [sys.executable, "-m", "scheduler.main", "--master", "http://x"]


def test_a_smoke_run_reports_rates_ratios_and_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bs, "scheduler_argv", lambda url: [sys.executable, str(STANDIN), url])
    report = bs.run(bc.Options(repeat=1, tiny=True), nodes=(12,), pods=48, concurrency=4)
    for name in ("basic_12n", "spread_12n"):
        fig = report.figures[f"{name}_pods_per_s"]
        assert fig["median"] > 0 and fig["baseline_median"] > 0 and math.isfinite(fig["ratio"])
        assert report.figures[f"{name}_p99_ms"]["median"] >= 0
    assert math.isfinite(report.figures["basic_12n_rss_total"]["median"])
    assert "basic_12n_rss_per_1000_nodes" in report.figures and report.units["basic_12n_pods_per_s"] == "pods/s"
    text = suite.render_text(suite._to_json(report))
    assert "basic_12n_pods_per_s" in text and "ratio" in text


def test_registered_in_the_suite() -> None:
    assert suite.BENCHMARKS["scheduler"].module == "tools.bench.scheduler"
