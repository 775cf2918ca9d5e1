"""kubeemu.protobuf: Kubernetes protobuf request bodies decode to the JSON kubectl would send.

The first case is a body captured from kubectl 1.32 (``kubectl create namespace foo``); the
others are built with a small encoder here, one field kind at a time, so that each conversion
(Time, IntOrString, Quantity, bytes, maps, inline members, negative ints) is pinned.
"""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

import pytest

from kubeemu import protobuf, protogen

pytestmark = pytest.mark.unit


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return bytes(out + bytes([low]))
        out.append(low | 0x80)


def ld(num: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def vi(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    return protobuf.MAGIC + ld(1, ld(1, api_version) + ld(2, kind)) + ld(2, raw)


def test_kubectl_create_namespace_body() -> None:
    body = (
        b'k8s\x00\n\x0f\n\x02v1\x12\tNamespace\x12\x1b\n\x13\n\x03foo\x12\x00\x1a\x00"\x00*\x002\x008\x00'
        b'B\x00\x12\x00\x1a\x02\n\x00\x1a\x00"\x00'
    )
    # as kubectl's JSON would say: empty omitempty strings gone, structs kept, zero time null
    assert protobuf.decode(body) == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "foo"},
        "spec": {},
        "status": {},
    }


def test_service_ports_intorstring_and_negative_int() -> None:
    port_named = ld(1, "http") + ld(2, "TCP") + vi(3, 80) + ld(4, vi(1, 1) + ld(3, "web"))
    port_num = vi(3, 443) + ld(4, vi(1, 0) + vi(2, 8443))
    spec = ld(1, port_named) + ld(1, port_num) + ld(2, ld(1, "app") + ld(2, "x")) + ld(4, "ClusterIP")
    spec += vi(12, -5)  # healthCheckNodePort: int32 written as a 10-byte varint
    got = protobuf.decode(envelope("v1", "Service", ld(1, ld(1, "s")) + ld(2, spec)))
    assert got["spec"] == {
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": "web"},
            {"port": 443, "targetPort": 8443},
        ],
        "selector": {"app": "x"},
        "type": "ClusterIP",
        "healthCheckNodePort": -5,
    }


def test_secret_bytes_are_base64_and_time_is_rfc3339() -> None:
    meta = ld(1, "s") + ld(8, vi(1, 1_700_000_000)) + ld(11, ld(1, "k") + ld(2, "v"))
    raw = ld(1, meta) + ld(2, ld(1, "a") + ld(2, b"\x00\xffb")) + ld(3, "Opaque") + vi(5, 1)
    got = protobuf.decode(envelope("v1", "Secret", raw))
    assert got["data"] == {"a": base64.b64encode(b"\x00\xffb").decode()}
    assert got["metadata"] == {"name": "s", "creationTimestamp": "2023-11-14T22:13:20Z", "labels": {"k": "v"}}
    assert got["immutable"] is True and got["type"] == "Opaque"


def test_inline_member_is_flattened_and_quantities_are_strings() -> None:
    # Volume{name, volumeSource(inline){emptyDir{medium, sizeLimit: Quantity}}}
    empty_dir = ld(1, "Memory") + ld(2, ld(1, "64Mi"))
    volume = ld(1, "scratch") + ld(2, ld(2, empty_dir))
    container = ld(1, "c") + ld(2, "busybox") + ld(8, ld(2, ld(1, "cpu") + ld(2, ld(1, "250m"))))
    pod_spec = ld(1, volume) + ld(2, container)
    got = protobuf.decode(envelope("v1", "Pod", ld(1, ld(1, "p")) + ld(2, pod_spec)))
    assert got["spec"]["volumes"] == [{"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}]
    assert got["spec"]["containers"] == [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "250m"}}}]


def test_scale_and_delete_options() -> None:
    # autoscaling/v1 Scale (what kubectl scale writes to /scale)
    got = protobuf.decode(envelope("autoscaling/v1", "Scale", ld(1, ld(1, "d")) + ld(2, vi(1, 3))))
    assert got == {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "d"}, "spec": {"replicas": 3}}
    # DeleteOptions travel under the client's group version; gracePeriodSeconds is a pointer: 0 kept
    got = protobuf.decode(envelope("v1", "DeleteOptions", vi(1, 0) + ld(4, "Background")))
    assert got == {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "gracePeriodSeconds": 0,
        "propagationPolicy": "Background",
    }


def test_double_field() -> None:
    # no built-in kind here has a double; the wire level still must read one (JSONSchemaProps do)
    assert protobuf._scalar("double", 1, struct.pack("<d", 1.5)) == 1.5


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{}", "magic"),
        (envelope("v1", "Nope", b""), "kind 'Nope'"),
        (protobuf.MAGIC + ld(1, ld(1, "v1") + ld(2, "Pod")) + b"\x12\x05ab", "runs past the end"),
    ],
)
def test_bad_bodies_say_why(body: bytes, words: str) -> None:
    with pytest.raises(protobuf.ProtobufError, match=words):
        protobuf.decode(body)


def test_go_duration_strings() -> None:
    assert protobuf._go_duration(0) == "0s"
    assert protobuf._go_duration(3_600_000_000_000) == "1h0m0s"
    assert protobuf._go_duration(90_500_000_000) == "1m30.5s"
    assert protobuf._go_duration(300_000_000) == "300ms"


def _source(env: str, default: str) -> Path | None:
    path = Path(os.environ.get(env, default))
    return path if (path / "HEAD").exists() or (path / ".git").exists() else None


def test_committed_table_matches_generator() -> None:
    """The committed table is what ``python -m kubeemu.protogen`` makes from upstream's sources.

    Needs git checkouts of kubernetes/api and kubernetes/apimachinery (env KUBEEMU_K8S_API_SRC and
    KUBEEMU_K8S_APIMACHINERY_SRC); skipped where they are not at hand.
    """
    api = _source("KUBEEMU_K8S_API_SRC", "/work/.mirror/kubernetes+api/repo")
    machinery = _source("KUBEEMU_K8S_APIMACHINERY_SRC", "/work/.mirror/kubernetes+apimachinery/repo")
    if api is None or machinery is None:
        pytest.skip("upstream kubernetes/api and apimachinery checkouts not available")
    committed = (Path(protobuf.__file__).parent / "data" / "k8s_proto.json").read_text()
    assert protogen.dumps(protogen.build(api, machinery, protobuf.table()["ref"])) == committed


def test_encode_is_byte_identical_to_kubectl() -> None:
    """Encoding the decoded kubectl body gives kubectl's bytes back: same field order, the same
    zero values written (non-pointer strings, structs, the zero Time), the same omissions."""
    body = (
        b'k8s\x00\n\x0f\n\x02v1\x12\tNamespace\x12\x1b\n\x13\n\x03foo\x12\x00\x1a\x00"\x00*\x002\x008\x00'
        b'B\x00\x12\x00\x1a\x02\n\x00\x1a\x00"\x00'
    )
    assert protobuf.encode(protobuf.decode(body)) == body


def test_encode_special_types_round_trip() -> None:
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s", "creationTimestamp": "2023-11-14T22:13:20Z", "labels": {"b": "2", "a": "1"}},
        "spec": {
            "ports": [{"port": 80, "targetPort": "web"}, {"port": 443, "targetPort": 8443}],
            "healthCheckNodePort": -5,
        },
    }
    got = protobuf.decode(protobuf.encode(svc))
    assert got["metadata"] == svc["metadata"]
    assert got["spec"]["ports"] == [{"port": 80, "targetPort": "web"}, {"port": 443, "targetPort": 8443}]
    assert got["spec"]["healthCheckNodePort"] == -5
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "data": {"k": "AP9i"}}
    assert protobuf.decode(protobuf.encode(secret))["data"] == {"k": "AP9i"}
    assert protobuf.parse_go_duration("1h0m0s") == 3_600_000_000_000
    assert protobuf.parse_go_duration("1m30.5s") == 90_500_000_000
    with pytest.raises(protobuf.ProtobufError, match="invalid duration"):
        protobuf.parse_go_duration("soon")


def test_watch_frame() -> None:
    frame = protobuf.encode_watch_event("ADDED", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    event = {num: v for num, _, v in protobuf.fields(frame[4:])}
    inner = {num: v for num, _, v in protobuf.fields(event[2])}
    assert event[1] == b"ADDED" and protobuf.decode(inner[1])["metadata"] == {"name": "c"}
