"""The hand-encoded protobuf that kubeemu serves (``/openapi/v2``) decodes with the real library.

Lengths are varints: a one-byte length breaks past 127 bytes (and cannot be built past 255).
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2

from kubeemu import server


@pytest.mark.parametrize("size", [0, 1, 127, 128, 200, 300, 16383, 16384, 70000])
def test_pb_string_decodes_at_every_length(size: int) -> None:
    # FileDescriptorProto: field 1 is `string name`, field 2 is `string package`.
    name = ("n" * size).encode()
    encoded = server._pb_string(1, name) + server._pb_string(2, b"after")
    msg = descriptor_pb2.FileDescriptorProto.FromString(encoded)
    assert msg.name == name.decode()
    assert msg.package == "after"  # the length was right: the next field starts where it should


def test_pb_varint() -> None:
    # Field 16's key (16 << 3 | 2 = 130) and 300 need two bytes; the protobuf docs' own examples.
    assert server._pb_varint(16 << 3 | 2) == b"\x82\x01"
    assert server._pb_varint(300) == b"\xac\x02"
    assert server._pb_varint(0) == b"\x00"


def test_openapi_document_is_unchanged() -> None:
    # The short strings encode exactly as before: one-byte key, one-byte length.
    assert server._OPENAPI_V2_PB == (
        b"\x0a\x032.0" + b"\x12\x15" + b"\x0a\x0aKubernetes" + b"\x12\x07v1.32.0"
    )
