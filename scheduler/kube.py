"""API access for the scheduler: raw JSON over one urllib3 pool, and list+watch informers.

Why not the ``kubernetes`` package's typed client: turning every pod and node into generated model
objects costs far more than the scheduling itself at hundreds of pods per second. The package is
used only for what it does well, reading a kubeconfig or the in-cluster service account
(:func:`connect`); every request after that is plain JSON on a shared connection pool.

In order:

1. :func:`connect` resolves the server (``--master`` URL, ``--kubeconfig`` file, in-cluster, or
   the default kubeconfig) into an :class:`Api`: host, TLS material, bearer token.
2. :class:`Api` sends requests (``get``/``create``/``update``/``patch``) and returns decoded JSON;
   a non-2xx answer raises :class:`ApiError` carrying the HTTP code and the Status reason, so
   callers branch on ``409`` (already bound, lease conflict) or ``404`` (absent CRD).
3. :class:`Informer` is client-go's reflector for one resource: a paged LIST, then a WATCH from
   the list's ``resourceVersion`` with bookmarks; a ``410 Gone`` (expired resourceVersion) or a
   broken stream re-lists and reconciles the store (synthetic ADDED/MODIFIED/DELETED for what
   changed meanwhile). A ``404`` on LIST means the resource is not served (a CRD not installed):
   the informer counts as synced with an empty store and retries later, so an absent CRD never
   stops the scheduler. Handlers run on the informer's thread, in event order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

_log = logging.getLogger(__name__)

Obj = dict[str, Any]
#: An informer event handler: (type ``ADDED``/``MODIFIED``/``DELETED``, old object or None, new
#: object or None for deletions).
Handler = Callable[[str, Obj | None, Obj | None], None]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer: ``status`` is the HTTP code, ``reason`` the Status reason
    (``AlreadyExists``, ``Conflict``, ``NotFound``, ``Expired``...)."""

    def __init__(self, status: int, reason: str, message: str, method: str = "", path: str = "") -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class Api:
    """One API server: base URL, TLS material and credentials, one connection pool shared by the
    informers, the binders and the status writers (``maxsize`` bounds concurrent requests)."""

    host: str
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    maxsize: int = 64
    user_agent: str = "kosmos-scheduler"
    _pool: urllib3.PoolManager = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.host = self.host.rstrip("/")
        kw: dict[str, Any] = {"maxsize": self.maxsize, "block": False, "retries": False}
        if self.host.startswith("https"):
            kw["cert_reqs"] = "CERT_REQUIRED" if self.verify else "CERT_NONE"
            if self.ca_file:
                kw["ca_certs"] = self.ca_file
            if self.cert_file:
                kw["cert_file"] = self.cert_file
                kw["key_file"] = self.key_file
        self._pool = urllib3.PoolManager(num_pools=4, **kw)

    def headers(self, ctype: str | None = None) -> dict[str, str]:
        h = {"Accept": JSON, "User-Agent": self.user_agent}
        if self.token:
            h["Authorization"] = self.token if self.token.lower().startswith("bearer ") else f"Bearer {self.token}"
        if ctype:
            h["Content-Type"] = ctype
        return h

    def request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None,
                ctype: str = JSON, timeout: float = 30.0) -> Any:
        """Send one request; decoded JSON back (None for an empty body); :class:`ApiError` on non-2xx."""
        url = self.host + path + (("?" + urlencode(query)) if query else "")
        data = None if body is None else json.dumps(body).encode()
        r = self._pool.request(method, url, body=data, headers=self.headers(ctype if data is not None else None),
                               timeout=urllib3.Timeout(connect=min(10.0, timeout), read=timeout), preload_content=True)
        raw = r.data
        if r.status >= 300:
            raise _error(r.status, raw, method, path)
        return json.loads(raw) if raw else None

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def get_or_none(self, path: str, *, timeout: float = 30.0) -> Any:
        """The object at ``path`` as the server has it now, or None when there is none (404);
        every other failure raises :class:`ApiError`."""
        try:
            return self.request("GET", path, timeout=timeout)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, body: Obj, *, timeout: float = 30.0) -> Any:
        return self.request("POST", path, body, timeout=timeout)

    def update(self, path: str, body: Obj, *, timeout: float = 30.0) -> Any:
        return self.request("PUT", path, body, timeout=timeout)

    def patch(self, path: str, body: Obj, ctype: str = MERGE_PATCH) -> Any:
        return self.request("PATCH", path, body, ctype=ctype)

    def stream(self, path: str, query: dict[str, Any], read_timeout: float | None) -> urllib3.BaseHTTPResponse:
        """A streaming GET (a watch, a followed log: ``read_timeout`` None waits forever); the
        caller reads and releases the response."""
        url = self.host + path + "?" + urlencode(query)
        r = self._pool.request("GET", url, headers=self.headers(), preload_content=False,
                               timeout=urllib3.Timeout(connect=10.0, read=read_timeout))
        if r.status >= 300:
            raw = r.read()
            r.release_conn()
            raise _error(r.status, raw, "GET", path)
        return r


def _error(status: int, raw: bytes, method: str, path: str) -> ApiError:
    reason, message = "", raw[:300].decode(errors="replace")
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict):
            reason, message = str(doc.get("reason") or ""), str(doc.get("message") or message)
    except ValueError:
        pass
    return ApiError(status, reason, message, method, path)


def connect(master: str | None = None, kubeconfig: str | None = None, context: str | None = None) -> Api:
    """The API server to talk to, resolved as kube-scheduler does: ``--master`` overrides the
    kubeconfig's server; no kubeconfig inside a pod means the in-cluster service account;
    otherwise ``$KUBECONFIG`` / ``~/.kube/config``."""
    if master and not kubeconfig:
        return Api(master)
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    cfg = kclient.Configuration()
    if kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        kconfig.load_kube_config(config_file=kubeconfig, context=context,  # type: ignore[no-untyped-call]
                                 client_configuration=cfg)
    else:
        kconfig.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    return _api_from(cfg, master)


def connect_kubeconfig(doc: Obj, context: str | None = None, *, user_agent: str = "kosmos-scheduler") -> Api:
    """The API server a kubeconfig held in memory names (e.g. read from a Secret: ClusterTree's
    leaf clusters), resolved by the same loader as :func:`connect`; embedded certificates are
    written to temporary files by that loader. A kubeconfig that names no usable server or
    credentials raises the loader's ``ConfigException`` (its message says what is missing)."""
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    cfg = kclient.Configuration()
    kconfig.load_kube_config_from_dict(doc, context=context,  # type: ignore[no-untyped-call]
                                       client_configuration=cfg)
    api = _api_from(cfg, None)
    api.user_agent = user_agent
    return api


def _api_from(cfg: Any, master: str | None) -> Api:
    """An :class:`Api` from a loaded ``kubernetes.client.Configuration`` (``master`` overrides its host)."""
    token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    prefix = (cfg.api_key_prefix or {}).get("authorization")
    if token and prefix and not token.lower().startswith("bearer "):
        token = f"{prefix} {token}"
    return Api(master or cfg.host, token=token, ca_file=cfg.ssl_ca_cert, cert_file=cfg.cert_file,
               key_file=cfg.key_file, verify=bool(cfg.verify_ssl))


def resource_path(group_version: str, resource: str, namespace: str | None = None, name: str | None = None,
                  sub: str | None = None) -> str:
    """``/api/v1/namespaces/NS/pods/NAME/binding`` and the like."""
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    p = base + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{resource}"
    if name:
        p += f"/{quote(name)}"
    if sub:
        p += f"/{sub}"
    return p


def object_key(obj: Obj) -> str:
    """``ns/name`` for namespaced objects, ``name`` for cluster-scoped ones (the listers' keys)."""
    m = obj["metadata"]
    ns = m.get("namespace")
    return f"{ns}/{m['name']}" if ns else str(m["name"])


class Informer:
    """List+watch of one resource into a dict store, calling ``handlers`` per change.

    ``synced`` is set after the first LIST (or its 404). Other threads read the store (listers):
    by key always; by iteration only with ``copy_on_write``."""

    #: Seconds before a LIST that answered 404 (resource not served) is tried again.
    ABSENT_RETRY_S = 30.0
    #: Server-side watch timeout; a fresh WATCH from the last resourceVersion follows.
    WATCH_TIMEOUT_S = 300
    PAGE = 500

    def __init__(self, api: Api, group_version: str, resource: str, *, label_selector: str | None = None,
                 field_selector: str | None = None, copy_on_write: bool = False) -> None:
        self.api = api
        self.group_version = group_version
        self.resource = resource
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.store: dict[str, Obj] = {}
        #: Replace the store on every change instead of mutating it, so a reader on another
        #: thread may iterate the dict it got for as long as it likes (the small listers:
        #: PVCs, policies...). Pods and nodes are read by key only and mutated in place.
        self.copy_on_write = copy_on_write
        self.handlers: list[Handler] = []
        self.synced = threading.Event()
        #: False while the resource answered 404 (e.g. a CRD not installed).
        self.served = True
        self.resource_version = ""
        self._stop = threading.Event()
        self._resp: urllib3.BaseHTTPResponse | None = None
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return resource_path(self.group_version, self.resource)

    def _put(self, key: str, obj: Obj) -> None:
        if self.copy_on_write:
            self.store = {**self.store, key: obj}
        else:
            self.store[key] = obj

    def _pop(self, key: str) -> Obj | None:
        if not self.copy_on_write:
            return self.store.pop(key, None)
        prev = self.store.get(key)
        if prev is not None:
            self.store = {k: v for k, v in self.store.items() if k != key}
        return prev

    def add_handler(self, h: Handler) -> None:
        self.handlers.append(h)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.resource}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        r = self._resp
        if r is not None:
            with contextlib.suppress(Exception):  # best effort on an already closed stream
                r.shutdown()  # unblocks the reader

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _emit(self, kind: str, old: Obj | None, new: Obj | None) -> None:
        for h in self.handlers:
            try:
                h(kind, old, new)
            except Exception:
                _log.exception("%s handler failed on %s %s", self.resource, kind,
                               object_key(new or old or {"metadata": {"name": "?"}}))

    def _query(self) -> dict[str, Any]:
        q: dict[str, Any] = {}
        if self.label_selector:
            q["labelSelector"] = self.label_selector
        if self.field_selector:
            q["fieldSelector"] = self.field_selector
        return q

    def _list(self) -> None:
        """Paged LIST; reconcile the store (a re-list after a gap emits what changed meanwhile)."""
        items: dict[str, Obj] = {}
        cont = ""
        rv = ""
        while True:
            q = self._query() | {"limit": self.PAGE}
            if cont:
                q["continue"] = cont
            doc = self.api.request("GET", self.path, query=q, timeout=120.0)
            for it in doc.get("items") or []:
                items[object_key(it)] = it
            meta = doc.get("metadata") or {}
            rv = meta.get("resourceVersion") or rv
            cont = meta.get("continue") or ""
            if not cont:
                break
        self.resource_version = rv
        old_store = self.store
        for k, obj in items.items():
            prev = old_store.get(k)
            if prev is None:
                self._put(k, obj)
                self._emit("ADDED", None, obj)
            elif prev["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._put(k, obj)
                self._emit("MODIFIED", prev, obj)
        for k in [k for k in old_store if k not in items]:
            prev = self._pop(k)
            if prev is not None:
                self._emit("DELETED", prev, None)

    def _lines(self, r: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        buf = b""
        for chunk in r.stream(65536):
            if b"\n" not in chunk:
                buf += chunk
                continue
            lines = (buf + chunk).split(b"\n")
            buf = lines.pop()
            for line in lines:
                if line.strip():
                    yield line
        if buf.strip():
            yield buf

    def _watch(self) -> bool:
        """One WATCH from ``resource_version``; False when a re-list is needed (410)."""
        q = self._query() | {"watch": "true", "allowWatchBookmarks": "true",
                             "resourceVersion": self.resource_version, "timeoutSeconds": self.WATCH_TIMEOUT_S}
        r = self.api.stream(self.path, q, read_timeout=self.WATCH_TIMEOUT_S + 30)
        self._resp = r
        try:
            for line in self._lines(r):
                if self._stop.is_set():
                    return True
                ev = json.loads(line)
                kind, obj = ev.get("type"), ev.get("object") or {}
                if kind == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        return False
                    raise ApiError(int(code or 500), str(obj.get("reason") or ""), str(obj.get("message") or ""),
                                   "WATCH", self.path)
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    self.resource_version = rv
                if kind == "BOOKMARK":
                    continue
                key = object_key(obj)
                if kind == "DELETED":
                    prev = self._pop(key)
                    if prev is not None:
                        self._emit("DELETED", prev, None)
                else:
                    prev = self.store.get(key)
                    self._put(key, obj)
                    self._emit("ADDED" if prev is None else "MODIFIED", prev, obj)
            return True
        finally:
            self._resp = None
            r.release_conn()

    def _run(self) -> None:
        need_list = True
        delay = 0.0
        while not self._stop.is_set():
            if delay:
                self._stop.wait(delay)
                if self._stop.is_set():
                    return
            try:
                if need_list:
                    self._list()
                    self.served = True
                    need_list = False
                    self.synced.set()
                need_list = not self._watch()
                delay = 0.0
                if need_list:
                    _log.info("%s: resourceVersion expired (410), re-listing", self.resource)
            except ApiError as e:
                if e.status == 404 and need_list:
                    if self.served:
                        _log.info("%s (%s) is not served (404); treated as empty, retrying every %gs",
                                  self.resource, self.group_version, self.ABSENT_RETRY_S)
                    self.served = False
                    for k in list(self.store):
                        prev = self._pop(k)
                        if prev is not None:
                            self._emit("DELETED", prev, None)
                    self.synced.set()
                    delay = self.ABSENT_RETRY_S
                    continue
                if e.status == 410:
                    need_list = True
                    continue
                if not self._stop.is_set():
                    _log.warning("%s: %s; retrying", self.resource, e)
                need_list = need_list or e.status == 404
                delay = 1.0
            except Exception as e:  # a broken stream or a refused connection: retry
                if self._stop.is_set():
                    return
                _log.warning("%s watch broke (%s: %s); retrying", self.resource, type(e).__name__, e)
                delay = 1.0


def wait_synced(informers: list[Informer], timeout: float | None = None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    for inf in informers:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not inf.synced.wait(left):
            return False
    return True
