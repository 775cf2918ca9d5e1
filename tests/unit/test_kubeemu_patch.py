"""kubeemu's pure pieces: the three patch flavours, the one dispatch on a PATCH's media type, and the
selector parsers."""

from __future__ import annotations

import pytest

from kubeemu import selectors
from kubeemu.errors import ApiError
from kubeemu.patch import PatchError, json_patch, merge_patch, patched, strategic_merge_patch


def test_merge_patch_nulls_delete_and_lists_replace() -> None:
    orig = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    assert merge_patch(orig, {"a": {"b": None, "d": 3}, "l": [3]}) == {"a": {"c": 2, "d": 3}, "l": [3]}
    assert orig == {"a": {"b": 1, "c": 2}, "l": [1, 2]}  # inputs untouched


def test_strategic_merge_directives() -> None:
    orig = {"spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}]}, {"name": "b"}],
                     "tolerations": [{"key": "x"}]},
            "metadata": {"finalizers": ["f1"]}, "status": {"addresses": [{"type": "InternalIP", "address": "1"}]}}
    out = strategic_merge_patch(orig, {
        "spec": {"containers": [{"name": "b", "$patch": "delete"}, {"name": "a", "ports": [{"containerPort": 81}]}],
                 "tolerations": [{"key": "y"}]},
        "metadata": {"finalizers": ["f2"]},
        "status": {"addresses": [{"type": "Hostname", "address": "h"}]}})
    assert out["spec"]["containers"] == [{"name": "a", "ports": [{"containerPort": 80}, {"containerPort": 81}]}]
    assert out["spec"]["tolerations"] == [{"key": "y"}]  # no merge key: replaced
    assert out["metadata"]["finalizers"] == ["f1", "f2"]
    assert [a["type"] for a in out["status"]["addresses"]] == ["InternalIP", "Hostname"]
    assert strategic_merge_patch(orig, {"spec": {"$patch": "replace", "x": 1}})["spec"] == {"x": 1}
    assert "spec" not in strategic_merge_patch(orig, {"spec": {"$patch": "delete"}})
    with pytest.raises(PatchError):
        strategic_merge_patch(orig, {"spec": {"containers": [{"image": "no-name"}]}})


def test_json_patch_ops_and_failures() -> None:
    doc = {"a": [1, 2], "b": {"c/d": 1}}
    out = json_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}, {"op": "move", "from": "/b/c~1d",
                                                                        "path": "/e"},
                           {"op": "copy", "from": "/e", "path": "/f"}, {"op": "replace", "path": "/a/0",
                                                                        "value": 0}])
    assert out == {"a": [0, 2, 3], "b": {}, "e": 1, "f": 1}
    with pytest.raises(PatchError) as ei:
        json_patch(doc, [{"op": "test", "path": "/a/0", "value": 9}])
    assert ei.value.invalid
    with pytest.raises(PatchError) as ei:
        json_patch(doc, [{"op": "remove", "path": "/nope"}])
    with pytest.raises(PatchError) as ei:
        json_patch(doc, {"op": "add"})
    assert not ei.value.invalid


def test_patched_dispatches_on_the_media_type_with_upstreams_answers() -> None:
    cur = {"metadata": {"name": "x", "resourceVersion": "7", "finalizers": ["a"]}, "spec": {"n": 1}}
    smp = {"metadata": {"finalizers": ["b"]}}
    # strategic merges the finalizers; merge patch (and apply without strategic) replaces them
    assert patched("application/strategic-merge-patch+json; charset=utf-8", cur, smp,
                   strategic=True)["metadata"]["finalizers"] == ["a", "b"]
    assert patched("application/apply-patch+yaml", cur, smp, strategic=True)["metadata"]["finalizers"] == ["a", "b"]
    assert patched("application/apply-patch+yaml", cur, smp, strategic=False)["metadata"]["finalizers"] == ["b"]
    assert patched("application/merge-patch+json", cur, smp, strategic=True)["metadata"]["finalizers"] == ["b"]
    out = patched("application/json-patch+json", cur, [{"op": "replace", "path": "/spec/n", "value": 2}],
                  strategic=False)
    # an untouched resourceVersion is dropped (no precondition); one the patch sets stays
    assert out == {"metadata": {"name": "x", "finalizers": ["a"]}, "spec": {"n": 2}}
    assert patched("application/merge-patch+json", cur, {"metadata": {"resourceVersion": "6"}},
                   strategic=False)["metadata"]["resourceVersion"] == "6"
    assert cur["metadata"]["resourceVersion"] == "7"  # input untouched

    def refused(ctype: str, body: object, strategic: bool = True) -> ApiError:
        with pytest.raises(ApiError) as ei:
            patched(ctype, cur, body, strategic=strategic)
        return ei.value

    e = refused("application/strategic-merge-patch+json", smp, strategic=False)
    assert e.code == 415 and e.message.endswith(
        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml")
    assert refused("text/plain", smp).code == 415
    assert refused("application/json-patch+json", [{"op": "test", "path": "/spec/n", "value": 9}]).code == 422
    assert refused("application/json-patch+json", {"op": "add"}).code == 400
    assert refused("application/merge-patch+json", [1]).code == 400  # not an object


def test_label_selector_grammar() -> None:
    obj = {"metadata": {"labels": {"app": "web", "tier": "fe"}}}
    cases = {"app=web": True, "app==web": True, "app!=web": False, "app in (web, db)": True,
             "app notin (web)": False, "tier": True, "!tier": False, "missing!=x": True,
             "app=web,tier in (be)": False, "": True}
    for sel, want in cases.items():
        assert selectors.labels_match(selectors.parse_labels(sel), obj) is want, sel
    with pytest.raises(selectors.SelectorError):
        selectors.parse_labels("app=(")


def test_field_selector_supported_labels() -> None:
    sup = frozenset({"metadata.name", "spec.nodeName"})
    reqs = selectors.parse_fields("spec.nodeName=n1,metadata.name!=x", sup, "pods")
    assert selectors.fields_match(reqs, {"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}})
    assert not selectors.fields_match(reqs, {"metadata": {"name": "x"}, "spec": {"nodeName": "n1"}})
    with pytest.raises(selectors.SelectorError, match=r"field label not supported: spec\.other"):
        selectors.parse_fields("spec.other=1", sup, "pods")
