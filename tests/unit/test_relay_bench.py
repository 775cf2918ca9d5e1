"""``fabric-tool bench control --relays K`` in its tiny configuration: the relay phase runs the
same agents behind K fabric-relay processes, beside the direct phase of the same run, and every
change still reaches exactly the agents the planner says it affects (a worker fails the run if an
agent it was not told about gets a delta, or one it was told about does not)."""

from __future__ import annotations

import json
from pathlib import Path

from tools.bench import suite as bench


def test_control_relay_phase_runs_beside_the_direct_one(tmp_path: Path) -> None:
    out = tmp_path / "control.json"
    argv = ["control", "--tiny", "--repeat", "1", "--n", "20", "--shape", "gateway", "--relays", "2",
            "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    control = json.loads(out.read_text())["control"]
    for metric in ("bringup", "in_sync", "join_fanout_p99", "reflector_rss_per_agent",
                   "reflector_bringup_cpu_per_agent", "reflector_cpu_per_change"):  # fmt: skip
        fig = control[f"relays2_{metric}_gateway_n20"]
        assert {"median", "baseline_median", "ratio", "unit"} <= fig.keys(), metric
    for metric in ("bringup", "join_fanout_p99"):
        fig = control[f"relays2_{metric}_gateway_n20"]
        assert fig["median"] > 0 and fig["baseline_median"] > 0, metric
    notes = "\n".join(control["notes"])
    assert "gateway N=20: direct vs via 2 relays: bring-up" in notes
    # The direct figures are still there, beside their bare baseline.
    assert control["bringup_gateway_n20"]["baseline_median"] > 0
