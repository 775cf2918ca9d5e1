"""The hand-encoded protobuf that kubeemu serves (``/openapi/v2``) decodes with the real library.

Lengths are varints: a one-byte length breaks past 127 bytes (and cannot be built past 255).
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2

from kubeemu import openapi, protobuf


@pytest.mark.parametrize("size", [0, 1, 127, 128, 200, 300, 16383, 16384, 70000])
def test_pb_string_decodes_at_every_length(size: int) -> None:
    # FileDescriptorProto: field 1 is `string name`, field 2 is `string package`.
    name = ("n" * size).encode()
    encoded = protobuf.length_delimited(1, name) + protobuf.length_delimited(2, b"after")
    msg = descriptor_pb2.FileDescriptorProto.FromString(encoded)
    assert msg.name == name.decode()
    assert msg.package == "after"  # the length was right: the next field starts where it should


def test_pb_varint() -> None:
    # Field 16's key (16 << 3 | 2 = 130) and 300 need two bytes; the protobuf docs' own examples.
    assert protobuf.encode_varint(16 << 3 | 2) == b"\x82\x01"
    assert protobuf.encode_varint(300) == b"\xac\x02"
    assert protobuf.encode_varint(0) == b"\x00"


def test_openapi_v2_document_structure() -> None:
    # Document{swagger: 1, info: 2 {title: 1, version: 2}, paths: 8, definitions: 9 {NamedSchema}}
    from kubeemu import protobuf
    from kubeemu.resources import Registry
    from kubeemu.store import Store

    doc = openapi.OpenAPI(Registry(), Store(Registry(), ("10.96.0.0/24",))).v2_protobuf()
    top = {num: v for num, _, v in protobuf.fields(doc)}
    assert top[1] == b"2.0"
    assert {n: v for n, _, v in protobuf.fields(top[2])} == {1: b"Kubernetes", 2: b"v1.32.0"}
    named = [{n: v for n, _, v in protobuf.fields(x)} for _, _, x in protobuf.fields(top[9])]
    pod = next(n[2] for n in named if n[1] == b"io.k8s.api.core.v1.Pod")
    schema = {n: v for n, _, v in protobuf.fields(pod)}
    assert schema[4].startswith(b"Pod is a collection of containers")  # description
    ext = {n: v for n, _, v in protobuf.fields(schema[31])}  # the GVK vendor extension, YAML in Any
    assert ext[1] == b"x-kubernetes-group-version-kind"
    assert {n: v for n, _, v in protobuf.fields(ext[2])}[2] == b'[{"group":"","kind":"Pod","version":"v1"}]'
