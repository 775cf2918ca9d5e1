"""``fabric-tool bench leafview`` in its tiny configuration: it runs through the suite's entry point,
every metric has ours beside the brute-force oracle of the same run, and a wrong answer aborts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tools.bench import common as bc
from tools.bench import leafview as bench_leafview
from tools.bench import suite as bench

pytestmark = pytest.mark.unit


def test_the_tiny_run_reports_every_metric_beside_the_oracle(tmp_path: Path) -> None:
    out = tmp_path / "leafview.json"
    assert bench.main(["leafview", "--tiny", "--repeat", "1", "--nodes", "120", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())["leafview"]
    for metric in ("fits", "count", "fits_cold", "update", "record", "assume"):
        for stat in ("median", "p99"):
            fig = doc[f"{metric}_{stat}_us_120"]
            assert fig["median"] > 0 and fig["baseline_median"] > 0 and math.isfinite(fig["ratio"])


def test_a_wrong_answer_aborts_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_leafview.Oracle, "count", lambda self, q: -1)
    with pytest.raises(AssertionError, match=r"count #0: ours \d+ != oracle -1"):
        bench_leafview.run(bc.Options(repeat=1, tiny=True, sched_nodes=(50,)))
