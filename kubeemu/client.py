"""A small asyncio REST client for the lab's Kubernetes components (controller-manager,
kube-proxy, kubelet): JSON over aiohttp, the wire protocol only, so it works against kubeemu and
would work against a real API server.

Why not the official clients: the ``kubernetes`` package is synchronous (a thread per watch)
and ``kubernetes_asyncio`` is not a dependency. What the lab's components need is small: CRUD on
paths, merge/strategic/JSON patches, and a watch stream. Errors come back as
:class:`ApiStatusError` carrying the server's ``Status`` (code, reason, message), so callers can
tell a 409 Conflict (retry from a fresh read) from a 404 (already gone) without parsing text.

Paths are built with :func:`resource_path` from ``apiVersion`` + plural, as upstream's REST
mapper does: ``v1`` lives under ``/api/v1``, everything else under ``/apis/GROUP/VERSION``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

_log = logging.getLogger(__name__)

JSON = "application/json"
#: The PATCH media types (the server's dispatch on them: :func:`kubeemu.patch.patched`).
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

Obj = dict[str, Any]


class ApiStatusError(Exception):
    """A non-2xx answer. ``status`` is the server's ``Status`` object (or a synthetic one)."""

    def __init__(self, method: str, path: str, code: int, status: Mapping[str, Any]) -> None:
        self.method, self.path, self.code = method, path, code
        self.status = dict(status)
        self.reason = str(status.get("reason") or "")
        self.message = str(status.get("message") or "")
        super().__init__(f"{method} {path}: {code} {self.reason}: {self.message}")

    @property
    def not_found(self) -> bool:
        return self.code == 404

    @property
    def conflict(self) -> bool:
        """409: AlreadyExists on create, Conflict on a stale resourceVersion."""
        return self.code == 409

    @property
    def gone(self) -> bool:
        """410: the watch's resourceVersion is too old; re-list."""
        return self.code == 410


def resource_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    """The REST path of a collection or an object: ``resource_path("apps/v1", "deployments", "ns", "web")``."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name is not None:
        parts.append(name)
        if subresource:
            parts.append(subresource)
    return "/".join(parts)


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` for namespaced objects, ``name`` for cluster-scoped ones (client-go's
    MetaNamespaceKeyFunc)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else str(meta["name"])


def split_key(key: str) -> tuple[str | None, str]:
    """The inverse of :func:`object_key`."""
    ns, sep, name = key.partition("/")
    return (ns, name) if sep else (None, ns)


class Client:
    """An API server connection: ``async with Client(url) as c: await c.get(path)``."""

    def __init__(self, url: str, user_agent: str = "kubeemu-client") -> None:
        self.url = url.rstrip("/")
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(headers={"User-Agent": self.user_agent})
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Client used outside 'async with' (no HTTP session)")
        return self._session

    async def request(self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None,
                      content_type: str = JSON) -> Obj:
        """One request; the decoded JSON answer, or :class:`ApiStatusError`."""
        data = None if body is None else json.dumps(body)
        headers = {"Accept": JSON}
        if data is not None:
            headers["Content-Type"] = content_type
        async with self.session.request(method, self.url + path, data=data, params=params, headers=headers) as r:
            text = await r.text()
            try:
                payload = json.loads(text) if text else {}
            except ValueError:
                payload = {"message": text[:200]}
            if r.status >= 300:
                if not isinstance(payload, dict) or payload.get("kind") != "Status":
                    payload = {"kind": "Status", "code": r.status, "reason": r.reason or "",
                               "message": str(payload)[:200]}
                raise ApiStatusError(method, path, r.status, payload)
            return payload if isinstance(payload, dict) else {"value": payload}

    async def get(self, path: str, **params: str) -> Obj:
        return await self.request("GET", path, params=params or None)

    async def create(self, path: str, body: Obj) -> Obj:
        """POST to a collection path."""
        return await self.request("POST", path, body)

    async def replace(self, path: str, body: Obj) -> Obj:
        """PUT: optimistic concurrency through ``metadata.resourceVersion`` (409 when stale)."""
        return await self.request("PUT", path, body)

    async def patch(self, path: str, body: Any, content_type: str = MERGE_PATCH) -> Obj:
        return await self.request("PATCH", path, body, content_type=content_type)

    async def delete(self, path: str, body: Obj | None = None) -> Obj:
        """DELETE with optional ``DeleteOptions`` (propagationPolicy, preconditions)."""
        return await self.request("DELETE", path, body)

    async def watch(self, path: str, resource_version: str, timeout_seconds: int = 300,
                    params: Mapping[str, str] | None = None) -> AsyncIterator[tuple[str, Obj]]:
        """``(type, object)`` events after ``resource_version`` (BOOKMARKs included). An ERROR
        event is raised as :class:`ApiStatusError` (410 means: re-list). Ends when the server
        closes the stream (timeout); the caller resumes from the last resourceVersion."""
        query = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout_seconds), **(params or {})}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)
        async with self.session.get(self.url + path, params=query, timeout=timeout,
                                    headers={"Accept": JSON}) as r:
            if r.status >= 300:
                text = await r.text()
                try:
                    status = json.loads(text)
                except ValueError:
                    status = {"message": text[:200]}
                raise ApiStatusError("WATCH", path, r.status, status if isinstance(status, dict) else {})
            async for line in r.content:
                if not line.strip():
                    continue
                ev = json.loads(line)
                if ev.get("type") == "ERROR":
                    obj = ev.get("object") or {}
                    raise ApiStatusError("WATCH", path, int(obj.get("code") or 500), obj)
                yield str(ev["type"]), ev["object"]
