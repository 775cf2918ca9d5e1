"""Pure parts of fabric-tool diagnose and check: table diff, translations, last results, JUnit."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from tools.diagnose import check, diagnose

ROUTE = {"table": 200, "dst": "10.20.0.0/16", "link": "vx-bridge", "gateway": "100.82.0.13"}
FDB = {"link": "vx-bridge", "mac": "02:00:00:00:00:13", "dst": "198.18.0.13"}


def test_diff_tables_names_missing_extra_and_different_rows() -> None:
    desired = {"routes": [ROUTE, {**ROUTE, "dst": "10.97.0.0/20"}], "fdb": [FDB]}
    kernel = {
        "routes": [{**ROUTE, "gateway": "100.82.0.14"}, {**ROUTE, "dst": "10.30.0.0/16"}],
        "fdb": [FDB],
    }
    diffs = {d.table: d for d in diagnose.diff_tables(desired, kernel)}
    assert diffs["fdb"].ok and diffs["fdb"].matching == 1
    r = diffs["routes"]
    assert [m["dst"] for m in r.missing] == ["10.97.0.0/20"]
    assert [e["dst"] for e in r.extra] == ["10.30.0.0/16"]
    assert r.different == [(ROUTE, {**ROUTE, "gateway": "100.82.0.14"})]
    text = diagnose.render_state({"node": "east/e1"}, list(diffs.values()))
    assert "- missing   table=200 dst=10.97.0.0/20" in text
    assert "gateway: want 100.82.0.13 have 100.82.0.14" in text
    assert "differences in routes" in text


def test_translation_maps_addresses_inside_the_cidr_only() -> None:
    t = diagnose.Translation("global->real", "west", "10.121.0.0/16", "10.20.0.0/16")
    assert t.apply("10.121.3.7") == "10.20.3.7"
    assert t.apply("10.122.0.1") is None
    assert t.apply("fd00::1") is None


def _result(*pairs: tuple[str, str, bool]) -> check.CheckResult:
    return check.CheckResult(
        pods=[],
        pairs=[check.PairResult(s, d, "10.0.0.1", "icmp", ok, 0.1 if ok else None, None if ok else "no reply")
               for s, d, ok in pairs],
    )


def test_retest_failed_keeps_earlier_passes_and_narrows_jobs(tmp_path: Path) -> None:
    path = tmp_path / check.LAST_RESULTS
    with pytest.raises(ValueError, match="run 'fabric-tool check' first"):
        check.load_results(path)
    check.save_results(path, _result(("a", "b", True), ("a", "c", False), ("b", "c", False)))
    failed = {(p.src, p.dst) for p in check.load_results(path) if not p.ok}
    assert failed == {("a", "c"), ("b", "c")}
    pods = {n: check.Pod(n, f"ns-{n}", f"10.0.0.{i}") for i, n in enumerate("abc")}
    todo = check.restrict(check.jobs(list(pods.values())), failed)
    assert [(s.label, [d.label for d in ds]) for s, ds in todo] == [("a", ["c"]), ("b", ["c"])]
    # The retest fixes a->c only: b->c still failed, a->b still passed.
    check.save_results(path, _result(("a", "c", True), ("b", "c", False)), check.load_results(path))
    after = {(p.src, p.dst): p.ok for p in check.load_results(path)}
    assert after == {("a", "b"): True, ("a", "c"): True, ("b", "c"): False}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        check.load_results(path)


def test_junit_report_has_one_case_per_pair_and_the_failures() -> None:
    root = ET.fromstring(check.junit_xml(_result(("a", "b", True), ("a", "c", False))))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    failures = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert len(failures) == 1 and failures[0].get("classname") == "fabric-check.a"
    assert failures[0].find("failure").get("message") == "no reply"  # type: ignore[union-attr]
