"""Custom resources against their CRD's structural schema, as kube-apiserver treats them.

A real API server does two things with a custom resource's ``openAPIV3Schema`` on every write:
it *prunes* fields the schema does not declare (unless ``x-kubernetes-preserve-unknown-fields``)
and *validates* what is left, refusing the write with 422 Invalid whose ``details.causes`` name
each bad field (``spec.clusterLinkOptions.networkType``). Without both, a lab on the emulator
would accept and keep objects a cluster refuses or silently strips, and code reading them would
be tested against data it can never see in production.

Validation uses ``jsonschema`` (Draft 7 covers the OpenAPI v3 subset CRDs use; ``nullable`` is
translated). Not emulated: ``default`` (defaulting), ``format`` checks and the CEL rules of
``x-kubernetes-validations`` (callers that depend on those repeat them, as fabric/crd.py does).
Messages follow upstream's (``apiextensions-apiserver`` ``kubeOpenAPIResultToFieldErrors``):
``Unsupported value: "mesh": supported values: "p2p", "gateway"``, ``Required value``,
``Invalid value: "x": spec.a in body should match '^...'``.
"""

from __future__ import annotations

import contextvars
import copy
import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jsonschema  # type: ignore[import-untyped]

from kubeemu import validation

_log = logging.getLogger(__name__)

Obj = dict[str, Any]
#: (reason, field, message), as errors.invalid takes them.
Cause = tuple[str, str, str]

#: The request's ``fieldValidation`` (Strict, Warn, Ignore; "" = Warn, upstream's default) and the
#: unknown fields pruned while serving it (the server turns them into ``Warning`` headers). Set
#: by the server around one write; the store runs synchronously inside it.
FIELD_VALIDATION: contextvars.ContextVar[str] = contextvars.ContextVar("field_validation", default="")
PRUNED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("pruned", default=None)

_ROOT_KEPT = ("apiVersion", "kind", "metadata")
_REQUIRED = re.compile(r"^'(.*)' is a required property$")
_GO_TYPES = {"object": "object", "array": "array", "string": "string", "integer": "integer",
             "number": "number", "boolean": "boolean"}


class StructuralSchema:
    """One version's ``openAPIV3Schema``: :meth:`prune` then :meth:`causes` on every write."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema: Obj = copy.deepcopy(dict(schema))
        checked = _to_jsonschema(self.schema)
        # metadata is the API server's own (ObjectMeta, validated elsewhere); a CRD may only
        # narrow name, which kubeemu checks with every other object's.
        if isinstance(checked.get("properties"), dict):
            checked["properties"].pop("metadata", None)
        self._validator = jsonschema.Draft7Validator(checked)

    def prune(self, obj: Obj, keep: Iterable[str] = ()) -> list[str]:
        """Drop, in place, every field the schema does not declare, except under the top-level
        keys ``keep``; returns the paths dropped."""
        dropped: list[str] = []
        _prune(obj, self.schema, "", dropped, root=True, keep=frozenset(keep))
        if dropped:
            _log.debug("pruned unknown fields %s", ", ".join(dropped))
        return dropped

    def causes(self, obj: Obj) -> list[Cause]:
        """Why ``obj`` does not match the schema (empty: it does), upstream-style, in path order."""
        out: list[Cause] = []
        errors = sorted(self._validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
        for e in errors:
            out.append(_cause(e))
        return out


def _to_jsonschema(node: Any) -> Any:
    """The OpenAPI v3 schema as JSON Schema: ``nullable: true`` admits null."""
    if isinstance(node, list):
        return [_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_jsonschema(v) for k, v in node.items()}
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not path:
        return key
    return f"{path}[{key}]" if ("." in key or "/" in key) else f"{path}.{key}"


def _path(parts: Iterable[str | int]) -> str:
    out = ""
    for p in parts:
        out = _join(out, p)
    return out


def _prune(value: Any, schema: Any, path: str, dropped: list[str], root: bool = False,
           keep: frozenset[str] = frozenset()) -> None:
    if not isinstance(schema, dict):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _prune(item, schema.get("items"), _join(path, i), dropped)
        return
    if not isinstance(value, dict):
        return
    props = schema.get("properties") or {}
    addl = schema.get("additionalProperties")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True or addl is True
    embedded = schema.get("x-kubernetes-embedded-resource") is True
    for k in list(value):
        if ((root or embedded) and k in _ROOT_KEPT) or (root and k in keep):
            continue
        if k in props:
            _prune(value[k], props[k], _join(path, k), dropped)
        elif isinstance(addl, dict):
            _prune(value[k], addl, _join(path, k), dropped)
        elif not preserve:
            del value[k]
            dropped.append(_join(path, k))


def _show(value: Any) -> str:
    """A value as Go's field errors print it: strings quoted, the rest as JSON."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _cause(e: Any) -> Cause:
    field = _path(e.absolute_path)
    where = field or "<root>"
    v, kind = e.instance, e.validator
    if kind == "required":
        m = _REQUIRED.match(e.message)
        return ("FieldValueRequired", _join(field, m.group(1)) if m else field, "Required value")
    if kind == "enum":
        allowed = ", ".join(_show(x) for x in e.validator_value)
        return ("FieldValueNotSupported", field, f"Unsupported value: {_show(v)}: supported values: {allowed}")
    if kind == "type":
        want = e.validator_value if isinstance(e.validator_value, str) else e.validator_value[0]
        return ("FieldValueTypeInvalid", field,
                f"Invalid value: {_show(v)}: {where} in body must be of type {_GO_TYPES.get(want, want)}: "
                f"{_show(_json_type(v))}")
    if kind == "maxLength":
        return ("FieldValueTooLong", field, f"Too long: may not be more than {e.validator_value} bytes")
    if kind in ("maxItems", "maxProperties"):
        return validation.too_many(field, len(v), e.validator_value)
    detail = {
        "pattern": f"should match '{e.validator_value}'",
        "minLength": f"should be at least {e.validator_value} chars long",
        "minItems": f"should have at least {e.validator_value} items",
        "minProperties": f"should have at least {e.validator_value} properties",
        "minimum": f"should be greater than or equal to {e.validator_value}",
        "maximum": f"should be less than or equal to {e.validator_value}",
    }.get(kind, e.message)
    return ("FieldValueInvalid", field, f"Invalid value: {_show(v)}: {where} in body {detail}")


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if v is None:
        return "null"
    return "object"
