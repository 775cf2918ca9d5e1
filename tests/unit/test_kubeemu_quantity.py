"""Kubernetes quantities and the kubelet's admission arithmetic (kubeemu.quantity, kubeemu.runtime.admission)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from kubeemu import quantity
from kubeemu.runtime import admission


@pytest.mark.parametrize(("text", "exact"), [
    ("4", Fraction(4)), ("500m", Fraction(1, 2)), ("1.5", Fraction(3, 2)), ("8Gi", Fraction(8 * 2**30)),
    ("1k", Fraction(1000)), ("1Ki", Fraction(1024)), ("2e3", Fraction(2000)), ("1E3", Fraction(1000)),
    ("100n", Fraction(1, 10**7)), ("250u", Fraction(1, 4000)), ("-1", Fraction(-1)), (".5", Fraction(1, 2)),
    ("1M", Fraction(10**6)), ("1Mi", Fraction(2**20)), (110, Fraction(110)), ("3E", Fraction(3 * 10**18)),
])
def test_parse(text: str | int, exact: Fraction) -> None:
    assert quantity.parse(text) == exact


@pytest.mark.parametrize("bad", ["", "1.2.3", "Gi", "1gi", "1 Gi", "one", "1KiB", "1e", "--1"])
def test_parse_refuses(bad: str) -> None:
    with pytest.raises(quantity.QuantityError, match="is not a quantity"):
        quantity.parse(bad)


def test_rounding_is_upstreams() -> None:
    assert quantity.milli_value("1") == 1000
    assert quantity.milli_value("0.0001") == 1  # MilliValue rounds up
    assert quantity.value("1.2") == 2
    assert quantity.scaled("cpu", "250m") == 250
    assert quantity.scaled("memory", "1Mi") == 2**20
    assert quantity.format_value("cpu", 4000) == "4"
    assert quantity.format_value("cpu", 1500) == "1500m"
    assert quantity.format_value("memory", 8 * 2**30) == "8Gi"
    assert quantity.format_value("pods", 110) == "110"


def test_node_capacity_defaults_and_extended() -> None:
    cap = admission.node_capacity("n1", {"cpu": "2", "example.com/gpu": 2})
    assert cap == {"cpu": 2000, "memory": 8 * 2**30, "pods": 110, "ephemeral-storage": 50 * 2**30,
                   "example.com/gpu": 2}
    assert admission.render(cap)["memory"] == "8Gi"


@pytest.mark.parametrize(("declared", "fragment"), [
    ({"cpu": "lots"}, "node n1: resources.cpu: 'lots' is not a quantity"),
    ({"gpu": 1}, "node n1: resource 'gpu' is neither"),
    ({"pods": "1.5"}, "node n1: resources.pods: '1.5' must be a whole number"),
    ({"memory": "-1Gi"}, "negative"),
])
def test_node_capacity_errors_name_node_and_value(declared: dict[str, object], fragment: str) -> None:
    with pytest.raises(admission.CapacityError, match=fragment.replace("(", r"\(")):
        admission.node_capacity("n1", declared)


def _pod(*containers: dict[str, object], init: list[dict[str, object]] | None = None,
         overhead: dict[str, str] | None = None) -> dict[str, object]:
    spec: dict[str, object] = {"containers": [{"name": f"c{i}", "resources": c} for i, c in enumerate(containers)]}
    if init:
        spec["initContainers"] = [{"name": f"i{i}", **c} for i, c in enumerate(init)]
    if overhead:
        spec["overhead"] = overhead
    return {"spec": spec}


def test_pod_requests_is_max_of_sum_and_init_plus_overhead() -> None:
    p = _pod({"requests": {"cpu": "100m", "memory": "1Gi"}}, {"requests": {"cpu": "200m"}},
             init=[{"resources": {"requests": {"cpu": "1"}}}, {"resources": {"requests": {"memory": "512Mi"}}}],
             overhead={"cpu": "10m"})
    assert admission.pod_requests(p) == {"cpu": 1010, "memory": 2**30}
    # A request defaults to the limit (API defaulting).
    assert admission.pod_requests(_pod({"limits": {"cpu": "2"}})) == {"cpu": 2000}
    # A sidecar (init container with restartPolicy Always) adds to the app containers.
    side = _pod({"requests": {"cpu": "1"}}, init=[{"restartPolicy": "Always", "resources": {"requests": {"cpu": "1"}}}])
    assert admission.pod_requests(side) == {"cpu": 2000}


def test_fits_reports_first_shortfall_like_upstream() -> None:
    alloc = admission.node_capacity("n", {"cpu": "4", "pods": 3, "example.com/gpu": 1})
    big = _pod({"requests": {"cpu": "5"}})
    r = admission.fits(big, [], alloc)
    assert r is not None and r.reason == "OutOfcpu"
    assert r.message == ("Pod was rejected: Node didn't have enough resource: cpu, requested: 5000, used: 0, "
                         "capacity: 4000")
    three = _pod({"requests": {"cpu": "3"}})
    assert admission.fits(three, [], alloc) is None
    r = admission.fits(_pod({"requests": {"cpu": "1500m"}}), [three], alloc)
    assert r is not None and (r.requested, r.used, r.capacity) == (1500, 3000, 4000)
    r = admission.fits(_pod({"requests": {"memory": "9Gi"}}), [], alloc)
    assert r is not None and r.reason == "OutOfmemory"
    r = admission.fits(_pod({}), [_pod({}), _pod({}), _pod({})], alloc)
    assert r is not None and r.reason == "OutOfpods" and r.message.endswith("pods, requested: 1, used: 3, capacity: 3")
    r = admission.fits(_pod({"requests": {"example.com/gpu": "2"}}), [], alloc)
    assert r is not None and r.reason == "OutOfexample.com/gpu"
    # An extended resource the node lacks is not the kubelet's to judge (removeMissingExtendedResources).
    assert admission.fits(_pod({"requests": {"other.io/fpga": "1"}}), [], alloc) is None
    r = admission.fits(_pod({"requests": {"ephemeral-storage": "51Gi"}}), [], alloc)
    assert r is not None and r.reason == "OutOfephemeral-storage"
