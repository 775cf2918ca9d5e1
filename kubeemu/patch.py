"""The three PATCH flavours kube-apiserver accepts, applied to plain JSON objects.

- JSON merge patch (RFC 7386, ``application/merge-patch+json``): maps merge recursively,
  ``null`` deletes, every list is replaced whole.
- Strategic merge patch (``application/strategic-merge-patch+json``, built-in kinds only):
  like merge patch, but lists that Kubernetes declares ``patchStrategy: merge`` merge element
  by element on their merge key (containers by ``name``, container ports by ``containerPort``,
  conditions by ``type`` ...), ``$patch: delete`` removes one element (or a whole map),
  ``$patch: replace`` replaces, ``$deleteFromPrimitiveList/<field>`` removes scalars from a
  merged scalar list (finalizers) and ``$retainKeys`` keeps only the listed keys. Upstream
  reads the merge keys from Go struct tags; here they come from the table below, keyed by field
  name and, where one name has two meanings, by the path that leads to it.
- JSON patch (RFC 6902, ``application/json-patch+json``): add, remove, replace, move, copy
  and test over JSON pointers.

:func:`patched` is the one dispatch on a PATCH request's media type (the three above plus
server-side apply's ``application/apply-patch+yaml``, approximated as a merge of the applied
fields), with upstream's answers: 415 for a type the resource does not take, 422 for a patch
that does not apply, 400 for a malformed one. Objects and Scale subresources both go through it.

Every function returns a new object and never mutates its inputs: the store treats stored
objects as immutable values shared with the watch log.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from kubeemu import errors
from kubeemu.client import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, STRATEGIC_PATCH
from kubeemu.objects import Obj, metadata_of

_log = logging.getLogger(__name__)

#: In the order upstream lists them in a 415's message.
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_PATCH, APPLY_PATCH)


class PatchError(ValueError):
    """A patch that cannot be applied; ``invalid`` selects 422 (vs 400 for malformed input)."""

    def __init__(self, message: str, invalid: bool = True) -> None:
        super().__init__(message)
        self.invalid = invalid


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: a non-object patch replaces the target; ``null`` members delete."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# field name -> merge key; "ports" and "addresses" depend on where they sit (see _merge_key)
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "conditions": "type",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "taints": "key",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
}
# scalar lists declared patchStrategy=merge: union on patch
_MERGED_SCALAR_LISTS = frozenset({"finalizers"})


def _merge_key(path: tuple[str, ...], field: str, items: list[Any]) -> str | None:
    if field == "ports":
        # container ports merge on containerPort, service ports on port
        if any(isinstance(i, dict) and "containerPort" in i for i in items):
            return "containerPort"
        return "port"
    if field == "addresses":
        # Node status addresses merge on type; EndpointSubset addresses are atomic
        return "type" if path and path[-1] == "status" else None
    return _MERGE_KEYS.get(field)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Apply a strategic merge patch to ``target`` (a built-in kind's object)."""
    return _smp_map(target if isinstance(target, dict) else {}, patch, ())


def _smp_map(orig: dict[str, Any], patch: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    if directive is not None:
        raise PatchError(f"unknown patch directive $patch: {directive!r} at {'.'.join(path) or '<root>'}")
    result = dict(orig)
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if not isinstance(value, list | None):  # directives' values are the client's: checked
                raise PatchError(f"{key}: {value!r} is not a list", invalid=False)
            drop = set(map(_freeze, value or []))
            if isinstance(result.get(field), list):
                result[field] = [v for v in result[field] if _freeze(v) not in drop]
            continue
        if value is None:
            result.pop(key, None)
            continue
        old = result.get(key)
        if isinstance(value, dict):
            merged = _smp_map(old if isinstance(old, dict) else {}, value, (*path, key))
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _smp_list(old if isinstance(old, list) else [], value, path, key)
        else:
            result[key] = value
    if isinstance(retain, list):
        if not all(isinstance(k, str) for k in retain):
            raise PatchError(f"$retainKeys: {retain!r} is not a list of field names", invalid=False)
        keep = set(retain)
        result = {k: v for k, v in result.items() if k in keep}
    return result


def _freeze(value: Any) -> Any:
    return repr(value) if isinstance(value, (dict, list)) else value


def _smp_list(orig: list[Any], patch: list[Any], path: tuple[str, ...], field: str) -> list[Any]:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" and len(i) == 1 for i in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and i.get("$patch") == "replace")]
    if field in _MERGED_SCALAR_LISTS:
        out = list(orig)
        for v in patch:
            if v not in out:
                out.append(v)
        return out
    key = _merge_key(path, field, orig + patch)
    if key is None or not all(isinstance(i, dict) for i in patch):
        return copy.deepcopy(patch)
    out = list(orig)
    for item in patch:
        if key not in item:
            raise PatchError(f"map: {item} does not contain declared merge key: {key}")
        idx = next((n for n, o in enumerate(out) if isinstance(o, dict) and o.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(_smp_map({}, item, (*path, field)))
        else:
            out[idx] = _smp_map(out[idx], item, (*path, field))
    return out


def _pointer(ptr: str) -> list[str]:
    if ptr == "":
        return []
    if not ptr.startswith("/"):
        raise PatchError(f"invalid JSON pointer {ptr!r}: must start with '/'", invalid=False)
    return [p.replace("~1", "/").replace("~0", "~") for p in ptr[1:].split("/")]


def _walk(doc: Any, parts: list[str], ptr: str) -> Any:
    cur = doc
    for p in parts:
        if isinstance(cur, dict):
            if p not in cur:
                raise PatchError(f"doc is missing path: {ptr!r}")
            cur = cur[p]
        elif isinstance(cur, list):
            try:
                cur = cur[int(p)]
            except (ValueError, IndexError):
                raise PatchError(f"doc is missing path: {ptr!r}") from None
        else:
            raise PatchError(f"doc is missing path: {ptr!r}")
    return cur


def _add(doc: Any, ptr: str, value: Any, replace: bool) -> Any:
    parts = _pointer(ptr)
    if not parts:
        return value
    parent = _walk(doc, parts[:-1], ptr)
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise PatchError(f"replace operation does not apply: doc is missing key: {ptr!r}")
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(value)
            return doc
        try:
            idx = int(last)
        except ValueError:
            raise PatchError(f"invalid list index {last!r} in {ptr!r}") from None
        if replace:
            if not 0 <= idx < len(parent):
                raise PatchError(f"replace operation does not apply: index out of range: {ptr!r}")
            parent[idx] = value
        else:
            if not 0 <= idx <= len(parent):
                raise PatchError(f"add operation does not apply: index out of range: {ptr!r}")
            parent.insert(idx, value)
    else:
        raise PatchError(f"doc is missing path: {ptr!r}")
    return doc


def _remove(doc: Any, ptr: str) -> Any:
    parts = _pointer(ptr)
    if not parts:
        raise PatchError("cannot remove the document root")
    parent = _walk(doc, parts[:-1], ptr)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"remove operation does not apply: doc is missing path: {ptr!r}")
        return parent.pop(last)
    if isinstance(parent, list):
        try:
            return parent.pop(int(last))
        except (ValueError, IndexError):
            raise PatchError(f"remove operation does not apply: doc is missing path: {ptr!r}") from None
    raise PatchError(f"doc is missing path: {ptr!r}")


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902; a failing ``test`` or a missing path raises PatchError (422)."""
    if not isinstance(ops, list):
        raise PatchError("json patch must be a list of operations", invalid=False)
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid json patch operation: {op!r}", invalid=False)
        kind, ptr = op["op"], op["path"]
        if not isinstance(ptr, str):
            raise PatchError(f"invalid json patch operation: path {ptr!r} is not a JSON pointer", invalid=False)
        if kind in ("add", "replace"):
            if "value" not in op:
                raise PatchError(f"{kind} operation on {ptr!r} has no value", invalid=False)
            doc = _add(doc, ptr, copy.deepcopy(op["value"]), replace=kind == "replace")
        elif kind == "remove":
            _remove(doc, ptr)
        elif kind in ("move", "copy"):
            src = op.get("from")
            if not isinstance(src, str):
                raise PatchError(f"{kind} operation on {ptr!r} has no 'from'", invalid=False)
            value = _remove(doc, src) if kind == "move" else copy.deepcopy(_walk(doc, _pointer(src), src))
            doc = _add(doc, ptr, value, replace=False)
        elif kind == "test":
            actual = _walk(doc, _pointer(ptr), ptr)
            if actual != op.get("value"):
                raise PatchError(f"testing value {ptr} failed: {actual!r} != {op.get('value')!r}")
        else:
            raise PatchError(f"unexpected json patch operation {kind!r}", invalid=False)
    return doc


def patch_type(ctype: str) -> str:
    """The media type of a PATCH's Content-Type, without parameters (``; charset=utf-8``)."""
    return ctype.split(";")[0].strip().lower()


def patched(ctype: str, current: Obj, body: Any, *, strategic: bool) -> Obj:
    """``current`` with the PATCH ``body`` of Content-Type ``ctype`` applied, as a new object.

    ``strategic``: the resource takes strategic merge patches (built-in kinds; upstream refuses
    them for custom resources with 415) and an apply merges strategically too; otherwise an
    apply is a merge patch. A resourceVersion the patch left as it was is dropped, so the write
    has no precondition: upstream only checks one the patch sets.
    """
    ptype = patch_type(ctype)
    accepted = [t for t in PATCH_TYPES if strategic or t != STRATEGIC_PATCH]
    if ptype not in accepted:
        raise errors.unsupported_media(ctype, accepted)
    try:
        if ptype == JSON_PATCH:
            out = json_patch(current, body)
        elif ptype == STRATEGIC_PATCH or (ptype == APPLY_PATCH and strategic):
            out = strategic_merge_patch(current, body)
        else:
            out = merge_patch(current, body)
    except PatchError as e:
        if e.invalid:
            raise errors.ApiError(422, "Invalid", str(e)) from None
        raise errors.bad_request(str(e)) from None
    if not isinstance(out, dict):
        raise errors.bad_request("the patch does not produce an object")
    meta = metadata_of(out)
    if meta.get("resourceVersion") == metadata_of(current).get("resourceVersion"):
        out = dict(out)
        out["metadata"] = {k: v for k, v in meta.items() if k != "resourceVersion"}
    return out
