"""fabric-tool check without a kernel: worker output parsing, the matrix, the JSON shape, and
the probe worker's request validation."""

from __future__ import annotations

import json

import pytest

from tools.diagnose import check, probe

PODS = [
    check.Pod("east/e1/p0", "kf-east-e1-p0", "10.10.0.2"),
    check.Pod("east/e1/p1", "kf-east-e1-p1", "10.10.0.3"),
    check.Pod("west/w1/p0", "kf-west-w1-p0", "10.20.0.2"),
]


def _worker_doc(src: check.Pod, ok: dict[str, bool]) -> str:
    results = []
    for d in PODS:
        if d is src:
            continue
        good = ok.get(d.label, True)
        results.append(
            {
                "dst_ip": d.ip,
                "proto": "icmp",
                "ok": good,
                "rtt_ms": 0.05 if good else None,
                "sent": 1,
                "received": int(good),
                "error": None if good else "no reply within 1 s (1 sent)",
            }
        )
    return json.dumps({"pid": 1, "results": results})


def _dsts(src: check.Pod) -> list[check.Pod]:
    return [d for d in PODS if d is not src]


def _result(cross_ok: bool) -> check.CheckResult:
    pairs: list[check.PairResult] = []
    for src in PODS:
        verdict = {d.label: cross_ok or d.cluster == src.cluster for d in PODS}
        pairs += check.parse_worker_output(src, _dsts(src), _worker_doc(src, verdict), "", 0)
    return check.CheckResult(PODS, pairs, 1.25)


def test_worker_output_becomes_pairs() -> None:
    src = PODS[0]
    pairs = check.parse_worker_output(src, _dsts(src), _worker_doc(src, {"west/w1/p0": False}), "", 0)
    assert [(p.src, p.dst, p.dst_ip, p.ok) for p in pairs] == [
        ("east/e1/p0", "east/e1/p1", "10.10.0.3", True),
        ("east/e1/p0", "west/w1/p0", "10.20.0.2", False),
    ]
    assert pairs[0].rtt_ms == 0.05 and pairs[0].error is None
    assert pairs[1].error == "no reply within 1 s (1 sent)"


@pytest.mark.parametrize(
    ("stdout", "stderr", "rc", "needle"),
    [
        ("", "Traceback ...\nModuleNotFoundError: No module named 'scapy'", 1, "No module named 'scapy'"),
        ('{"error": "bad probe request: targets"}', "", 2, "bad probe request"),
        ('{"results": []}', "", 0, "expected 2 results"),
        ("", "", None, "probe worker timed out"),
    ],
)
def test_a_broken_worker_fails_each_of_its_pairs_with_the_reason(
    stdout: str, stderr: str, rc: int | None, needle: str
) -> None:
    src = PODS[0]
    pairs = check.parse_worker_output(src, _dsts(src), stdout, stderr, rc)
    assert len(pairs) == 2
    assert not any(p.ok for p in pairs)
    assert all(needle in (p.error or "") for p in pairs)


def test_a_result_for_the_wrong_destination_is_not_trusted() -> None:
    src = PODS[0]
    doc = json.loads(_worker_doc(src, {}))
    doc["results"][1]["dst_ip"] = "10.99.0.1"
    pairs = check.parse_worker_output(src, _dsts(src), json.dumps(doc), "", 0)
    assert pairs[0].ok and not pairs[1].ok and "malformed result" in (pairs[1].error or "")


def test_json_document_shape() -> None:
    doc = _result(cross_ok=False).to_json()
    assert doc["passed"] == 2 and doc["failed"] == 4
    assert len(doc["pairs"]) == 6
    first = doc["pairs"][0]
    # Dual stack (issue 5): every pair names its address family; the document lists not-expected pairs.
    assert set(first) == {"src", "dst", "dst_ip", "proto", "ok", "rtt_ms", "error", "family"}
    assert first == {
        "src": "east/e1/p0", "dst": "east/e1/p1", "dst_ip": "10.10.0.3", "proto": "icmp", "ok": True,
        "rtt_ms": 0.05, "error": None, "family": 4,
    }  # fmt: skip
    assert doc["not_expected"] == []
    json.dumps(doc)


def test_matrix_marks_each_pair_in_its_cell() -> None:
    text = check.render_matrix(_result(cross_ok=False), marks=("Y", "N", "-"))
    lines = text.splitlines()
    assert lines[0].split() == ["src", "1", "2", "3", "dst"]
    rows = {ln.split()[1]: ln.split()[3:] for ln in lines[1:] if ln.split() and ln.split()[0].isdigit()}
    assert rows == {
        "east/e1/p0": ["-", "Y", "N"],
        "east/e1/p1": ["Y", "-", "N"],
        "west/w1/p0": ["N", "N", "-"],
    }
    assert "east/e1/p0 -> west/w1/p0 (10.20.0.2, icmp): no reply within 1 s (1 sent)" in text
    assert lines[-1].startswith("2/6 pairs passed (icmp), 4 FAILED, 3 pods")
    assert all(len(ln) < 80 for ln in lines if not ln.startswith("  "))


def test_matrix_of_a_passing_check() -> None:
    result = _result(cross_ok=True)
    assert result.ok
    text = check.render_matrix(result, marks=("Y", "N", "-"))
    assert "failed pairs" not in text
    assert " N" not in text
    assert text.splitlines()[-1].startswith("6/6 pairs passed (icmp), all pairs passed")


def test_an_empty_check_is_not_a_pass() -> None:
    assert not check.CheckResult([], [], 0.0).ok


def test_default_lab_matrix_fits_80_columns() -> None:
    pods = [check.Pod(f"{c}/{c[0]}{n}/p{p}", "x", f"10.{i}.{n}.{p + 2}")
            for i, c in enumerate(("east", "west"), 1) for n in (1, 2) for p in (0, 1)]  # fmt: skip
    pairs = [
        check.PairResult(s.label, d.label, d.ip, "icmp", True, 0.1, None) for s in pods for d in pods if s is not d
    ]
    lines = check.render_matrix(check.CheckResult(pods, pairs, 1.0)).splitlines()
    assert max(len(ln) for ln in lines) < 80


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ([], "must be a JSON object"),
        ({"targets": "10.0.0.1"}, "is not a list of addresses"),
        ({"targets": ["10.0.0.1"], "timeout": 0}, "timeout: 0 must be a positive"),
        ({"targets": ["10.0.0.1"], "count": 0}, "count: 0 must be a positive integer"),
    ],
)
def test_probe_request_validation(doc: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        probe.parse_request(doc)


def test_probe_request_defaults() -> None:
    assert probe.parse_request({"targets": ["10.0.0.1", "10.0.0.2"]}) == (["10.0.0.1", "10.0.0.2"], 2.0, 1)
    with pytest.raises(OSError):
        probe.parse_request({"targets": ["not-an-ip"]})
