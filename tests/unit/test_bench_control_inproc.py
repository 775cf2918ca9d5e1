"""``python -m tools.bench.control.inproc`` at a tiny N: it still drives the reflector's state
machine to the end (the harness reaches into reflector internals, so a change there breaks it
silently unless something runs it) and its figures are consistent with each other and with N.

No timed asserts: the figures are checked for sign and arithmetic consistency only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tools.bench.control import inproc

NS = (20, 50)
PER_JOIN = ("flush", "plan", "union", "changes", "snap", "admit", "drain", "reach", "block")


@pytest.mark.parametrize("shape", ["gateway", "p2p"])
def test_every_agent_is_adopted_and_the_figures_add_up(
    shape: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "inproc.json"
    argv = ["--shape", shape, "--n", *map(str, NS), "--block", "10", "--per-turn", "5", "--json", str(out)]
    assert inproc.main(argv) == 0
    results: list[dict[str, Any]] = json.loads(out.read_text())
    assert [r["n"] for r in results] == list(NS)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # stdout: each run's rows as they come, then its summary (the result without the rows).
    assert printed == [x for r in results for x in (*r["rows"], {k: v for k, v in r.items() if k != "rows"})]
    for res in results:
        n = res["n"]
        assert res["shape"] == shape and res["adopted"] == n, res  # every agent adopted
        rows = res["rows"]
        adopted = [r["adopted"] for r in rows]
        assert rows and adopted == sorted(set(adopted)) and adopted[-1] == n and adopted[0] > 0, adopted
        for r in rows:
            assert all(r[f"{k}_ms_per_join"] >= 0 for k in PER_JOIN), r
            assert r["block_ms_per_join"] > 0 and r["flushes"] >= 0, r
        assert [r["wall_s"] for r in rows] == sorted(r["wall_s"] for r in rows)
        assert rows[-1]["wall_s"] <= res["bring_up_s"]
        # Adopting anyone takes a flush; the rows' flushes are part of the run's.
        assert 1 <= sum(r["flushes"] for r in rows) <= res["flushes"]
        assert res["ms_per_join"] > 0
        # ms_per_join is bring_up_s per agent (each rounded: bring_up_s to 10 ms).
        assert res["ms_per_join"] * n / 1000 == pytest.approx(res["bring_up_s"], abs=0.0051)
        assert res["bytes_sent"] > 0
    # Every agent gets at least its snapshot: more agents, more bytes.
    assert results[1]["bytes_sent"] > results[0]["bytes_sent"]
