"""The HTTP face of one emulated cluster: kube-apiserver's REST paths over aiohttp.

Paths served (answers are JSON, or Kubernetes protobuf for built-in kinds when the client's Accept
lists protobuf first, as kubectl's typed clients do; custom resources have no protobuf form, and a
client that accepts nothing else gets 406):

- discovery: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/G``, ``/apis/G/V`` (a trailing
  slash is ignored everywhere). Aggregated discovery (``as=APIGroupDiscoveryList``) is not
  offered: clients asking for it fall back to these legacy documents, as with an old server.
- ``/openapi/v3`` (index and one document per group-version) and ``/openapi/v2`` in JSON: the
  upstream schemas of the built-in kinds and the CRDs' ``openAPIV3Schema`` (:mod:`kubeemu.openapi`),
  what ``kubectl explain`` reads, and the ``fieldValidation`` parameter that makes kubectl leave
  unknown fields to the server: built-in kinds' unknown fields are dropped as upstream's decoding
  does (Strict: 400 ``strict decoding error``; Warn: a ``Warning`` each). ``/openapi/v2`` also in
  gnostic's protobuf form, which kubectl asks for.
- ``pods/log`` and ``pods/exec`` are proxied to the node's kubelet (:mod:`kubeemu.podproxy`);
  protobuf request bodies (kubectl's typed clients) are decoded by :mod:`kubeemu.protobuf`.
- resources: ``/api/v1/...`` and ``/apis/G/V/...``, namespaced
  (``namespaces/NS/PLURAL[/NAME[/SUB]]``) or not, plus the legacy ``watch/`` prefix; verbs by
  method and the ``watch`` query parameter. ``Accept: ...;as=Table`` gets a server-side Table
  (what ``kubectl get`` prints). Custom resources are pruned and validated against their CRD's
  schema on every write (:mod:`kubeemu.schema`), built-in kinds pruned against their upstream
  OpenAPI schema (:mod:`kubeemu.openapi`); ``fieldValidation=Strict`` refuses unknown fields
  (400), otherwise each pruned field gets a ``Warning`` header, as upstream.
- ``/healthz``, ``/livez``, ``/readyz``.
- ``/_kubeemu/...``: the admin endpoint for tests (faults, dropping or expiring watches,
  compacting the watch log, stats). Not part of the Kubernetes API.

Watches stream newline-delimited ``{"type": ..., "object": ...}`` over chunked HTTP, like
upstream; the events queued for a watcher go out together in one chunk, each encoded once for
all the watchers that see it alike. An expired resourceVersion is answered 200 followed by one ERROR event carrying the
410 Status, which is what client-go and the Python clients expect from a real server.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import contextvars
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from kubeemu import errors, protobuf, schema, selectors, subresources
from kubeemu.controllers import Controllers
from kubeemu.errors import ApiError
from kubeemu.objects import DeleteOptions, Event, Obj, Watcher, transition
from kubeemu.openapi import OpenAPI, prune_unknown, type_problem
from kubeemu.podprint import pod_restarts, pod_status
from kubeemu.podproxy import PodProxy, proxied_subresources
from kubeemu.resources import Registry, ResourceType
from kubeemu.store import Store

_log = logging.getLogger(__name__)

K8S_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-kubeemu", "gitCommit": "0" * 40,
               "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.0",
               "compiler": "gc", "platform": "linux/amd64"}
_PB_OPENAPI = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
_JSON = "application/json"
#: At most this many queued events go out in one write of a watch.
_WATCH_BATCH = 256
#: How many encoded watch events are kept for the other watchers of the same event.
_ENCODED_EVENTS = 1024

#: Whether this request's answer is protobuf (its Accept lists protobuf first and the resource is
#: a built-in kind): set while dispatching, applied by the middleware and the watch stream.
_OUT_PROTOBUF: contextvars.ContextVar[bool] = contextvars.ContextVar("out_protobuf", default=False)


def _negotiate(accept: str) -> tuple[str, bool]:
    """(the first acceptable media type of ``Accept``: "protobuf", "json" or "", whether JSON is
    acceptable at all). YAML is answered with JSON, which is YAML."""
    first = ""
    json_ok = not accept.strip()
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media == protobuf.CONTENT_TYPE:
            first = first or "protobuf"
        elif "json" in media or "yaml" in media or media in ("*/*", "application/*"):
            first = first or "json"
            json_ok = True
    return first or ("json" if json_ok else ""), json_ok


def _as_protobuf(resp: web.StreamResponse) -> web.StreamResponse:
    """A JSON answer re-encoded as Kubernetes protobuf (objects, lists, Status), headers kept."""
    if not isinstance(resp, web.Response) or resp.content_type != _JSON or not isinstance(resp.body, bytes):
        return resp
    obj = json.loads(resp.body)
    if not isinstance(obj, dict) or protobuf.message_for(obj.get("apiVersion", ""), obj.get("kind", "")) is None:
        return resp
    out = web.Response(body=protobuf.encode(obj), status=resp.status, content_type=protobuf.CONTENT_TYPE)
    for k, v in resp.headers.items():
        if k.lower() not in ("content-type", "content-length"):
            out.headers.add(k, v)
    return out


#: The target whose request body is checked for unknown fields (built-in kinds' writes), set by
#: ``_resource`` around one request; read where the body is decoded.
_FIELD_CHECK: contextvars.ContextVar[Target | None] = contextvars.ContextVar("field_check", default=None)


def _decode_protobuf(raw: bytes) -> Any:
    """A Kubernetes protobuf body (kubectl's typed clients send them) as its JSON object; a body
    that cannot be read is a 400 naming why, as upstream answers an undecodable body."""
    try:
        return protobuf.decode(raw)
    except protobuf.ProtobufError as e:
        raise errors.bad_request(f"the body of the request could not be decoded: {e}") from None


@dataclass
class Faults:
    """Fault hooks set through ``POST /_kubeemu/faults`` (JSON with any of these keys)."""

    latency_ms: float = 0.0
    error_count: int = 0
    error_code: int = 500
    error_path: str = ""
    error_methods: list[str] = field(default_factory=list)

    def take_error(self, method: str, path: str) -> bool:
        if self.error_count <= 0:
            return False
        if self.error_methods and method not in self.error_methods:
            return False
        if self.error_path and not re.search(self.error_path, path):
            return False
        self.error_count -= 1
        return True


@dataclass(frozen=True)
class Target:
    """A parsed resource URL."""

    rt: ResourceType
    version: str
    namespace: str | None  # None: all namespaces / cluster scope
    name: str | None
    sub: str | None
    legacy_watch: bool


def _warning(text: str) -> str:
    """A ``Warning`` header of ``text`` (code 299, RFC 7234 quoted-string). The text may carry
    a client's field name, which may hold anything: callers escape it (``json.dumps``: control
    characters as ``\\uXXXX``), so a CR or LF never ends up in a header (aiohttp then refused
    to write the answer and dropped the connection; found by tests/unit/test_fuzz_kubeemu.py)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 - "{escaped}"'


def _bool(value: str | None) -> bool:
    """Go's strconv.ParseBool truths, which is how the apiserver reads boolean query parameters."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status, content_type=_JSON)


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    try:
        secs = max(0, int(time.time() - calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ"))))
    except ValueError:
        return "<unknown>"
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    if secs < 172800:
        return f"{secs // 3600}h"
    return f"{secs // 86400}d"


# -- storage tables (issue 15): kubectl get pvc/pv/sc columns, as upstream's printers.go -------

_MODE_ABBREV = (("ReadWriteOnce", "RWO"), ("ReadOnlyMany", "ROX"), ("ReadWriteMany", "RWX"),
                ("ReadWriteOncePod", "RWOP"))


def _access_modes(modes: Any) -> str:
    """``GetAccessModesAsString``: RWO,ROX,RWX,RWOP in that order, each once."""
    have = set(modes or [])
    return ",".join(short for full, short in _MODE_ABBREV if full in have)


def _storage_status(o: Obj) -> str:
    return "Terminating" if o["metadata"].get("deletionTimestamp") else str((o.get("status") or {}).get("phase", ""))


def _pvc_capacity(o: Obj) -> str:
    st = o.get("status") or {}
    return str((st.get("capacity") or {}).get("storage", "")) if (o.get("spec") or {}).get("volumeName") else ""


def _pv_claim(o: Obj) -> str:
    ref = (o.get("spec") or {}).get("claimRef") or {}
    return f"{ref.get('namespace')}/{ref.get('name')}" if ref.get("name") else ""


def _sc_name(o: Obj) -> str:
    ann = o["metadata"].get("annotations") or {}
    default = "true" in (ann.get("storageclass.kubernetes.io/is-default-class"),
                         ann.get("storageclass.beta.kubernetes.io/is-default-class"))
    return str(o["metadata"]["name"]) + (" (default)" if default else "")


_StorageColumn = tuple[str, str, int, Callable[[Obj], Any]]
_STORAGE_COLUMNS: dict[tuple[str, str], list[_StorageColumn]] = {
    ("", "persistentvolumeclaims"): [
        ("Status", "string", 0, _storage_status),
        ("Volume", "string", 0, lambda o: (o.get("spec") or {}).get("volumeName", "")),
        ("Capacity", "string", 0, _pvc_capacity),
        ("Access Modes", "string", 0, lambda o: _access_modes((o.get("status") or {}).get("accessModes"))),
        ("StorageClass", "string", 0, lambda o: (o.get("spec") or {}).get("storageClassName") or ""),
        ("VolumeAttributesClass", "string", 0,
         lambda o: (o.get("spec") or {}).get("volumeAttributesClassName") or "<unset>"),
        ("Age", "string", 0, lambda o: _age(o["metadata"].get("creationTimestamp"))),
        ("VolumeMode", "string", 1, lambda o: (o.get("spec") or {}).get("volumeMode") or "Filesystem"),
    ],
    ("", "persistentvolumes"): [
        ("Capacity", "string", 0, lambda o: ((o.get("spec") or {}).get("capacity") or {}).get("storage", "")),
        ("Access Modes", "string", 0, lambda o: _access_modes((o.get("spec") or {}).get("accessModes"))),
        ("Reclaim Policy", "string", 0, lambda o: (o.get("spec") or {}).get("persistentVolumeReclaimPolicy", "")),
        ("Status", "string", 0, _storage_status),
        ("Claim", "string", 0, _pv_claim),
        ("StorageClass", "string", 0, lambda o: (o.get("spec") or {}).get("storageClassName") or ""),
        ("VolumeAttributesClass", "string", 0,
         lambda o: (o.get("spec") or {}).get("volumeAttributesClassName") or "<unset>"),
        ("Reason", "string", 0, lambda o: (o.get("status") or {}).get("reason", "")),
        ("Age", "string", 0, lambda o: _age(o["metadata"].get("creationTimestamp"))),
        ("VolumeMode", "string", 1, lambda o: (o.get("spec") or {}).get("volumeMode") or "Filesystem"),
    ],
    ("storage.k8s.io", "storageclasses"): [
        ("Provisioner", "string", 0, lambda o: o.get("provisioner", "")),
        ("ReclaimPolicy", "string", 0, lambda o: o.get("reclaimPolicy") or "Delete"),
        ("VolumeBindingMode", "string", 0, lambda o: o.get("volumeBindingMode") or "Immediate"),
        ("AllowVolumeExpansion", "string", 0, lambda o: str(bool(o.get("allowVolumeExpansion"))).lower()),
        ("Age", "string", 0, lambda o: _age(o["metadata"].get("creationTimestamp"))),
    ],
}


class EmuServer:
    """One emulated cluster: registry + store + controllers + the aiohttp app."""

    def __init__(
        self,
        name: str = "kubeemu",
        service_cidrs: tuple[str, ...] = ("10.96.0.0/12",),
        log_size: int = 10000,
        bookmark_interval: float = 5.0,
        graceful_pods: bool = False,
        kubelet_host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.registry = Registry()
        self.store = Store(self.registry, service_cidrs, log_size=log_size, graceful_pods=graceful_pods)
        self.controllers = Controllers(self.store)
        self.faults = Faults()
        # pods/log and pods/exec go to the node's kubelet on this host (see kubeemu.podproxy)
        self.pods = PodProxy(self.registry, self.store, kubelet_host)
        self.openapi = OpenAPI(self.registry, self.store)  # /openapi/v3 and v2 (kubeemu.openapi)
        self.store.type_check = self._type_check
        self.bookmark_interval = bookmark_interval
        self.app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.url = ""
        self.requests = 0
        #: Recently sent watch events, encoded (see :meth:`_event_line`), oldest first.
        self._encoded: dict[tuple[int, str, str, bool], tuple[Event, bytes]] = {}
        #: Recently answered or watched objects as JSON, by id (see :meth:`_object_json`), oldest first.
        self._encoded_objects: dict[int, tuple[Obj, bytes]] = {}

    # ---------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen (port 0: ephemeral) and start the controllers; returns the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sock_port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{sock_port}" if ":" not in host else f"http://[{host}]:{sock_port}"
        self._tasks.append(asyncio.create_task(self.controllers.run(), name=f"kubeemu-{self.name}-controllers"))
        _log.info("cluster %s: API server listening on %s", self.name, self.url)
        return self.url

    async def stop(self) -> None:
        for w in self.store.all_watchers():
            w.queue.put_nowait("drop")
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._runner is not None:
            await self._runner.cleanup()

    # ---------------------------------------------------------------- plumbing

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests += 1
        path = request.path
        if not path.startswith("/_kubeemu"):
            if self.faults.latency_ms:
                await asyncio.sleep(self.faults.latency_ms / 1000)
            if self.faults.take_error(request.method, path):
                code = self.faults.error_code
                return _json(ApiError(code, "InternalError" if code == 500 else "ServiceUnavailable",
                                      "Internal error occurred: injected fault").status(), code)
        token = _OUT_PROTOBUF.set(False)
        try:
            try:
                resp = await handler(request)
            except ApiError as e:
                resp = _json(e.status(), e.code)
            if _OUT_PROTOBUF.get():
                resp = _as_protobuf(resp)
            return resp
        finally:
            _OUT_PROTOBUF.reset(token)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts:
            return _json({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/openapi/v2", "/version"]})
        head = parts[0]
        if head == "_kubeemu":
            return await self._admin(request, parts[1:])
        if head in ("healthz", "livez", "readyz"):
            return web.Response(text="ok")
        if head == "version":
            return _json(K8S_VERSION)
        if parts == [".well-known", "openid-configuration"] or parts == ["openid", "v1", "jwks"]:
            return _json(self._oidc(parts[0] == "openid"))
        if head == "openapi":
            if parts[1:] == ["v2"]:
                if "protobuf" in request.headers.get("Accept", ""):
                    return web.Response(body=self.openapi.v2_protobuf(), content_type=_PB_OPENAPI)
                return _json(self.openapi.v2_document())
            if parts[1:2] == ["v3"]:
                return self._openapi_v3("/".join(parts[2:]))
            raise errors.no_route()
        accept = request.headers.get("Accept", "")
        first, json_ok = _negotiate(accept)
        if first == "protobuf" and self._has_protobuf(parts):
            _OUT_PROTOBUF.set(True)  # kubectl's typed clients list protobuf first: upstream answers in it
        elif not json_ok:
            media = f"{_JSON}, {protobuf.CONTENT_TYPE}" if self._has_protobuf(parts) else _JSON
            raise ApiError(406, "NotAcceptable", f"only the following media types are accepted: {media}", {})
        if head == "api":
            if len(parts) == 1:
                host = request.host
                return _json({"kind": "APIVersions", "versions": ["v1"],
                              "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]})
            if parts[1] != "v1":
                raise errors.no_route()
            if len(parts) == 2:
                return _json(self._resource_list("", "v1"))
            return await self._resource(request, self._target("", "v1", parts[2:]))
        if head == "apis":
            groups = self.registry.groups()
            if len(parts) == 1:
                return _json({"kind": "APIGroupList", "apiVersion": "v1",
                              "groups": [self._group_doc(g, vs) for g, vs in groups.items()]})
            group = parts[1]
            if group not in groups:
                raise errors.no_route()
            if len(parts) == 2:
                doc = self._group_doc(group, groups[group])
                doc.update(kind="APIGroup", apiVersion="v1")
                return _json(doc)
            version = parts[2]
            if version not in groups[group]:
                raise errors.no_route()
            if len(parts) == 3:
                return _json(self._resource_list(group, version))
            return await self._resource(request, self._target(group, version, parts[3:]))
        raise errors.no_route()

    def _has_protobuf(self, parts: list[str]) -> bool:
        """Whether a resource path has a protobuf form: the built-in kinds kubeemu has message
        tables for (kubeemu.protobuf) do; custom resources do not (upstream neither)."""
        if parts[0] == "api":
            return len(parts) > 2
        if parts[0] != "apis" or len(parts) < 4:
            return False
        group, version = parts[1], parts[2]
        types = [rt for rt in self.registry.all() if rt.group == group]
        return bool(types) and all(rt.builtin and protobuf.message_for(f"{group}/{version}", rt.kind) for rt in types)

    # ---------------------------------------------------------------- discovery

    def _oidc(self, jwks: bool) -> dict[str, Any]:
        """ServiceAccountIssuerDiscovery: the issuer's OpenID configuration and its signing keys."""
        issuer = subresources.issuer_of(self.store)
        if jwks:
            return issuer.jwks()
        return {"issuer": subresources.ISSUER, "jwks_uri": f"{self.url}/openid/v1/jwks",
                "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": [issuer.alg]}

    def _openapi_v3(self, path: str) -> web.Response:
        """``/openapi/v3`` (the index, never cached) and ``/openapi/v3/GV`` (immutable per hash)."""
        if not path:
            resp = _json(self.openapi.v3_index())
            resp.headers["Cache-Control"] = "no-cache, private"
            return resp
        found = self.openapi.v3_document(path)
        if found is None:
            raise errors.no_route()
        resp = _json(found[0])
        resp.headers["Etag"] = f'"{found[1]}"'
        return resp

    @staticmethod
    def _group_doc(group: str, versions: list[str]) -> dict[str, Any]:
        vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": vs, "preferredVersion": vs[0]}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources: list[dict[str, object]] = []
        for rt in self.registry.in_group_version(group, version):
            resources.extend(rt.describe(version))
            resources.extend(proxied_subresources(rt.key).values())
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

    def _target(self, group: str, version: str, rest: list[str]) -> Target:
        legacy = False
        if rest and rest[0] == "watch":
            legacy, rest = True, rest[1:]
        ns: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            ns, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise errors.no_route()
        rt = self.registry.lookup(group, version, rest[0])
        if rt is None:
            raise errors.no_route()
        if ns is not None and not rt.namespaced:
            raise errors.no_route()
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None:
            allowed = ({"status"} if rt.has_status(version) else set()) | set(rt.extra_subresources)
            allowed |= set(proxied_subresources(rt.key))
            if sub not in allowed:
                raise errors.no_route()
        if rt.namespaced and ns is None and name is not None:
            raise errors.no_route()
        return Target(rt, version, ns, name, sub, legacy)

    # ---------------------------------------------------------------- resources

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        ctype = request.headers.get("Content-Type", "")
        if ctype.startswith(protobuf.CONTENT_TYPE):
            return self._check_fields(_decode_protobuf(raw), ctype)
        try:
            if "yaml" in ctype:
                import yaml  # only server-side apply sends YAML; keep it out of the idle footprint

                try:
                    doc = yaml.safe_load(raw)
                except yaml.YAMLError as e:  # not a ValueError: was a 500 (tests/unit/test_fuzz_kubeemu.py)
                    raise errors.bad_request(f"the body of the request could not be decoded: {e}") from None
                return self._check_fields(doc, ctype)
            return self._check_fields(json.loads(raw), ctype)
        except ValueError as e:
            raise errors.bad_request(f"the body of the request could not be decoded: {e}") from None

    def _check_fields(self, body: Any, ctype: str) -> Any:
        """Unknown fields of a built-in kind's body are dropped, as decoding into the Go type does
        upstream; ``fieldValidation=Strict`` refuses them instead, Warn (the default) adds a
        ``Warning`` each. Custom resources are checked by the store against their CRD's schema."""
        target = _FIELD_CHECK.get()
        if target is None or not isinstance(body, dict) or "json-patch" in ctype:
            return body
        kind_schema = self.openapi.kind_schema(target.rt, target.version)
        if kind_schema is None:
            return body
        dropped = prune_unknown(body, kind_schema, patch="strategic-merge-patch" in ctype)
        if dropped:
            unknown = ", ".join(f'unknown field "{d}"' for d in dropped)
            mode = schema.FIELD_VALIDATION.get()
            if mode == "Strict":
                kind, version = target.rt.kind, target.version
                raise errors.bad_request(
                    f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: {unknown}'
                )
            sink = schema.PRUNED.get()
            if sink is not None and mode != "Ignore":
                sink.extend(dropped)
        return body

    def _type_check(self, rt: ResourceType, version: str, obj: Obj) -> None:
        """A built-in kind's object whose JSON types do not fit its schema is 400, as upstream's
        decoding refuses it (:func:`kubeemu.openapi.type_problem`)."""
        kind_schema = self.openapi.kind_schema(rt, version)
        problem = type_problem(obj, kind_schema) if kind_schema is not None else None
        if problem is not None:
            raise errors.bad_request(f'{rt.kind} in version "{version}" cannot be handled as a {rt.kind}: {problem}')

    def _out(self, t: Target, obj: Obj) -> Obj:
        """Present a stored object through the requested version (CRD conversion None)."""
        want = t.rt.api_version(t.version)
        if obj.get("apiVersion") != want:
            obj = dict(obj, apiVersion=want)
        return obj

    def _match(self, t: Target, q: Mapping[str, str]) -> selectors.Predicate:
        try:
            labels = selectors.parse_labels(q.get("labelSelector"))
            fields = selectors.parse_fields(q.get("fieldSelector"), t.rt.field_labels, t.rt.plural)
        except selectors.SelectorError as e:
            raise errors.bad_request(str(e)) from None
        ns = t.namespace
        if t.name is not None and not t.rt.namespaced:
            ns = None
        return selectors.predicate(labels, fields, ns)

    async def _resource(self, request: web.Request, t: Target) -> web.StreamResponse:
        """One request on a resource; for writes of custom resources, unknown fields are pruned
        as ``fieldValidation`` says (Strict: 400; Warn, the default: a ``Warning`` header each)."""
        if t.name is not None and t.sub in proxied_subresources(t.rt.key):
            proxy = self.pods.logs if t.sub == "log" else self.pods.exec
            return await proxy(request, t.namespace or "", t.name)
        pruned: list[str] = []
        tokens = (schema.FIELD_VALIDATION.set(request.query.get("fieldValidation", "")), schema.PRUNED.set(pruned))
        checked = t.rt.builtin and t.sub in (None, "status") and request.method in ("POST", "PUT", "PATCH")
        field_check = _FIELD_CHECK.set(t if checked else None)
        try:
            resp = await self._resource_inner(request, t)
        finally:
            schema.FIELD_VALIDATION.reset(tokens[0])
            schema.PRUNED.reset(tokens[1])
            _FIELD_CHECK.reset(field_check)
        for path in pruned:
            resp.headers.add("Warning", _warning(f"unknown field {json.dumps(path)}"))
        return resp

    async def _resource_inner(self, request: web.Request, t: Target) -> web.StreamResponse:
        q = request.query
        method = request.method
        dry = "All" in q.getall("dryRun", [])
        ns = t.namespace or ""
        store = self.store
        wants_table = "as=Table" in request.headers.get("Accept", "")
        if t.name is None:
            if method == "GET":
                match = self._match(t, q)
                if t.legacy_watch or _bool(q.get("watch")):
                    return await self._watch(request, t, match, wants_table)
                limit = int(q.get("limit", "0") or 0)
                res = store.list_objects(t.rt, match, limit, q.get("continue", ""))
                if wants_table:
                    return _json(self._table(t, res.items, str(res.rv), res.cont, q.get("includeObject", "")))
                items = [self._out(t, o) for o in res.items]
                if t.rt.builtin:
                    items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
                meta: dict[str, Any] = {"resourceVersion": str(res.rv)}
                if res.cont:
                    meta["continue"] = res.cont
                    meta["remainingItemCount"] = res.remaining
                return _json({"kind": t.rt.list_kind, "apiVersion": t.rt.api_version(t.version),
                              "metadata": meta, "items": items})
            if method == "POST":
                if t.namespace is None and t.rt.namespaced:
                    raise errors.method_not_allowed(method)
                body = await self._body(request)
                obj = store.create(t.rt, ns, body, t.version, dry, owned=True)  # decoded for this request only
                return self._object(self._out(t, obj), 201)
            if method == "DELETE":
                match = self._match(t, q)
                opts = self._delete_opts(q, await self._body(request))
                deleted: list[Obj] = []
                for obj in list(store.list_objects(t.rt, match).items):
                    m = obj["metadata"]
                    with contextlib.suppress(ApiError):
                        deleted.append(store.delete(t.rt, m.get("namespace", ""), m["name"], opts)[0])
                return _json({"kind": t.rt.list_kind, "apiVersion": t.rt.api_version(t.version),
                              "metadata": {"resourceVersion": str(store.rv)},
                              "items": [self._out(t, o) for o in deleted]})
            raise errors.method_not_allowed(method)
        name = t.name
        if t.legacy_watch:
            q2 = dict(q)
            q2["fieldSelector"] = ",".join(filter(None, [q.get("fieldSelector"), f"metadata.name={name}"]))
            t2 = Target(t.rt, t.version, t.namespace, None, None, True)
            return await self._watch(request, t2, self._match(t2, q2), wants_table)
        if t.sub in subresources.HANDLED:
            body = await self._body(request) if method in ("POST", "PUT", "PATCH") else None
            code, out = subresources.handle(store, t.rt, t.version, ns, name, t.sub, method,
                                            request.headers.get("Content-Type", ""), body, dry)
            return _json(out, code)
        if t.sub == "binding":
            if method != "POST":
                raise errors.method_not_allowed(method)
            store.bind(ns, name, await self._body(request) or {})
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201},
                         201)
        if t.sub == "finalize":
            if method != "PUT":
                raise errors.method_not_allowed(method)
            body = await self._body(request) or {}
            old = store.get(t.rt, ns, name)
            new = dict(old, spec=dict(old.get("spec") or {}, finalizers=(body.get("spec") or {}).get("finalizers")))
            return _json(store._write(t.rt, old, new, True, dry))
        sub = t.sub
        if method == "GET":
            obj = store.get(t.rt, ns, name)
            if wants_table:
                return _json(self._table(t, [obj], obj["metadata"]["resourceVersion"], "", q.get("includeObject", "")))
            return self._object(self._out(t, obj))
        if method == "PUT":
            body = await self._body(request)
            return self._object(self._out(t, store.update(t.rt, ns, name, body, t.version, sub, dry)))
        if method == "PATCH":
            body = await self._body(request)
            ctype = request.headers.get("Content-Type", "")
            if ctype.startswith("application/apply-patch"):
                existed = (ns if t.rt.namespaced else "", name) in store.bucket(t.rt.key)
                obj = store.patch(t.rt, ns, name, ctype, body, t.version, sub, dry)
                return self._object(self._out(t, obj), 200 if existed else 201)
            return self._object(self._out(t, store.patch(t.rt, ns, name, ctype, body, t.version, sub, dry)))
        if method == "DELETE":
            if sub:
                raise errors.method_not_allowed(method)
            opts = self._delete_opts(q, await self._body(request))
            obj, gone = store.delete(t.rt, ns, name, opts)
            code = 200 if gone or dry else 202 if t.rt.key == ("", "namespaces") else 200
            return self._object(self._out(t, obj), code)
        raise errors.method_not_allowed(method)

    @staticmethod
    def _delete_opts(q: Mapping[str, str], body: Any) -> DeleteOptions:
        opts = DeleteOptions()
        src: dict[str, Any] = dict(body) if isinstance(body, dict) else {}
        for k in ("propagationPolicy", "gracePeriodSeconds", "orphanDependents"):
            if k in q and k not in src:
                src[k] = q[k]
        opts.propagation = src.get("propagationPolicy")
        if str(src.get("orphanDependents", "")).lower() == "true":
            opts.propagation = "Orphan"
        if src.get("gracePeriodSeconds") is not None:
            opts.grace_seconds = int(src["gracePeriodSeconds"])
        pre = src.get("preconditions") or {}
        opts.precondition_uid = pre.get("uid")
        opts.precondition_rv = pre.get("resourceVersion")
        opts.dry_run = "All" in (src.get("dryRun") or []) or q.get("dryRun") == "All"
        if opts.propagation not in (None, "Orphan", "Background", "Foreground"):
            raise errors.bad_request(f"propagationPolicy: Unsupported value: {opts.propagation!r}")
        return opts

    # ---------------------------------------------------------------- watch

    async def _watch(self, request: web.Request, t: Target, match: selectors.Predicate,
                     table: bool) -> web.StreamResponse:
        q = request.query
        bookmarks = _bool(q.get("allowWatchBookmarks"))
        initial = _bool(q.get("sendInitialEvents"))
        timeout = float(q.get("timeoutSeconds", "0") or 0)
        ctype = f"{protobuf.CONTENT_TYPE};stream=watch" if _OUT_PROTOBUF.get() and not table else _JSON
        resp = web.StreamResponse(status=200, headers={"Content-Type": ctype, "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        try:
            first, w = self.store.start_watch(t.rt, match, "0" if initial else q.get("resourceVersion"))
        except ApiError as e:
            if e.code != 410:
                raise
            await resp.prepare(request)
            await resp.write(self._line("ERROR", e.status(), t, False))
            await resp.write_eof()
            return resp
        start_rv = self.store.rv
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        next_bookmark = loop.time() + self.bookmark_interval
        drop = False
        sent_columns = False
        try:
            synthetic = q.get("resourceVersion") in (None, "", "0") or initial
            replay: list[bytes] = []
            for ev in first:
                out = ("ADDED", ev.obj) if synthetic else transition(ev, match)
                if out is not None:
                    replay.append(self._event_line(t, ev, out, table, not sent_columns))
                    sent_columns = sent_columns or table
            if replay:
                await resp.write(b"".join(replay))
            if initial and bookmarks:
                await resp.write(self._bookmark(t, start_rv, initial_end=True))
            while True:
                now = loop.time()
                waits = [d - now for d in (deadline, next_bookmark if bookmarks else None) if d is not None]
                try:
                    async with asyncio.timeout(max(0.0, min(waits)) if waits else None):
                        item = await w.queue.get()
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        break
                    await resp.write(self._bookmark(t, self.store.rv, initial_end=False))
                    next_bookmark = loop.time() + self.bookmark_interval
                    continue
                # What else is queued goes out in the same write (one chunk, one send): under
                # load a watcher's events come in bursts, and a send per event costs more than
                # encoding it.
                batch = [item]
                while len(batch) < _WATCH_BATCH and not w.queue.empty():
                    batch.append(w.queue.get_nowait())
                chunk: list[bytes] = []
                signal = ""
                for it in batch:
                    if isinstance(it, str):
                        signal = it  # the watch ends here: what follows it is never sent
                        break
                    out = transition(it, match)
                    if out is not None:
                        chunk.append(self._event_line(t, it, out, table, not sent_columns))
                        sent_columns = sent_columns or table
                if chunk:
                    await resp.write(b"".join(chunk))
                if signal == "drop":
                    drop = True
                    break
                if signal == "expire":
                    err = errors.gone_rv(self.store.rv, self.store.rv + 1).status()
                    await resp.write(self._line("ERROR", err, t, False))
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            drop = True
        finally:
            self.store.stop_watch(w)
        if drop:
            if request.transport is not None:
                request.transport.close()
            return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    def _event_obj(self, t: Target, obj: Obj, table: bool, columns: bool) -> Obj:
        if not table:
            return self._out(t, obj)
        tab = self._table(t, [obj], obj["metadata"]["resourceVersion"], "", "Object")
        if not columns:
            tab["columnDefinitions"] = []
        return tab

    def _event_line(self, t: Target, ev: Event, out: tuple[str, Obj], table: bool, columns: bool) -> bytes:
        """One watch event as sent; encoded once for every watcher that sees it the same way
        (same event type, apiVersion and encoding; Tables are per watcher), since each change
        to a pod goes to the kubelet, the controller-manager, the scheduler and more."""
        if table:
            return self._line(out[0], self._event_obj(t, out[1], table, columns), t, False)
        key = (id(ev), out[0], t.rt.api_version(t.version), _OUT_PROTOBUF.get())
        hit = self._encoded.get(key)
        if hit is not None and hit[0] is ev:
            return hit[1]
        if _OUT_PROTOBUF.get():
            line = self._line(out[0], self._out(t, out[1]), t, False)
        else:  # what _line makes, around the object's JSON as its write's answer had it
            line = b'{"type":"' + out[0].encode() + b'","object":' + self._object_json(self._out(t, out[1])) + b"}\n"
        # The entry holds the event, so its id cannot be reused while the entry lives.
        self._encoded[key] = (ev, line)
        if len(self._encoded) > _ENCODED_EVENTS:
            del self._encoded[next(iter(self._encoded))]
        return line

    def _object(self, obj: Obj, status: int = 200) -> web.Response:
        """The answer carrying one object (a write's or a GET's): :func:`_json`'s bytes, from
        :meth:`_object_json`."""
        return web.Response(body=self._object_json(obj), status=status, content_type=_JSON)

    def _object_json(self, obj: Obj) -> bytes:
        """``obj`` as compact JSON, encoded once for the answer to the write that stored it and
        for the watch events that carry that same object (every pod write was encoded twice:
        its answer, then its event: half the encoding, a few per cent of a write's CPU). Stored
        objects are never changed in place (a write stores a new object), so the bytes stay right
        for as long as the entry holds the object, which also keeps its id from being reused."""
        hit = self._encoded_objects.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        raw = json.dumps(obj, separators=(",", ":")).encode()
        self._encoded_objects[id(obj)] = (obj, raw)
        if len(self._encoded_objects) > _ENCODED_EVENTS:
            del self._encoded_objects[next(iter(self._encoded_objects))]
        return raw

    def _line(self, etype: str, obj: Obj, t: Target, _unused: bool) -> bytes:
        if _OUT_PROTOBUF.get() and obj.get("kind") != "Table":
            return protobuf.encode_watch_event(etype, obj)
        return json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode() + b"\n"

    def _bookmark(self, t: Target, rv: int, initial_end: bool) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return self._line("BOOKMARK", {"kind": t.rt.kind, "apiVersion": t.rt.api_version(t.version),
                                       "metadata": meta}, t, False)

    # ---------------------------------------------------------------- tables

    def _table(self, t: Target, items: list[Obj], rv: str, cont: str, include: str) -> dict[str, Any]:
        cols: list[tuple[str, str, int, Callable[[Obj], Any]]] = [
            ("Name", "string", 0, lambda o: o["metadata"]["name"]),
        ]
        key = t.rt.key
        if key == ("", "pods"):
            def ready(o: Obj) -> str:
                cs = (o.get("status") or {}).get("containerStatuses") or []
                n = len((o.get("spec") or {}).get("containers") or [])
                return f"{sum(1 for c in cs if c.get('ready'))}/{n}"

            def phase(o: Obj) -> str:
                return pod_status(o)  # upstream printPod: CrashLoopBackOff, Completed, Init:0/1, ...

            cols += [("Ready", "string", 0, ready), ("Status", "string", 0, phase),
                     ("Restarts", "string", 0, lambda o: pod_restarts(o, _age)),
                     ("Age", "string", 0, lambda o: _age(o["metadata"].get("creationTimestamp"))),
                     ("IP", "string", 1, lambda o: (o.get("status") or {}).get("podIP") or "<none>"),
                     ("Node", "string", 1, lambda o: (o.get("spec") or {}).get("nodeName") or "<none>")]
        elif key == ("", "nodes"):
            def nready(o: Obj) -> str:
                conds = (o.get("status") or {}).get("conditions") or []
                r = next((c for c in conds if c.get("type") == "Ready"), None)
                return "Ready" if r and r.get("status") == "True" else "NotReady"

            def addr(kind: str) -> Callable[[Obj], str]:
                return lambda o: next((a.get("address") for a in (o.get("status") or {}).get("addresses") or []
                                       if a.get("type") == kind), "<none>")

            cols += [("Status", "string", 0, nready), ("Roles", "string", 0, lambda o: "<none>"),
                     ("Age", "string", 0, lambda o: _age(o["metadata"].get("creationTimestamp"))),
                     ("Version", "string", 0, lambda o: ((o.get("status") or {}).get("nodeInfo") or {})
                      .get("kubeletVersion", "")),
                     ("Internal-IP", "string", 1, addr("InternalIP"))]
        elif key == ("", "services"):
            cols += [("Type", "string", 0, lambda o: (o.get("spec") or {}).get("type", "")),
                     ("Cluster-IP", "string", 0, lambda o: (o.get("spec") or {}).get("clusterIP", "")),
                     ("Port(s)", "string", 0, lambda o: ",".join(
                         f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in (o.get("spec") or {}).get("ports")
                         or []) or "<none>"),
                     ("Age", "string", 0, lambda o: _age(o["metadata"].get("creationTimestamp")))]
        elif key == ("", "namespaces"):
            cols += [("Status", "string", 0, lambda o: (o.get("status") or {}).get("phase", "")),
                     ("Age", "string", 0, lambda o: _age(o["metadata"].get("creationTimestamp")))]
        elif key in _STORAGE_COLUMNS:
            if key == ("storage.k8s.io", "storageclasses"):
                cols = [("Name", "string", 0, _sc_name)]
            cols += _STORAGE_COLUMNS[key]
        else:
            cols.append(("Age", "string", 0, lambda o: _age(o["metadata"].get("creationTimestamp"))))
        rows = []
        for o in items:
            row: dict[str, Any] = {"cells": [c[3](o) for c in cols]}
            if include == "Object":
                row["object"] = self._out(t, o)
            elif include != "None":
                row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                 "metadata": o["metadata"]}
            rows.append(row)
        meta: dict[str, Any] = {"resourceVersion": rv}
        if cont:
            meta["continue"] = cont
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
                "columnDefinitions": [{"name": n, "type": ty, "format": "name" if n == "Name" else "",
                                       "description": n, "priority": p} for n, ty, p, _ in cols],
                "rows": rows}

    # ---------------------------------------------------------------- admin

    async def _admin(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        what = "/".join(parts)
        m = request.method
        if what == "faults":
            if m == "GET":
                return _json(asdict(self.faults))
            if m == "DELETE":
                self.faults = Faults()
                return _json(asdict(self.faults))
            if m in ("POST", "PUT"):
                body = await self._body(request) or {}
                for k, v in body.items():
                    if not hasattr(self.faults, k):
                        raise errors.bad_request(f"unknown fault {k!r}; known: {', '.join(asdict(self.faults))}")
                    setattr(self.faults, k, v)
                return _json(asdict(self.faults))
        if what in ("watches/drop", "watches/expire") and m == "POST":
            ws = self.store.all_watchers()
            for w in ws:
                w.queue.put_nowait("drop" if what.endswith("drop") else "expire")
            return _json({"watches": len(ws)})
        if what == "compact" and m == "POST":
            self.store.compact()
            return _json({"compactedRevision": self.store.compacted_rv})
        if what == "stats" and m == "GET":
            return _json({
                "name": self.name, "resourceVersion": self.store.rv, "compactedRevision": self.store.compacted_rv,
                "logEntries": len(self.store.log), "watches": len(self.store.all_watchers()),
                "requests": self.requests,
                "objects": {f"{k[1]}.{k[0]}" if k[0] else k[1]: len(b) for k, b in self.store.objects.items() if b},
            })
        raise errors.no_route()


__all__ = ["EmuServer", "Faults", "Watcher"]
