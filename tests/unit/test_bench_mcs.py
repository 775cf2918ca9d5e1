"""``fabric-tool bench mcs``: its pure pieces (what a change writes, what the watches match, who
exports what) and a ``--tiny`` run end to end (kubeemu and kosmos-mcs processes on 127.0.0.1)
that writes every JSON key. No figure is asserted: the figures are for reading beside their
same-run baseline."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from mcs import kube as mk
from tools.bench import mcs as bm
from tools.bench import suite

pytestmark = pytest.mark.unit


def test_every_change_changes_the_slice_and_adds_only_fresh_addresses() -> None:
    rng = random.Random(1)
    s = bm.Slice("m01", "svc-007", bm.slice_body(1, 7, "svc-007"))
    seen = {a for ep in s.obj["endpoints"] for a in ep["addresses"]}
    ops = set()
    for _ in range(200):
        before = bm.fingerprint(s.obj["endpoints"])
        op, eps = bm.change(rng, s, 1, 7)
        ops.add(op)
        assert bm.fingerprint(eps) != before, op
        assert eps, "a slice keeps at least one endpoint"
        if op == "add":
            fresh = eps[-1]["addresses"][0]
            assert fresh not in seen
            seen.add(fresh)
        s.obj = {**s.obj, "endpoints": eps}
    assert ops == {"flip", "add", "remove"}


def test_fingerprint_reads_readiness_as_kube_proxy_does_and_keys_tell_ours_from_the_exporters() -> None:
    eps: list[dict[str, Any]] = [{"addresses": ["10.0.0.1"]},
                                 {"addresses": ["10.0.0.2"], "conditions": {"ready": False}}]
    assert bm.fingerprint(eps) == ((("10.0.0.1",), True), (("10.0.0.2",), False)) == bm.fingerprint(eps[::-1])
    own = bm.slice_body(0, 3, "svc-003")
    assert bm.slice_key(own) == ("own", bm.NS, "svc-003-own")
    derived = {"metadata": {"namespace": bm.NS, "name": "x", "labels": {
        mk.APP_MANAGED_BY_LABEL: mk.MANAGED_BY, mk.MCS_SERVICE_NAME_LABEL: "svc-003",
        mk.SOURCE_CLUSTER_LABEL: "m00"}}}
    assert bm.slice_key(derived) == ("imp", bm.NS, "svc-003", "m00")


def test_services_spread_over_the_exporters_some_with_two() -> None:
    owners = [bm.exporters(i, 10) for i in range(100)]
    assert {o[0] for o in owners} == set(range(10))
    assert sum(len(o) == 2 for o in owners) == 20
    assert all(len(set(o)) == len(o) for o in owners)
    assert bm.exporters(0, 1) == [0]
    addresses = {bm.address(c, s, h) for c in range(10) for s in range(100) for h in range(bm.ENDPOINTS)}
    assert len(addresses) == 10 * 100 * bm.ENDPOINTS


def test_tiny_run_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "mcs.json"
    assert suite.main(["mcs", "--tiny", "--repeat", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())["mcs"]
    for key in ("import_p50_ms", "import_p99_ms"):
        assert {"median", "min", "max", "baseline_median", "ratio", "unit"} <= set(doc[key]), key
    for key in ("watch_p50_ms", "watch_p99_ms", "write_p50_ms", "passes_per_s", "passes_per_change", "pass_ms",
                "controller_cpu_percent", "controller_cpu_ms_per_change"):
        assert "median" in doc[key], key
    assert doc["import_p99_ms"]["median"] is not None and math.isfinite(doc["import_p99_ms"]["median"])
    assert any("aim p99" in n for n in doc["notes"])
