"""OpenAPI documents for the kinds one emulated cluster serves: ``/openapi/v3`` and ``/openapi/v2``.

``kubectl explain`` (1.32) reads ``/openapi/v3``: the index lists one document per group-version
(``{"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=..."}}}``), and each
document's ``components.schemas`` holds the kinds of that group-version, found by their
``x-kubernetes-group-version-kind``, with every schema they reference. ``kubectl apply`` takes
patch strategies (``x-kubernetes-patch-merge-key`` ...) from the same documents.

Where the schemas come from, in order:

1. Built-in kinds: the upstream OpenAPI definitions of Kubernetes v1.32.0 as the
   ``kubernetes-validate`` package (a dev/lab dependency, from PyPI) ships them, in
   ``kubernetes_validate/kubernetes-json-schema/v1.32.0-local/_definitions.json``. That file is
   upstream's swagger ``definitions`` rewritten to JSON Schema; :func:`_upstream` undoes the
   rewrite: ``"type": ["string", "null"]`` back to ``"string"``, the ``enum`` it adds to
   ``apiVersion``/``kind`` dropped, ``$ref`` pointed at ``#/definitions`` (v2) or
   ``#/components/schemas`` (v3; wrapped in ``allOf`` when it has siblings, as upstream's v3),
   and ``IntOrString``/``Quantity`` restored to upstream's string schemas (their descriptions are
   upstream's first sentences). Descriptions, formats, ``required`` and the ``x-kubernetes-*``
   extensions are upstream's. A kind the v1.32 file lacks (``networking.k8s.io/v1``
   ``ServiceCIDR``, GA in v1.33) is taken from the next version the package has.
   Regenerate: nothing to run; a newer ``kubernetes-validate`` is picked up by version name
   (:data:`SOURCE_VERSION`).
2. Custom resources: each served version of each CRD, from its ``openAPIV3Schema``, as
   apiextensions-apiserver builds them: named ``<reversed group>.<version>.<Kind>``, with
   ``apiVersion``/``kind``/``metadata`` (ObjectMeta) added, a ``<Kind>List``, and the GVK
   extension. Built on every request, so a CRD change shows at once (the hash in the index
   changes with the content, which is what clients cache by).

Paths: each kind's read operations (get, list) and its PATCH, with the
``x-kubernetes-group-version-kind`` kubectl explain finds the kind by, and ``fieldValidation``
among PATCH's parameters: kubectl then leaves unknown fields to the server, which drops them for
built-in kinds (:func:`prune_unknown`, used by :mod:`kubeemu.server`; Strict refuses them with
upstream's ``strict decoding error: unknown field "spec.foo"``) and for custom resources
(:mod:`kubeemu.schema`). Other operations are not published.
``/openapi/v2`` carries the same definitions and paths, in JSON or in gnostic's protobuf form
(:func:`v2_protobuf`; what kubectl asks for: ``kubectl explain --output=plaintext-openapiv2``, and
client-side validation where server-side validation is not advertised).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
from importlib import resources
from typing import Any

from kubeemu import protobuf
from kubeemu.objects import CRDS
from kubeemu.resources import Registry, ResourceType
from kubeemu.store import Store

_log = logging.getLogger(__name__)

SOURCE_PACKAGE = "kubernetes_validate"
SOURCE_VERSION = "v1.32.0-local"
_LATER_VERSIONS = ("v1.33.0-local", "v1.34.0-local")
_META = "io.k8s.apimachinery.pkg.apis.meta.v1."
_INT_OR_STRING = {
    "description": "IntOrString is a type that can hold an int32 or a string.  When used in JSON or YAML "
    "marshalling and unmarshalling, it produces or consumes the inner type.  This allows you to have, for "
    "example, a JSON field that can accept a name or number.",
    "format": "int-or-string",
    "type": "string",
}
_QUANTITY = {
    "description": "Quantity is a fixed-point representation of a number. It provides convenient "
    "marshaling/unmarshaling in JSON and YAML, in addition to String() and AsInt64() accessors.",
    "type": "string",
}
_API_VERSION_DOC = (
    "APIVersion defines the versioned schema of this representation of an object. Servers should convert "
    "recognized schemas to the latest internal value, and may reject unrecognized values. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"
)
_KIND_DOC = (
    "Kind is a string value representing the REST resource this object represents. Servers may infer this from "
    "the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"
)
_METADATA_DOC = (
    "Standard object's metadata. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"
)
_LIST_METADATA_DOC = (
    "Standard list metadata. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"
)


def _load(version: str) -> dict[str, Any]:
    """One version's definitions from the package (FileNotFoundError: it has no such version)."""
    try:
        base = resources.files(SOURCE_PACKAGE)
    except ModuleNotFoundError:
        raise RuntimeError(
            f"kubeemu's OpenAPI documents and field validation need the {SOURCE_PACKAGE} package "
            "(a dependency of kosmos-fabric-lab: pip install 'kubernetes-validate>=1.32')"
        ) from None
    path = base.joinpath(f"kubernetes-json-schema/{version}/_definitions.json")
    with path.open("rb") as f:
        defs: dict[str, Any] = json.load(f)["$defs"]
    return defs


def _upstream(schema: Any, name: str = "", gvk: bool = False) -> Any:
    """One definition back in upstream's swagger form (refs as ``#/definitions/...``)."""
    if name == "io.k8s.apimachinery.pkg.util.intstr.IntOrString":
        return dict(_INT_OR_STRING)
    if name == "io.k8s.apimachinery.pkg.api.resource.Quantity":
        return dict(_QUANTITY)
    if isinstance(schema, list):
        return [_upstream(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, list):
            kinds = [t for t in value if t != "null"]
            out[key] = kinds[0] if len(kinds) == 1 else kinds
        elif key == "$ref" and isinstance(value, str):
            out[key] = value.replace("#/$defs/", "#/definitions/")
        elif key == "properties" and isinstance(value, dict):
            props = {}
            for pname, pschema in value.items():
                p = _upstream(pschema)
                if gvk and pname in ("apiVersion", "kind"):
                    p.pop("enum", None)
                props[pname] = p
            out[key] = props
        elif key == "x-kubernetes-group-version-kind":
            out[key] = value
        else:
            out[key] = _upstream(value)
    return out


@functools.cache
def builtin_definitions() -> dict[str, Any]:
    """Upstream's definitions by name (v2 form), for every kind the package knows."""
    raw = _load(SOURCE_VERSION)
    defs = {name: _upstream(s, name, "x-kubernetes-group-version-kind" in s) for name, s in raw.items()}
    return defs


@functools.cache
def _later_definitions(version: str) -> dict[str, Any]:
    try:
        raw = _load(version)
    except FileNotFoundError:
        return {}
    return {name: _upstream(s, name, "x-kubernetes-group-version-kind" in s) for name, s in raw.items()}


def _gvk_index(defs: dict[str, Any]) -> dict[tuple[str, str, str], str]:
    out: dict[tuple[str, str, str], str] = {}
    for name, s in defs.items():
        for g in s.get("x-kubernetes-group-version-kind") or []:
            out.setdefault((g.get("group", ""), g.get("version", ""), g.get("kind", "")), name)
    return out


@functools.cache
def _builtin_gvks() -> dict[tuple[str, str, str], str]:
    return _gvk_index(builtin_definitions())


def _refs(schema: Any, found: set[str]) -> None:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            found.add(ref[len("#/definitions/") :])
        for v in schema.values():
            _refs(v, found)
    elif isinstance(schema, list):
        for v in schema:
            _refs(v, found)


def _definition(name: str) -> Any:
    """A definition by name: v1.32's, else the first later version's that has it (kinds GA later)."""
    found = builtin_definitions().get(name)
    for later in _LATER_VERSIONS:
        if found is not None:
            break
        found = _later_definitions(later).get(name)
    return found


def _closure(roots: dict[str, Any]) -> dict[str, Any]:
    """``roots`` and every definition they reference, transitively."""
    out = dict(roots)
    todo = list(roots.values())
    while todo:
        found: set[str] = set()
        _refs(todo.pop(), found)
        for name in sorted(found):
            if name not in out:
                target = _definition(name)
                if target is not None:
                    out[name] = target
                    todo.append(target)
    return dict(sorted(out.items()))


def _to_v3(schema: Any) -> Any:
    """v2 refs to v3 component refs; a ``$ref`` with siblings becomes ``allOf: [{$ref}]`` (upstream's v3)."""
    if isinstance(schema, list):
        return [_to_v3(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _to_v3(v) for k, v in schema.items() if k != "$ref"}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        ref = ref.replace("#/definitions/", "#/components/schemas/")
        if out:
            out["allOf"] = [{"$ref": ref}]
        else:
            out["$ref"] = ref
    return out


def _reversed_group(group: str) -> str:
    return ".".join(reversed(group.split(".")))


def crd_definitions(crd: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> {name: v2 definition} for each served version of one CRD."""
    spec = crd.get("spec") or {}
    group = spec.get("group", "")
    kind = (spec.get("names") or {}).get("kind", "")
    list_kind = (spec.get("names") or {}).get("listKind") or f"{kind}List"
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for v in spec.get("versions") or []:
        if not v.get("served"):
            continue
        version = v.get("name", "")
        base = f"{_reversed_group(group)}.{version}"
        schema = copy.deepcopy(((v.get("schema") or {}).get("openAPIV3Schema")) or {"type": "object"})
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", {"description": _API_VERSION_DOC, "type": "string"})
        props.setdefault("kind", {"description": _KIND_DOC, "type": "string"})
        props["metadata"] = {"$ref": f"#/definitions/{_META}ObjectMeta", "description": _METADATA_DOC}
        schema.setdefault("type", "object")
        schema["x-kubernetes-group-version-kind"] = [{"group": group, "kind": kind, "version": version}]
        items = {
            "description": f"List of {(spec.get('names') or {}).get('plural', kind.lower())}. More info: "
            "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md",
            "items": {"$ref": f"#/definitions/{base}.{kind}"},
            "type": "array",
        }
        lst = {
            "description": f"{list_kind} is a list of {kind}",
            "properties": {
                "apiVersion": {"description": _API_VERSION_DOC, "type": "string"},
                "items": items,
                "kind": {"description": _KIND_DOC, "type": "string"},
                "metadata": {"$ref": f"#/definitions/{_META}ListMeta", "description": _LIST_METADATA_DOC},
            },
            "required": ["items"],
            "type": "object",
            "x-kubernetes-group-version-kind": [{"group": group, "kind": list_kind, "version": version}],
        }
        out[(group, version, kind)] = {f"{base}.{kind}": schema, f"{base}.{list_kind}": lst}
    return out


# kubectl (1.32) sends fieldValidation=Strict and skips its own client-side schema check when the
# PATCH operation of a kind lists this parameter: kubeemu checks unknown fields server-side for
# built-in kinds (kubeemu.openapi.prune_unknown) and custom resources (kubeemu.schema).
_FIELD_VALIDATION_PARAM = {
    "name": "fieldValidation",
    "in": "query",
    "description": "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) "
    "containing unknown or duplicate fields. Valid values are: - Ignore: This will ignore any unknown fields that "
    "are silently dropped from the object, and will ignore all but the last duplicate field that the decoder "
    "encounters. This is the default behavior prior to v1.23. - Warn: This will send a warning via the standard "
    "warning response header for each unknown field that is dropped from the object, and for each duplicate field "
    "that is encountered. The request will still succeed if there are no other errors, and will only persist the "
    "last of any duplicate fields. This is the default in v1.23+ - Strict: This will fail the request with a "
    "BadRequest error if any unknown fields would be dropped from the object, or if any duplicate fields are "
    "present. The error returned from the server will contain all unknown and duplicate fields encountered.",
    "schema": {"type": "string", "uniqueItems": True},
}


def _read_paths(rt: ResourceType, version: str, kinds: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The read operations (get, list) of one kind, as upstream publishes them: kubectl explain
    finds a resource's kind through the ``x-kubernetes-group-version-kind`` of these operations."""
    prefix = f"/apis/{rt.group}/{version}" if rt.group else f"/api/{version}"
    gvk = {"group": rt.group, "kind": rt.kind, "version": version}
    out: dict[str, Any] = {}

    def op(action: str, kind: str, what: str, params: list[str]) -> dict[str, Any]:
        name = kinds[kind][0]
        return {
            "get": {
                "description": what,
                "operationId": f"{action}{rt.kind}",
                "parameters": [
                    {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
                ],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"application/json": {"schema": {"$ref": f"#/definitions/{name}"}}},
                    }
                },
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
            }
        }

    scope = [f"{prefix}/namespaces/{{namespace}}"] if rt.namespaced else [prefix]
    ns_params = ["namespace"] if rt.namespaced else []
    if rt.list_kind in kinds:
        for base in scope:
            out[f"{base}/{rt.plural}"] = op("list", rt.list_kind, f"list or watch objects of kind {rt.kind}", ns_params)
        if rt.namespaced:
            out[f"{prefix}/{rt.plural}"] = op("list", rt.list_kind, f"list or watch objects of kind {rt.kind}", [])
    if rt.kind in kinds:
        for base in scope:
            item = op("get", rt.kind, f"read the specified {rt.kind}", [*ns_params, "name"])
            patch = copy.deepcopy(item["get"])
            patch.update(description=f"partially update the specified {rt.kind}", operationId=f"patch{rt.kind}")
            patch["x-kubernetes-action"] = "patch"
            patch["parameters"].append(copy.deepcopy(_FIELD_VALIDATION_PARAM))
            item["patch"] = patch
            out[f"{base}/{rt.plural}/{{name}}"] = item
    return out


def gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


class OpenAPI:
    """The documents, computed from the cluster's registry (served kinds) and CRDs."""

    def __init__(self, registry: Registry, store: Store) -> None:
        self.registry = registry
        self.store = store
        # documents by gv path, valid while the CRDs are unchanged (built-ins never change)
        self._cache: dict[str, tuple[dict[str, Any], str]] = {}
        self._cache_key: tuple[tuple[str, str], ...] = ()
        self._v2_pb: tuple[tuple[tuple[str, str], ...], bytes] | None = None

    def _crd_state(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            sorted(
                (c["metadata"]["name"], c["metadata"].get("resourceVersion", ""))
                for c in self.store.bucket(CRDS).values()
            )
        )

    def _crd_defs(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        out: dict[tuple[str, str, str], dict[str, Any]] = {}
        for crd in self.store.bucket(CRDS).values():
            out.update(crd_definitions(crd))
        return out

    def _kind_defs(
        self, rt: ResourceType, version: str, crds: dict[tuple[str, str, str], dict[str, Any]]
    ) -> dict[str, tuple[str, dict[str, Any]]]:
        """kind -> (definition name, definition) for one served kind and its list kind."""
        if not rt.builtin:
            defs = crds.get((rt.group, version, rt.kind), {})
            found: dict[str, tuple[str, dict[str, Any]]] = {}
            for def_name, schema in defs.items():
                for g in schema.get("x-kubernetes-group-version-kind") or []:
                    found[g["kind"]] = (def_name, schema)
            return found
        out = {}
        for kind in (rt.kind, rt.list_kind):
            name: str | None = _builtin_gvks().get((rt.group, version, kind))
            pool = builtin_definitions()
            if name is None:
                for later in _LATER_VERSIONS:
                    pool = _later_definitions(later)
                    name = _gvk_index(pool).get((rt.group, version, kind))
                    if name is not None:
                        break
            if name is None:
                _log.debug("no OpenAPI definition for %s/%s %s", rt.group, version, kind)
                continue
            out[kind] = (name, pool[name])
        return out

    def group_versions(self) -> dict[str, list[tuple[ResourceType, str]]]:
        """gv path -> the served (type, version) pairs in it."""
        out: dict[str, list[tuple[ResourceType, str]]] = {}
        for rt in self.registry.all():
            for version in rt.versions:
                out.setdefault(gv_path(rt.group, version), []).append((rt, version))
        return out

    def definitions(self, path: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(v2 definitions, v2 paths) of one group-version (``api/v1``) or, with None, of all."""
        crds = self._crd_defs()
        roots: dict[str, Any] = {}
        paths: dict[str, Any] = {}
        for gv, members in self.group_versions().items():
            if path is not None and gv != path:
                continue
            for rt, version in members:
                kinds = self._kind_defs(rt, version, crds)
                roots.update(dict(kinds.values()))
                paths.update(_read_paths(rt, version, kinds))
        return _closure(roots), dict(sorted(paths.items()))

    def v3_document(self, path: str) -> tuple[dict[str, Any], str] | None:
        """(document, hash) of one group-version, None if it is not served."""
        key = self._crd_state()
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        if path in self._cache:
            return self._cache[path]
        if path not in self.group_versions():
            return None
        defs, paths = self.definitions(path)
        doc = {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.32.0"},
            "paths": _to_v3(paths),
            "components": {"schemas": {name: _to_v3(s) for name, s in defs.items()}},
        }
        self._cache[path] = (doc, document_hash(doc))
        return self._cache[path]

    def v3_index(self) -> dict[str, Any]:
        paths = {}
        for gv in sorted(self.group_versions()):
            found = self.v3_document(gv)
            if found is not None:
                paths[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}?hash={found[1]}"}
        return {"paths": paths}

    def kind_schema(self, rt: ResourceType, version: str) -> dict[str, Any] | None:
        """The v2 definition of a built-in kind (None: not known), for field validation."""
        found = self._kind_defs(rt, version, {}).get(rt.kind) if rt.builtin else None
        return found[1] if found is not None else None

    def v2_protobuf(self) -> bytes:
        """The v2 document in protobuf (kubectl asks for this form), cached while CRDs are unchanged."""
        key = self._crd_state()
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        if self._v2_pb is None or self._v2_pb[0] != key:
            self._v2_pb = (key, v2_protobuf(self.v2_document()))
        return self._v2_pb[1]

    def v2_document(self) -> dict[str, Any]:
        """The whole v2 document (JSON): all definitions, the same read paths in v2 form."""
        defs, paths = self.definitions()
        for ops in paths.values():
            for op in ops.values():
                op["produces"] = ["application/json"]
                schema = op["responses"]["200"]["content"]["application/json"]["schema"]
                op["responses"] = {"200": {"description": "OK", "schema": schema}}
                op["parameters"] = [
                    {**{k: v for k, v in p.items() if k != "schema"}, "type": p["schema"]["type"]}
                    for p in op["parameters"]
                ]
        return {
            "swagger": "2.0",
            "info": {"title": "Kubernetes", "version": "v1.32.0"},
            "paths": paths,
            "definitions": defs,
        }


def _resolve(schema: Any) -> dict[str, Any]:
    """Follow ``$ref`` (v2 form) through the built-in definitions, and later versions' for kinds
    the v1.32 set lacks; an ``allOf`` of one is its member."""
    seen = 0
    while isinstance(schema, dict) and seen < 32:
        seen += 1
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            target = _definition(ref[len("#/definitions/") :])
            schema = target if target is not None else {}
            continue
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1 and "properties" not in schema:
            schema = all_of[0]
            continue
        return schema
    return schema if isinstance(schema, dict) else {}


def _field(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def prune_unknown(value: Any, schema: Any, path: str = "", patch: bool = False) -> list[str]:
    """Drop, in place, the fields of ``value`` its schema does not declare (what decoding a
    built-in kind into its Go type does), returning their paths (``spec.containers[0].foo``).
    In a strategic merge patch the ``$``-directives (``$patch``, ``$setElementOrder/...``) are
    kept. Objects without ``properties`` (``RawExtension``, free-form maps) take anything."""
    dropped: list[str] = []
    _prune(value, schema, path, patch, dropped)
    return dropped


def _prune(value: Any, schema: Any, path: str, patch: bool, dropped: list[str]) -> None:
    s = _resolve(schema)
    if isinstance(value, dict):
        props = s.get("properties")
        extra = s.get("additionalProperties")
        if isinstance(props, dict):
            for key in list(value):
                if patch and key.startswith("$"):
                    continue
                if key not in props:
                    dropped.append(_field(path, key))
                    del value[key]
                    continue
                _prune(value[key], props[key], _field(path, key), patch, dropped)
        elif isinstance(extra, dict):
            for key, item in value.items():
                _prune(item, extra, _field(path, key), patch, dropped)
    elif isinstance(value, list) and isinstance(s.get("items"), dict):
        for i, item in enumerate(value):
            _prune(item, s["items"], f"{path}[{i}]", patch, dropped)


def type_problem(value: Any, schema: Any, path: str = "") -> str | None:
    """The first part of ``value`` whose JSON type cannot decode into its schema's, as decoding
    into the Go type refuses it upstream: an object or array where a scalar belongs, a scalar
    where an object or array does, a null item in a list of objects. Scalars are not compared
    with each other (a Quantity or an int-or-string takes a number or a string); null elsewhere
    is the zero value. Without this check such a body was stored and broke the next write of the
    object (found by tests/unit/test_fuzz_kubeemu.py)."""
    if value is None:
        return None
    s = _resolve(schema)
    want = s.get("type")
    where = path or "the object"
    if want == "object" or (want is None and isinstance(s.get("properties"), dict)):
        if not isinstance(value, dict):
            return f"{where}: {_json_kind(value)} where an object belongs"
        props, extra = s.get("properties"), s.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) if isinstance(props, dict) else extra if isinstance(extra, dict) else None
            if sub is not None and (found := type_problem(item, sub, _field(path, key))) is not None:
                return found
    elif want == "array":
        if not isinstance(value, list):
            return f"{where}: {_json_kind(value)} where an array belongs"
        items = s.get("items")
        if isinstance(items, dict):
            objects = _resolve(items).get("type") == "object"
            for i, item in enumerate(value):
                if item is None and objects:
                    return f"{path}[{i}]: null where an object belongs"
                if (found := type_problem(item, items, f"{path}[{i}]")) is not None:
                    return found
    elif want in ("string", "integer", "number", "boolean") and isinstance(value, dict | list):
        return f"{where}: {_json_kind(value)} where a {want} belongs"
    return None


def _json_kind(value: Any) -> str:
    return "an object" if isinstance(value, dict) else "an array" if isinstance(value, list) else f"{value!r}"


def document_hash(doc: Any) -> str:
    """The index's cache key: upstream uses the SHA-512 of the document, upper-case hex."""
    return hashlib.sha512(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest().upper()


# ---------------------------------------------------------------- v2 in protobuf (gnostic openapi_v2)
# Field numbers of gnostic-models' openapiv2/OpenAPIv2.proto (proto3: zero values are not
# written), the encoding kube-openapi serves and kubectl reads: Document, Info, Paths,
# NamedPathItem, PathItem, Operation, the parameter/response wrappers, Definitions, NamedSchema,
# Schema, Properties, ItemsItem, TypeItem, AdditionalPropertiesItem, NamedAny and Any (its
# ``yaml`` field carries vendor extensions, enum values and defaults as YAML, which JSON is).


_pb_varint = protobuf.encode_varint
_pb_bytes = protobuf.length_delimited


def _pb_str(num: int, value: Any) -> bytes:
    return _pb_bytes(num, str(value).encode()) if value not in (None, "") else b""


def _pb_bool(num: int, value: Any) -> bytes:
    return _pb_varint(num << 3) + b"\x01" if value else b""


def _pb_int(num: int, value: Any) -> bytes:
    return _pb_varint(num << 3) + _pb_varint(int(value)) if value else b""


def _pb_double(num: int, value: Any) -> bytes:
    import struct

    return _pb_varint(num << 3 | 1) + struct.pack("<d", float(value)) if value else b""


def _pb_any(num: int, value: Any) -> bytes:
    """An ``Any`` whose ``yaml`` (field 2) is the value as JSON (a YAML document)."""
    return _pb_bytes(num, _pb_str(2, json.dumps(value, separators=(",", ":"))))


def _pb_extensions(num: int, node: dict[str, Any]) -> bytes:
    return b"".join(_pb_bytes(num, _pb_str(1, k) + _pb_any(2, v)) for k, v in node.items() if k.startswith("x-"))


def _pb_schema(node: dict[str, Any]) -> bytes:
    out = bytearray()
    out += _pb_str(1, node.get("$ref"))
    out += _pb_str(2, node.get("format"))
    out += _pb_str(3, node.get("title"))
    out += _pb_str(4, node.get("description"))
    if "default" in node:
        out += _pb_any(5, node["default"])
    out += _pb_double(6, node.get("multipleOf"))
    out += _pb_double(7, node.get("maximum"))
    out += _pb_bool(8, node.get("exclusiveMaximum"))
    out += _pb_double(9, node.get("minimum"))
    out += _pb_bool(10, node.get("exclusiveMinimum"))
    for num, key in ((11, "maxLength"), (12, "minLength")):
        out += _pb_int(num, node.get(key))
    out += _pb_str(13, node.get("pattern"))
    for num, key in ((14, "maxItems"), (15, "minItems")):
        out += _pb_int(num, node.get(key))
    out += _pb_bool(16, node.get("uniqueItems"))
    for num, key in ((17, "maxProperties"), (18, "minProperties")):
        out += _pb_int(num, node.get(key))
    for r in node.get("required") or []:
        out += _pb_str(19, r)
    for e in node.get("enum") or []:
        out += _pb_any(20, e)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out += _pb_bytes(21, _pb_bytes(1, _pb_schema(extra)))
    elif isinstance(extra, bool):
        out += _pb_bytes(21, _pb_varint(2 << 3) + (b"\x01" if extra else b"\x00"))
    kinds = node.get("type")
    if kinds:
        out += _pb_bytes(22, b"".join(_pb_str(1, t) for t in (kinds if isinstance(kinds, list) else [kinds])))
    items = node.get("items")
    if isinstance(items, dict):
        out += _pb_bytes(23, _pb_bytes(1, _pb_schema(items)))
    for sub in node.get("allOf") or []:
        out += _pb_bytes(24, _pb_schema(sub))
    props = node.get("properties")
    if isinstance(props, dict):
        out += _pb_bytes(
            25, b"".join(_pb_bytes(1, _pb_str(1, k) + _pb_bytes(2, _pb_schema(v))) for k, v in props.items())
        )
    out += _pb_str(26, node.get("discriminator"))
    out += _pb_bool(27, node.get("readOnly"))
    out += _pb_extensions(31, node)
    return bytes(out)


def _pb_parameter(p: dict[str, Any]) -> bytes:
    """A non-body parameter: query (sub-schema 3) or path (4) in a ParametersItem."""
    if p.get("in") == "path":
        sub = (
            _pb_bool(1, p.get("required"))
            + _pb_str(2, "path")
            + _pb_str(3, p.get("description"))
            + _pb_str(4, p.get("name"))
            + _pb_str(5, p.get("type"))
        )
        wrapped = _pb_bytes(4, sub)
    else:
        sub = (
            _pb_bool(1, p.get("required"))
            + _pb_str(2, p.get("in"))
            + _pb_str(3, p.get("description"))
            + _pb_str(4, p.get("name"))
            + _pb_str(6, p.get("type"))
            + _pb_bool(20, p.get("uniqueItems"))
        )
        wrapped = _pb_bytes(3, sub)
    return _pb_bytes(1, _pb_bytes(2, wrapped))  # ParametersItem.parameter -> Parameter.non_body_parameter


def _pb_operation(op: dict[str, Any]) -> bytes:
    out = bytearray()
    out += _pb_str(3, op.get("description"))
    out += _pb_str(5, op.get("operationId"))
    for media in op.get("produces") or []:
        out += _pb_str(6, media)
    for p in op.get("parameters") or []:
        out += _pb_bytes(8, _pb_parameter(p))
    responses = b""
    for code, resp in (op.get("responses") or {}).items():
        body = _pb_str(1, resp.get("description"))
        if isinstance(resp.get("schema"), dict):
            body += _pb_bytes(2, _pb_bytes(1, _pb_schema(resp["schema"])))
        responses += _pb_bytes(1, _pb_str(1, code) + _pb_bytes(2, _pb_bytes(1, body)))
    out += _pb_bytes(9, responses)
    out += _pb_extensions(13, op)
    return bytes(out)


_PATH_OPS = {"get": 2, "put": 3, "post": 4, "delete": 5, "options": 6, "head": 7, "patch": 8}


def v2_protobuf(doc: dict[str, Any]) -> bytes:
    """A v2 document (as :meth:`OpenAPI.v2_document` builds it) in gnostic's protobuf form."""
    info = doc.get("info") or {}
    out = bytearray(_pb_str(1, doc.get("swagger", "2.0")))
    out += _pb_bytes(2, _pb_str(1, info.get("title")) + _pb_str(2, info.get("version")))
    paths = b""
    for path, item in (doc.get("paths") or {}).items():
        ops = b"".join(_pb_bytes(num, _pb_operation(item[m])) for m, num in _PATH_OPS.items() if m in item)
        paths += _pb_bytes(2, _pb_str(1, path) + _pb_bytes(2, ops))
    out += _pb_bytes(8, paths)
    out += _pb_bytes(
        9,
        b"".join(
            _pb_bytes(1, _pb_str(1, name) + _pb_bytes(2, _pb_schema(schema)))
            for name, schema in (doc.get("definitions") or {}).items()
        ),
    )
    return bytes(out)


__all__ = [
    "OpenAPI",
    "builtin_definitions",
    "crd_definitions",
    "document_hash",
    "gv_path",
    "prune_unknown",
    "v2_protobuf",
]
