"""Fuzzing the emulator's request bodies (issue 20 item 5): kubeemu's API server answers any
create, update or patch body with a Status, never a 500 or a crash, and keeps what it stores valid.

One emulated API server per test (:class:`kubeemu.runner.ServerThread` on 127.0.0.1) with the
fabric's Cluster CRD installed and a seed Pod, ConfigMap and Cluster; every example is one
request over a kept-alive HTTP connection:

* ``POST`` (create), ``PUT`` (update of a seed) or ``PATCH`` of a seed as a merge patch, a
  strategic merge patch (built-in kinds; custom resources: 415 as upstream), a JSON patch or an
  apply patch;
* a body that is random JSON, a valid body (the seed, or a patch of it) with one to three
  structural mutations (:func:`tests.unit.test_fuzz_config.mutated`), or those bytes mutated.

What must hold: the status is below 500; a 4xx answer is a ``Status`` whose ``code`` is the HTTP
status and whose ``reason`` is set; and afterwards every stored object of the three kinds is
still one the server accepts: its ``PUT`` back, unchanged, succeeds (a body that slipped past
validation into the store would fail here, or on a later write).

Budget: :mod:`tests.fuzzing`.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kubeemu.runner import ServerThread
from tests.fuzzing import budget
from tests.unit.test_fuzz_config import NEAR_MISSES, VALUES, mutated

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "deploy" / "base" / "host" / "crd-clusters.yaml"

#: The kinds fuzzed: collection path, and a seed object of each.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "pod": ("/api/v1/namespaces/default/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "seed", "labels": {"app": "a"}},
        "spec": {"containers": [{"name": "c", "image": "busybox", "ports": [{"containerPort": 80}],
                                 "env": [{"name": "A", "value": "1"}]}]}}),
    "configmap": ("/api/v1/namespaces/default/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "seed", "annotations": {"a": "b"}},
        "data": {"k": "v"}, "binaryData": {"b": "AAEC"}}),
    "cluster": ("/apis/kosmos.io/v1alpha1/clusters", {
        "apiVersion": "kosmos.io/v1alpha1", "kind": "Cluster", "metadata": {"name": "seed"},
        "spec": {"clusterLinkOptions": {"networkType": "p2p", "podCIDRs": ["10.10.0.0/16"], "gatewayCandidates": ["n1"],
                                        "globalCIDRsMap": {"10.10.0.0/16": "100.1.0.0/16"}},
                 "clusterTreeOptions": {"enable": True}}}),
}  # fmt: skip
PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}
#: Valid patches of the seeds, to mutate.
PATCH_SEEDS: dict[str, list[Any]] = {
    "merge": [{"metadata": {"labels": {"x": "y"}}}, {"data": {"k": None, "n": "1"}}, {"spec": {"containers": None}},
              {"spec": {"clusterLinkOptions": {"podCIDRs": ["10.11.0.0/16"]}}}],
    "strategic": [{"metadata": {"labels": {"$patch": "replace", "x": "y"}}},
                  {"spec": {"containers": [{"name": "c", "image": "nginx"}]}},
                  {"spec": {"$setElementOrder/containers": [{"name": "c"}],
                            "containers": [{"name": "c", "$patch": "delete"}]}},
                  {"data": {"$retainKeys": ["k"]}}],
    "json": [[{"op": "add", "path": "/metadata/labels/x", "value": "y"}], [{"op": "remove", "path": "/data/k"}],
             [{"op": "replace", "path": "/spec/containers/0/image", "value": "nginx"}],
             [{"op": "test", "path": "/metadata/name", "value": "seed"},
              {"op": "move", "from": "/data/k", "path": "/data/z"}],
             [{"op": "copy", "from": "/metadata/labels", "path": "/metadata/annotations"}]],
    "apply": [],  # the seeds themselves (see requests())
}  # fmt: skip


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
             ctype: str = "application/json") -> tuple[int, Any]:  # fmt: skip
    headers = {"Content-Type": ctype, "Accept": "application/json"}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = raw
    return resp.status, doc


class Emu:
    """The server of one test and a kept-alive connection to it."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def call(self, method: str, path: str, body: bytes | None, ctype: str = "application/json") -> tuple[int, Any]:
        try:
            return _request(self.conn, method, path, body, ctype)
        except (http.client.HTTPException, OSError):  # the server closed the kept-alive connection
            self.conn.close()
            return _request(self.conn, method, path, body, ctype)

    def seed(self) -> None:
        for path, obj in KINDS.values():
            code, doc = self.call("POST", path, json.dumps(obj).encode())
            assert code == 201, doc

    def still_valid(self, kind: str, after: str) -> None:
        """Every stored object of ``kind`` is one the server accepts unchanged."""
        for path, _ in [KINDS[kind]]:
            code, doc = self.call("GET", path, None)
            assert code == 200, (after, doc)
            for item in doc["items"]:
                meta = item["metadata"]
                assert isinstance(meta["name"], str) and meta["resourceVersion"].isdigit(), (after, item)
                item.setdefault("apiVersion", doc["apiVersion"])
                item.setdefault("kind", doc["kind"].removesuffix("List"))
                code, back = self.call("PUT", f"{path}/{meta['name']}", json.dumps(item).encode())
                if code != 200:
                    pytest.fail(f"after {after}: the stored object, put back unchanged, is refused: {back}\n"
                                f"{json.dumps(item)}")


@pytest.fixture
def emu() -> Iterator[Emu]:
    with ServerThread(name="fuzz", bookmark_interval=60) as s:
        e = Emu(s)
        code, doc = e.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                           json.dumps(yaml.safe_load(CRD.read_text())).encode())  # fmt: skip
        assert code == 201, doc
        e.seed()
        yield e
        e.conn.close()


def _check_answer(code: int, doc: Any, what: str) -> None:
    assert code < 500, (what, code, doc)
    if code >= 400:
        assert isinstance(doc, dict) and doc.get("kind") == "Status", (what, code, doc)
        assert doc.get("code") == code and doc.get("reason") and doc.get("message"), (what, code, doc)


@st.composite
def _bytes_mutated(draw: st.DrawFn, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(("flip", "insert", "truncate")))
        if op == "flip" and pos < len(data):
            data[pos] = draw(st.sampled_from(b'{}[]":,\\0 \xff'))
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from((b"{", b"]", b'"', b"\\u", b"1e999", b"null", b"\xc3", b"-")))
        else:
            del data[pos:]
    return bytes(data)


def _encoded(doc_strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON of the documents, sometimes with its bytes mutated (a body that does not parse)."""
    as_json = doc_strategy.map(lambda d: json.dumps(d, default=str).encode())
    return st.one_of(as_json, as_json.flatmap(_bytes_mutated))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, str, bytes, str]:
    """(kind, method, path, body, content type) of one fuzz request."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    collection, seed = KINDS[kind]
    verb = draw(st.sampled_from(("create", "update", "patch", "patch")))
    if verb == "create":
        body = draw(_encoded(st.one_of(mutated([dict(seed, metadata={"name": "fuzz"})]), VALUES)))
        return kind, "POST", collection, body, "application/json"
    if verb == "update":
        return kind, "PUT", f"{collection}/seed", draw(_encoded(st.one_of(mutated([seed]), VALUES))), "application/json"
    ptype = draw(st.sampled_from(sorted(PATCH_TYPES)))
    seeds = PATCH_SEEDS[ptype] or [seed]
    body = draw(_encoded(st.one_of(mutated(seeds), VALUES, st.sampled_from(NEAR_MISSES))))
    return kind, "PATCH", f"{collection}/seed", body, PATCH_TYPES[ptype]


@pytest.mark.fuzz
def test_request_bodies(emu: Emu) -> None:
    @budget()
    @given(requests())
    def prop(req: tuple[str, str, str, bytes, str]) -> None:
        kind, method, path, body, ctype = req
        what = f"{method} {path} {ctype} {body[:300]!r}"
        code, doc = emu.call(method, path, body, ctype)
        _check_answer(code, doc, what)
        emu.still_valid(kind, what)
        if method == "POST" and code == 201:  # the next create starts from the same state
            name = doc["metadata"]["name"]
            code, doc = emu.call("DELETE", f"{path}/{name}", b'{"gracePeriodSeconds": 0}')
            assert code in (200, 202), doc
        # The seed back if it went: an apply patch may create one anew, or the pod garbage
        # collector delete a pod the fuzzing bound to a node that does not exist (as upstream).
        collection, seed = KINDS[kind]
        code, cur = emu.call("GET", f"{collection}/seed", None)
        if code == 404:
            code, cur = emu.call("POST", collection, json.dumps(seed).encode())
        assert code in (200, 201), (what, cur)

    prop()


# ---------------------------------------------------------------------------------------------
# The crashes the fuzzing found, as plain examples
# ---------------------------------------------------------------------------------------------


def test_an_apply_patch_that_is_not_yaml_is_400(emu: Emu) -> None:
    code, doc = emu.call("PATCH", "/apis/kosmos.io/v1alpha1/clusters/seed", b'{"', PATCH_TYPES["apply"])
    _check_answer(code, doc, "apply")
    assert code == 400 and "could not be decoded" in doc["message"], doc


def test_a_field_name_with_a_control_character_is_escaped_in_the_warning(emu: Emu) -> None:
    body = json.dumps(dict(KINDS["configmap"][1], metadata={"name": "seed"}, **{"bad\x1f\r\nX-Injected: 1": 1}))
    emu.conn.request("PUT", "/api/v1/namespaces/default/configmaps/seed", body=body.encode(),
                     headers={"Content-Type": "application/json"})  # fmt: skip
    resp = emu.conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert resp.getheader("X-Injected") is None
    assert resp.getheader("Warning") == '299 - "unknown field \\"bad\\\\u001f\\\\r\\\\nX-Injected: 1\\""'


@pytest.mark.parametrize(("metadata", "field", "types"), [
    ({"name": 1}, "metadata.name", "number into Go struct field ObjectMeta.metadata.name of type string"),
    ({"name": "m", "labels": ["a"]}, "labels", "array into Go struct field ObjectMeta.metadata.labels of type map"),
    ({"name": "m", "annotations": {"a": 1}}, "annotations", "number into Go struct field ObjectMeta.metadata.annot"),
    ({"name": "m", "finalizers": "x"}, "finalizers", "string into Go struct field ObjectMeta.metadata.finalizers"),
    ({"name": "m", "generation": "1"}, "generation", "string into Go struct field ObjectMeta.metadata.generation"),
])  # fmt: skip
def test_metadata_of_the_wrong_type_is_400_naming_the_field(
    emu: Emu, metadata: dict[str, Any], field: str, types: str
) -> None:
    for kind in ("pod", "cluster"):
        collection, seed = KINDS[kind]
        code, doc = emu.call("POST", collection, json.dumps(dict(seed, metadata=metadata)).encode())
        assert code == 400 and types in doc["message"], (kind, doc)
        code, doc = emu.call("PATCH", f"{collection}/seed", json.dumps({"metadata": metadata}).encode(),
                             PATCH_TYPES["merge"])  # fmt: skip
        assert code == 400 and types in doc["message"], (kind, doc)
    emu.still_valid("pod", "the refused writes")


@pytest.mark.parametrize(("ptype", "patch", "says"), [
    ("json", [{"op": "add", "path": [], "value": "y"}], "is not a JSON pointer"),
    ("strategic", {"metadata": {"$retainKeys": [["name"]]}}, "$retainKeys"),
    ("strategic", {"metadata": {"$deleteFromPrimitiveList/finalizers": 5}}, "is not a list"),
])  # fmt: skip
def test_patch_directives_of_the_wrong_shape_are_400(emu: Emu, ptype: str, patch: Any, says: str) -> None:
    code, doc = emu.call("PATCH", f"{KINDS['pod'][0]}/seed", json.dumps(patch).encode(), PATCH_TYPES[ptype])
    assert code == 400 and says in doc["message"], doc


def test_an_update_with_null_metadata_is_not_a_500(emu: Emu) -> None:
    collection, seed = KINDS["cluster"]
    code, doc = emu.call("PUT", f"{collection}/seed", json.dumps(dict(seed, metadata=None)).encode())
    assert code == 200 and doc["metadata"]["name"] == "seed", doc


@pytest.mark.parametrize(("spec", "says"), [
    ({"containers": [None, 1.5]}, "spec.containers[0]: null where an object belongs"),
    ({"containers": [{"name": "c", "image": "i", "ports": {"containerPort": 80}}]},
     "spec.containers[0].ports: an object where an array belongs"),
    ({"containers": [{"name": ["c"], "image": "i"}]}, "spec.containers[0].name: an array where a string belongs"),
])  # fmt: skip
def test_a_body_of_the_wrong_json_types_is_400_not_stored(emu: Emu, spec: dict[str, Any], says: str) -> None:
    collection, seed = KINDS["pod"]
    code, doc = emu.call("POST", collection, json.dumps(dict(seed, metadata={"name": "typed"}, spec=spec)).encode())
    assert code == 400 and says in doc["message"], doc
    patch = [{"op": "replace", "path": "/spec", "value": spec}]
    code, doc = emu.call("PATCH", f"{collection}/seed", json.dumps(patch).encode(), PATCH_TYPES["json"])
    assert code == 400 and says in doc["message"], doc
    emu.still_valid("pod", "the refused writes")
