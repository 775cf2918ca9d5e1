"""Whose is a leaf object, and what is it called there: the one contract every syncer keeps.

A leaf may be shared by several root clusters, and by its own users. So every object a root puts
into a leaf (pods, ConfigMaps, Secrets, ServiceAccounts, PVCs, Events' subjects excepted) carries:

- label :data:`ROOT_LABEL` = the root's id (``kosmos-tree --root-id``): "ours", for selectors
  and for the virtual nodes' capacity (:mod:`tree.forge` does not count our pods twice);
- label :data:`ROOT_UID_LABEL` = the root object's UID: the only key a syncer finds its leaf
  copy by (a label, so a ``labelSelector`` lists it); nothing is ever deleted by name alone;
- annotation :data:`ROOT_NAME_ANNOTATION` = ``<namespace>/<name>`` of the root object (for
  people and for tools; never a lookup key);
- label ``app.kubernetes.io/managed-by=kosmos-tree``.

Names (:func:`leaf_name`): the leaf object has the root object's namespace and name, as Kosmos
keeps them (MCS "namespace sameness": a Service or ConfigMap name means the same everywhere),
unless that name is already held in the leaf by an object that is not this root's copy of this
root object (a leaf user's, another root's, or a stale copy of an older root object of the same
name still terminating). Then the leaf copy is named ``<name>-<suffix>``, the suffix a short hash
of the root id and the root UID, so two roots (or two generations of one StatefulSet pod) never
collide, and a restarted manager derives the same name again. A syncer that renames rewrites
every reference to the renamed object (a pod's volumes and env refer to ConfigMaps by name), and
sets a renamed pod's ``spec.hostname`` to the root name, so the process inside sees its own name.

Pure functions and constants; no API access.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

Obj = dict[str, Any]

#: Objects this root puts into a leaf carry this label with the root's id.
ROOT_LABEL = "kosmos.io/root-cluster"
#: ... and this one with the UID of the root object they copy.
ROOT_UID_LABEL = "kosmos.io/root-uid"
#: ``<namespace>/<name>`` (or ``<name>`` for cluster-scoped) of the root object: informative.
ROOT_NAME_ANNOTATION = "kosmos.io/root-name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kosmos-tree"

#: Longest name of a DNS label (pods, namespaces, Services); other kinds allow 253.
_DNS_LABEL_MAX = 63
_SUFFIX_LEN = 8


def _meta(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (obj or {}).get("metadata") or {}


def root_of(obj: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(root id, root UID) of a leaf object a root put there, None for anybody else's."""
    labels = _meta(obj).get("labels") or {}
    rid, ruid = labels.get(ROOT_LABEL), labels.get(ROOT_UID_LABEL)
    if not rid or not ruid:
        return None
    return str(rid), str(ruid)


def is_ours(obj: Mapping[str, Any] | None, root_id: str) -> bool:
    """A leaf object this root put there (any root object's copy)."""
    return (_meta(obj).get("labels") or {}).get(ROOT_LABEL) == root_id


def is_copy_of(obj: Mapping[str, Any] | None, root_id: str, root_uid: str) -> bool:
    """A leaf object that is this root's copy of the root object with UID ``root_uid``."""
    return root_of(obj) == (root_id, root_uid)


def suffix(root_id: str, root_uid: str) -> str:
    """The short, stable suffix a renamed leaf copy carries (see the module's "Names")."""
    return hashlib.sha256(f"{root_id}/{root_uid}".encode()).hexdigest()[:_SUFFIX_LEN]


def leaf_name(name: str, root_id: str, root_uid: str, occupant: Mapping[str, Any] | None, *,
              max_len: int = _DNS_LABEL_MAX) -> str:
    """The leaf name of the root object ``name``/``root_uid``, given ``occupant``: the leaf
    object that holds ``name`` now in the same namespace (None when the name is free).

    The root name when it is free or held by this very copy; else ``<name>-<suffix>`` with
    ``name`` cut so the result fits ``max_len`` (63 for pods and other DNS labels, pass 253 for
    ConfigMaps, Secrets, ServiceAccounts and PVCs). The caller looks its copy up by
    :data:`ROOT_UID_LABEL` first and calls this only to name a copy it is about to create.
    """
    if occupant is None or is_copy_of(occupant, root_id, root_uid):
        return name
    tail = "-" + suffix(root_id, root_uid)
    head = name[: max_len - len(tail)].rstrip("-.")
    return head + tail


def ownership(root_id: str, root_obj: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) every leaf copy of ``root_obj`` carries (merge them into its own)."""
    meta = _meta(root_obj)
    ns, name, uid = meta.get("namespace"), meta.get("name"), meta.get("uid")
    if not name or not uid:
        raise ValueError(f"a root object without name or uid cannot be copied to a leaf: {ns}/{name}")
    labels = {ROOT_LABEL: root_id, ROOT_UID_LABEL: str(uid), MANAGED_BY_LABEL: MANAGED_BY}
    annotations = {ROOT_NAME_ANNOTATION: f"{ns}/{name}" if ns else str(name)}
    return labels, annotations


def selector(root_id: str, root_uid: str | None = None) -> str:
    """The label selector of this root's leaf objects (of one root object's copy with ``root_uid``)."""
    sel = f"{ROOT_LABEL}={root_id}"
    return sel if root_uid is None else f"{sel},{ROOT_UID_LABEL}={root_uid}"
