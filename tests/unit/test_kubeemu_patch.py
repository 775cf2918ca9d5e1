"""kubeemu's pure pieces: the three patch flavours and the selector parsers."""

from __future__ import annotations

import pytest

from kubeemu import selectors
from kubeemu.patch import PatchError, json_patch, merge_patch, strategic_merge_patch


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
