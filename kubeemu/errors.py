"""``metav1.Status`` failures shaped like kube-apiserver's, raised as ``ApiError``.

Clients branch on ``code`` and ``reason`` (client-go's ``IsNotFound``, ``IsConflict`` ...) and
print ``message``, so the texts follow upstream's templates (``k8s.io/apimachinery/pkg/api/
errors``) word for word where a client or a human is likely to match on them.
"""

from __future__ import annotations

import logging
from typing import Any

_log = logging.getLogger(__name__)


class ApiError(Exception):
    """An API failure carrying the HTTP code and the Status body to send."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _qualified(plural: str, group: str) -> str:
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, group: str, name: str) -> ApiError:
    res = _qualified(plural, group)
    details: dict[str, Any] = {"name": name, "kind": plural}
    if group:
        details["group"] = group
    return ApiError(404, "NotFound", f'{res} "{name}" not found', details)


def no_route() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def already_exists(plural: str, group: str, name: str) -> ApiError:
    details: dict[str, Any] = {"name": name, "kind": plural}
    if group:
        details["group"] = group
    return ApiError(409, "AlreadyExists", f'{_qualified(plural, group)} "{name}" already exists', details)


def uid_precondition_failed(want: str, have: str) -> str:
    """The text of a failed uid precondition (``storage.Preconditions.Check``; upstream wraps it
    in the StorageError's own text, which names the etcd key and is left out here)."""
    return f"Precondition failed: UID in precondition: {want}, UID in object meta: {have}"


def conflict(plural: str, group: str, name: str, why: str | None = None) -> ApiError:
    details: dict[str, Any] = {"name": name, "kind": plural}
    if group:
        details["group"] = group
    why = why or "the object has been modified; please apply your changes to the latest version and try again"
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {_qualified(plural, group)} "{name}": {why}',
                    details)


def invalid(kind: str, group: str, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """422 Invalid; ``causes`` are (reason, field, message) like FieldValueInvalid."""
    msgs = "; ".join(f"{f}: {m}" for _, f, m in causes)
    if len(causes) > 1:
        msgs = "[" + ", ".join(f"{f}: {m}" for _, f, m in causes) + "]"
    details: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "causes": [{"reason": r, "message": m, "field": f} for r, f, m in causes],
    }
    if group:
        details["group"] = group
    return ApiError(422, "Invalid", f'{kind}{"." + group if group else ""} "{name}" is invalid: {msgs}', details)


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def gone_rv(requested: int, oldest: int) -> ApiError:
    return expired(f"too old resource version: {requested} ({oldest})")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def forbidden_terminating(plural: str, group: str, name: str, namespace: str) -> ApiError:
    details: dict[str, Any] = {"name": name, "kind": plural}
    if group:
        details["group"] = group
    return ApiError(
        403, "Forbidden",
        f'{_qualified(plural, group)} "{name}" is forbidden: unable to create new content in namespace '
        f"{namespace} because it is being terminated",
        details,
    )


def method_not_allowed(method: str) -> ApiError:
    return ApiError(405, "MethodNotAllowed",
                    f"the server does not allow this method on the requested resource ({method})", {})


def unsupported_media(ctype: str, allowed: list[str]) -> ApiError:
    return ApiError(415, "UnsupportedMediaType",
                    f'the body of the request was in an unknown format - accepted media types include: '
                    f'{", ".join(allowed)}' if ctype else "missing content type", {})


def internal(message: str) -> ApiError:
    return ApiError(500, "InternalError", f"Internal error occurred: {message}",
                    {"causes": [{"message": message}]})
