"""The leaf-copy contract of :mod:`tree.identity`: ownership labels and collision-free names."""

from __future__ import annotations

import pytest

from tree import identity


def copy(root_id: str, uid: str, name: str = "web-0") -> dict:
    labels, annotations = identity.ownership(root_id, {"metadata": {"namespace": "ns", "name": name, "uid": uid}})
    return {"metadata": {"namespace": "ns", "name": name, "labels": labels, "annotations": annotations}}


def test_ownership_labels_name_the_root_and_the_root_object() -> None:
    obj = copy("root-a", "u1")
    assert identity.root_of(obj) == ("root-a", "u1")
    assert identity.is_ours(obj, "root-a") and not identity.is_ours(obj, "root-b")
    assert identity.is_copy_of(obj, "root-a", "u1") and not identity.is_copy_of(obj, "root-a", "u2")
    assert obj["metadata"]["annotations"][identity.ROOT_NAME_ANNOTATION] == "ns/web-0"
    assert identity.root_of({"metadata": {"labels": {identity.ROOT_LABEL: "root-a"}}}) is None
    assert identity.selector("root-a", "u1") == "kosmos.io/root-cluster=root-a,kosmos.io/root-uid=u1"


def test_a_free_name_or_our_own_copy_keeps_the_root_name() -> None:
    assert identity.leaf_name("web-0", "root-a", "u1", None) == "web-0"
    assert identity.leaf_name("web-0", "root-a", "u1", copy("root-a", "u1")) == "web-0"


@pytest.mark.parametrize("occupant", [
    {"metadata": {"name": "web-0"}},  # a leaf user's
    copy("root-b", "u9"),             # another root's
    copy("root-a", "u0"),             # an older generation of the same root name, still terminating
])
def test_a_taken_name_gets_a_stable_suffix_of_root_and_uid(occupant: dict) -> None:
    name = identity.leaf_name("web-0", "root-a", "u1", occupant)
    assert name != "web-0" and name.startswith("web-0-")
    assert name == identity.leaf_name("web-0", "root-a", "u1", occupant)  # a restart derives it again
    assert name != identity.leaf_name("web-0", "root-b", "u1", occupant)
    assert name != identity.leaf_name("web-0", "root-a", "u2", occupant)


def test_a_suffixed_name_fits_the_limit_and_ends_in_an_alphanumeric() -> None:
    long = "a" * 40 + "-" + "b" * 30
    name = identity.leaf_name(long, "r", "u", {"metadata": {"name": long}})
    assert len(name) <= 63 and name[-1].isalnum()
    assert len(identity.leaf_name("x" * 250, "r", "u", {}, max_len=253)) <= 253


def test_a_root_object_without_uid_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="ns/p"):
        identity.ownership("r", {"metadata": {"namespace": "ns", "name": "p"}})
