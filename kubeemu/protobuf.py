"""Kubernetes protobuf: request bodies decoded to the JSON objects the store keeps, answers encoded.

kubectl's typed clients (the generator commands: ``create namespace|configmap|secret|deployment|
service``, ``expose``, ``scale`` ...) send ``Content-Type: application/vnd.kubernetes.protobuf``
with ``Accept: application/vnd.kubernetes.protobuf,application/json``: the body is decoded here,
and since protobuf is listed first the server answers in it, as upstream does (objects, lists,
Status errors, and watch streams: 4-byte big-endian length + a raw ``WatchEvent`` whose object is
enveloped). The encoder writes what Go's generated ``Marshal`` writes (fields by number, non-pointer
scalars and structs always, pointers/slices/maps when set, map keys sorted), so a decoded kubectl
body encodes back to kubectl's exact bytes. This is upstream's wire format
(k8s.io/apimachinery/pkg/runtime/serializer/protobuf), in order:

1. the 4-byte magic ``k8s\\x00``;
2. a ``runtime.Unknown`` message: ``typeMeta`` (1: apiVersion, 2: kind), ``raw`` (the typed
   message), ``contentEncoding``, ``contentType``;
3. ``raw`` is the typed message (``k8s.io.api.core.v1.Namespace`` ...), decoded field by field
   from the table ``kubeemu/data/k8s_proto.json`` that :mod:`kubeemu.protogen` generates from
   upstream's ``generated.proto`` files and Go struct tags. No per-kind code: the table gives each
   field's number, JSON name, type and Go flags (omitempty, pointer, inline, repeated).

A few apimachinery types have a JSON form that is not their message form; they are converted as
their Go ``MarshalJSON`` does: ``meta/v1.Time`` (RFC 3339 seconds, zero -> omitted),
``MicroTime``, ``Duration`` (Go duration string), ``FieldsV1`` and ``runtime.RawExtension``
(embedded JSON), ``intstr.IntOrString`` and ``resource.Quantity``; ``bytes`` become base64 and
the ``+protobuf.nullable`` slice wrappers (``ExtraValue``) become arrays.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import logging
import struct
from importlib import resources
from typing import Any

_log = logging.getLogger(__name__)

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"
_META = "k8s.io.apimachinery.pkg.apis.meta.v1."
_REPEATED, _OMITEMPTY, _POINTER, _INLINE = 1, 2, 4, 8


class ProtobufError(ValueError):
    """The body is not a Kubernetes protobuf message this emulator can read; says why."""


@functools.cache
def table() -> dict[str, Any]:
    """The generated message table (loaded once, on the first protobuf request)."""
    with resources.files("kubeemu").joinpath("data/k8s_proto.json").open("rb") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def message_rows(name: str) -> list[Any]:
    """The field rows of message ``name`` in the table; an error naming it when it is not there."""
    rows: list[Any] | None = table()["messages"].get(name)
    if rows is None:
        raise ProtobufError(f"no protobuf message {name} in kubeemu's table (kubeemu/data/k8s_proto.json)")
    return rows


# ---------------------------------------------------------------- wire level


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ProtobufError("varint longer than 10 bytes")


def fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, raw value) in wire order; raw is int for varint/fixed, bytes for
    length-delimited."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        v: Any
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            if pos + 8 > len(buf):
                raise ProtobufError("truncated fixed64")
            v, pos = buf[pos : pos + 8], pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ProtobufError(f"field {num}: length {n} runs past the end of the message")
            v, pos = buf[pos : pos + n], pos + n
        elif wt == 5:
            if pos + 4 > len(buf):
                raise ProtobufError("truncated fixed32")
            v, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ProtobufError(f"field {num}: unsupported wire type {wt}")
        out.append((num, wt, v))
    return out


def _signed(v: int, bits: int) -> int:
    v &= (1 << 64) - 1
    if v >= 1 << 63:
        v -= 1 << 64
    if bits == 32:
        v = ((v + (1 << 31)) % (1 << 32)) - (1 << 31)
    return v


def _scalar(ptype: str, wt: int, raw: Any) -> Any:
    if ptype == "string":
        if not isinstance(raw, bytes):
            raise ProtobufError(f"a string field has wire type {wt}")
        return raw.decode("utf-8")
    if ptype == "bytes":
        return base64.b64encode(raw).decode() if isinstance(raw, bytes) else raw
    if ptype == "bool":
        return bool(raw)
    if ptype in ("int64", "sint64"):
        return _signed(raw, 64)
    if ptype in ("int32", "sint32"):
        return _signed(raw, 32)
    if ptype in ("uint32", "uint64"):
        return int(raw)
    if ptype in ("double", "fixed64"):
        return struct.unpack("<d", raw)[0] if ptype == "double" else struct.unpack("<Q", raw)[0]
    if ptype in ("float", "fixed32"):
        return struct.unpack("<f", raw)[0] if ptype == "float" else struct.unpack("<I", raw)[0]
    raise ProtobufError(f"unknown scalar type {ptype}")


def _packed(ptype: str, raw: bytes) -> list[Any]:
    """A packed repeated scalar (wire type 2 for a numeric field)."""
    if ptype in ("double", "fixed64"):
        return [_scalar(ptype, 1, raw[i : i + 8]) for i in range(0, len(raw), 8)]
    if ptype in ("float", "fixed32"):
        return [_scalar(ptype, 5, raw[i : i + 4]) for i in range(0, len(raw), 4)]
    out, pos = [], 0
    while pos < len(raw):
        v, pos = _varint(raw, pos)
        out.append(_scalar(ptype, 0, v))
    return out


# ---------------------------------------------------------------- special apimachinery types


def _go_duration(ns: int) -> str:
    """Go's time.Duration.String (what metav1.Duration marshals to): ``1h2m3.5s``, ``300ms``, ``0s``."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim(ns / size) + unit
    h, rem = divmod(ns, 3_600_000_000_000)
    m, rem = divmod(rem, 60_000_000_000)
    s = _trim(rem / 1_000_000_000) + "s"
    if h:
        return f"{sign}{h}h{m}m{s}"
    if m:
        return f"{sign}{m}m{s}"
    return sign + s


def _trim(x: float) -> str:
    return (f"{x:.9f}".rstrip("0").rstrip(".")) or "0"


def _timestamp(buf: bytes, micro: bool) -> str | None:
    vals = {num: v for num, _, v in fields(buf)}
    secs, nanos = _signed(vals.get(1, 0), 64), _signed(vals.get(2, 0), 32)
    if not buf:
        return None  # the zero time marshals to nothing; JSON null, which the store fills in
    t = datetime.datetime.fromtimestamp(secs, datetime.UTC)
    if micro:
        return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos // 1000:06d}Z"
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _special(name: str, buf: bytes) -> tuple[bool, Any]:
    """(handled, JSON value) for the types whose JSON form is not their message form."""
    if name == _META + "Time":
        return True, _timestamp(buf, micro=False)
    if name == _META + "MicroTime":
        return True, _timestamp(buf, micro=True)
    if name == _META + "Duration":
        vals = {num: v for num, _, v in fields(buf)}
        return True, _go_duration(_signed(vals.get(1, 0), 64))
    if name in (_META + "FieldsV1", "k8s.io.apimachinery.pkg.runtime.RawExtension"):
        raw = next((v for num, _, v in fields(buf) if num == 1), b"")
        if not raw:
            return True, None
        try:
            return True, json.loads(raw)
        except ValueError:
            raise ProtobufError(f"{name.rsplit('.', 1)[1]} holds {len(raw)} bytes that are not JSON") from None
    if name == "k8s.io.apimachinery.pkg.util.intstr.IntOrString":
        vals = {num: v for num, _, v in fields(buf)}
        if vals.get(1, 0) == 1:
            return True, bytes(vals.get(3, b"")).decode()
        return True, _signed(vals.get(2, 0), 32)
    if name == "k8s.io.apimachinery.pkg.api.resource.Quantity":
        vals = {num: v for num, _, v in fields(buf)}
        return True, bytes(vals.get(1, b"")).decode()
    return False, None


# ---------------------------------------------------------------- messages


def _zero(v: Any) -> bool:
    return v is None or v == "" or v == 0 or v is False or v == [] or v == {}


def decode_message(name: str, buf: bytes) -> Any:
    """One typed message as the JSON value its Go type marshals to."""
    handled, value = _special(name, buf)
    if handled:
        return value
    tab = table()
    rows = message_rows(name)
    if name in tab["nullable"]:
        return [v.decode() for num, _, v in fields(buf) if num == 1]
    by_num = {r[0]: r for r in rows}
    seen: dict[int, Any] = {}
    for num, wt, raw in fields(buf):
        row = by_num.get(num)
        if row is None:
            _log.debug("protobuf %s: ignoring unknown field %d", name, num)
            continue
        _, jname, ptype, flags = row
        if ptype.startswith("map<"):
            ktype, vtype = ptype[4:-1].split(",", 1)
            entry = {n: (w, v) for n, w, v in fields(raw)}
            k = _value(ktype, *entry.get(1, (2, b"")))
            v = _value(vtype, *entry.get(2, (2, b"")))
            seen.setdefault(num, {})[k] = v
        elif flags & _REPEATED:
            items = seen.setdefault(num, [])
            if wt == 2 and ptype not in ("string", "bytes") and ptype in _NUMERIC:
                items.extend(_packed(ptype, raw))
            else:
                items.append(_value(ptype, wt, raw))
        else:
            seen[num] = _value(ptype, wt, raw)
    out: dict[str, Any] = {}
    for num, jname, ptype, flags in rows:
        if num not in seen:
            continue
        v = seen[num]
        if flags & _INLINE and isinstance(v, dict):
            out.update(v)
            continue
        # Go's encoding/json: omitempty drops zero scalars, empty slices and maps, never a struct
        # (``resources: {}`` stays); a pointer that was sent is kept even when it points at zero.
        is_struct = not (
            flags & _REPEATED
            or ptype.startswith("map<")
            or ptype in _NUMERIC
            or ptype in ("string", "bytes")
            or ptype in table()["nullable"]
        )
        if v is None or (flags & _OMITEMPTY and not flags & _POINTER and not is_struct and _zero(v)):
            continue
        out[jname] = v
    return out


_NUMERIC = frozenset(
    {"bool", "int32", "int64", "uint32", "uint64", "sint32", "sint64", "double", "float", "fixed32", "fixed64"}
)


def _value(ptype: str, wt: int, raw: Any) -> Any:
    if ptype in _NUMERIC or ptype in ("string", "bytes"):
        return _scalar(ptype, wt, raw)
    if not isinstance(raw, bytes):
        raise ProtobufError(f"a {ptype} field has wire type {wt}, not a message")
    return decode_message(ptype, raw)


def decode(body: bytes) -> dict[str, Any]:
    """A request body (magic + runtime.Unknown) as the JSON object kubectl would have sent."""
    if not body.startswith(MAGIC):
        raise ProtobufError(f"the body does not start with the Kubernetes protobuf magic {MAGIC!r}")
    unknown = {num: v for num, _, v in fields(body[len(MAGIC) :])}
    tm = {num: v.decode() for num, _, v in fields(unknown.get(1, b""))}
    api_version, kind = tm.get(1, ""), tm.get(2, "")
    if unknown.get(3):
        raise ProtobufError(f"contentEncoding {unknown[3].decode()!r} is not supported")
    message = message_for(api_version, kind)
    if message is None:
        raise ProtobufError(f"no protobuf message is known for apiVersion {api_version!r} kind {kind!r}")
    obj = decode_message(message, unknown.get(2, b""))
    if not isinstance(obj, dict):
        raise ProtobufError(f"{kind} decoded to {type(obj).__name__}, not an object")
    head: dict[str, Any] = {}
    if api_version:
        head["apiVersion"] = api_version
    if kind:
        head["kind"] = kind
    return {**head, **obj}


# ---------------------------------------------------------------- encoding (answers to protobuf-only clients)


def _key(num: int, wt: int) -> bytes:
    return encode_varint(num << 3 | wt)


def encode_varint(n: int) -> bytes:
    """Protobuf base-128 varint: seven bits a byte, low first, the top bit set on all but the last."""
    n &= (1 << 64) - 1  # negative int32/int64: ten bytes of two's complement, as Go writes them
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def length_delimited(num: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2); key and length are varints (one byte only to 127)."""
    return _key(num, 2) + encode_varint(len(payload)) + payload


_GO_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def parse_go_duration(text: str) -> int:
    """Nanoseconds of a Go duration string (``1h2m3.5s``, ``300ms``, ``-1.5h``)."""
    import re

    body = text.lstrip("+-")
    if body in ("0", ""):
        return 0
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ProtobufError(f"invalid duration {text!r}")
    total = sum(round(float(n) * _GO_UNITS[u]) for n, u in parts)
    return -total if text.startswith("-") else total


def _enc_timestamp(value: Any, micro: bool) -> bytes:
    if not value:
        return b""  # the zero time marshals to nothing
    m = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    secs = int(m.timestamp())
    nanos = m.microsecond * 1000 if micro else 0
    return _key(1, 0) + encode_varint(secs) + _key(2, 0) + encode_varint(nanos)


def _enc_special(name: str, value: Any) -> bytes | None:
    """The message bytes of the types whose JSON form is not their message form (None: not one)."""
    if name == _META + "Time":
        return _enc_timestamp(value, micro=False)
    if name == _META + "MicroTime":
        return _enc_timestamp(value, micro=True)
    if name == _META + "Duration":
        return _key(1, 0) + encode_varint(parse_go_duration(str(value)) if value else 0)
    if name in (_META + "FieldsV1", "k8s.io.apimachinery.pkg.runtime.RawExtension"):
        if value is None:
            return b""
        return length_delimited(1, json.dumps(value, separators=(",", ":")).encode())
    if name == "k8s.io.apimachinery.pkg.util.intstr.IntOrString":
        if isinstance(value, str):
            return _key(1, 0) + encode_varint(1) + _key(2, 0) + encode_varint(0) + length_delimited(3, value.encode())
        return _key(1, 0) + encode_varint(0) + _key(2, 0) + encode_varint(int(value or 0)) + length_delimited(3, b"")
    if name == "k8s.io.apimachinery.pkg.api.resource.Quantity":
        return length_delimited(1, str(value if value is not None else "0").encode())
    return None


def _enc_scalar(num: int, ptype: str, value: Any) -> bytes:
    if ptype == "string":
        return length_delimited(num, str(value if value is not None else "").encode())
    if ptype == "bytes":
        return length_delimited(num, base64.b64decode(value) if value else b"")
    if ptype == "bool":
        return _key(num, 0) + encode_varint(1 if value else 0)
    if ptype in ("int32", "int64", "uint32", "uint64"):
        return _key(num, 0) + encode_varint(int(value or 0))
    if ptype == "double":
        return _key(num, 1) + struct.pack("<d", float(value or 0))
    if ptype == "float":
        return _key(num, 5) + struct.pack("<f", float(value or 0))
    raise ProtobufError(f"cannot encode a {ptype} field")


def _enc_value(num: int, ptype: str, value: Any) -> bytes:
    if ptype in _NUMERIC or ptype in ("string", "bytes"):
        return _enc_scalar(num, ptype, value)
    return length_delimited(num, encode_message(ptype, value))


def encode_message(name: str, value: Any) -> bytes:
    """One JSON value as its typed message, as Go's generated ``Marshal`` writes it: fields in
    number order; non-pointer scalars and structs always (zero when absent), pointers, slices and
    maps only when set; map entries by sorted key."""
    special = _enc_special(name, value)
    if special is not None:
        return special
    tab = table()
    rows = message_rows(name)
    if name in tab["nullable"]:
        return b"".join(length_delimited(1, str(v).encode()) for v in value or [])
    obj = value if isinstance(value, dict) else {}
    out = bytearray()
    for num, jname, ptype, flags in sorted(rows, key=lambda r: r[0]):
        if flags & _INLINE:
            out += length_delimited(num, encode_message(ptype, obj))
            continue
        v = obj.get(jname)
        if ptype.startswith("map<"):
            ktype, vtype = ptype[4:-1].split(",", 1)
            entries: dict[str, Any] = v or {}
            for k in sorted(entries):
                out += length_delimited(num, _enc_value(1, ktype, k) + _enc_value(2, vtype, entries[k]))
        elif flags & _REPEATED:
            for item in v or []:
                out += _enc_value(num, ptype, item)
        elif v is None and (flags & _POINTER or ptype in tab["nullable"]):
            continue
        else:
            out += _enc_value(num, ptype, v)
    return bytes(out)


def message_for(api_version: str, kind: str) -> str | None:
    """The protobuf message of an ``apiVersion``/``kind`` (None: the kind has no protobuf form)."""
    kinds: dict[str, str] = table()["kinds"]
    return kinds.get(f"{api_version}/{kind}") or kinds.get(f"meta/{kind}")


def encode(obj: dict[str, Any], api_version: str | None = None, kind: str | None = None) -> bytes:
    """An object as a protobuf body: magic + ``runtime.Unknown`` (typeMeta, raw, and the two
    always-written empty strings contentEncoding and contentType)."""
    api_version = api_version or obj.get("apiVersion", "")
    kind = kind or obj.get("kind", "")
    message = message_for(api_version, kind)
    if message is None:
        raise ProtobufError(f"no protobuf message is known for apiVersion {api_version!r} kind {kind!r}")
    type_meta = length_delimited(1, api_version.encode()) + length_delimited(2, kind.encode())
    raw = encode_message(message, obj)
    ld = length_delimited
    return MAGIC + ld(1, type_meta) + ld(2, raw) + ld(3, b"") + ld(4, b"")


def encode_watch_event(event_type: str, obj: dict[str, Any]) -> bytes:
    """One frame of a protobuf watch stream: a 4-byte big-endian length, then a ``WatchEvent``
    (raw: no magic, no envelope) whose ``object`` holds the enveloped object."""
    event = length_delimited(1, event_type.encode()) + length_delimited(2, length_delimited(1, encode(obj)))
    return struct.pack(">I", len(event)) + event


__all__ = [
    "CONTENT_TYPE",
    "MAGIC",
    "ProtobufError",
    "decode",
    "decode_message",
    "encode",
    "encode_message",
    "encode_watch_event",
    "fields",
    "message_for",
    "parse_go_duration",
    "table",
]
