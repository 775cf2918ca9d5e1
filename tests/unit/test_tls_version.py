"""The reflector's TLS handshake is TLS 1.3 only (issue 20): a TLS 1.2 client is refused at the
handshake, with a certificate the CA signed; TLS 1.3 with the same certificate is served.

The reflector runs in a fresh interpreter, as ``fabric-reflector`` does: gRPC reads the cipher
list :mod:`fabric.control` sets when ``grpc`` is imported, and this test process may have
imported ``grpc`` first.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.control import identity, pki
from tests.unit.test_tls import PKI

REFLECTOR = """
import asyncio, sys
from pathlib import Path
from fabric.control import reflector, tls
from fabric.types import FabricConfig

async def main() -> None:
    refl = reflector.Reflector(FabricConfig(clusters=()), startup_hold=0)
    (target,) = await refl.start(["127.0.0.1:0"], tls.server_credentials(tls.TLSDir(Path(sys.argv[1]))))
    print(target, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await refl.stop(0)

asyncio.run(main())
"""


@pytest.fixture
def reflector_port(tmp_path: Path) -> Iterator[tuple[int, PKI]]:
    authority = PKI(tmp_path, pki.make_ca())
    server = authority.server()
    # Without the variable this process has (fabric.control set it here too): the reflector's own
    # import must set it.
    env = {k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"}
    proc = subprocess.Popen([sys.executable, "-c", REFLECTOR, str(server.path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        target = proc.stdout.readline().strip()
        assert target, "the reflector did not start"
        yield int(target.rsplit(":", 1)[1]), authority
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _handshake(port: int, authority: PKI, version: ssl.TLSVersion) -> str:
    """The negotiated version of a handshake at ``version`` with a valid client certificate."""
    d = authority.client("reader", identity.role("reader", "tls-version"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(d.ca))
    ctx.load_cert_chain(str(d.cert), str(d.key))
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), 10) as raw, \
            ctx.wrap_socket(raw, server_hostname=pki.SERVICE_NAME) as conn:
        return str(conn.version())


def test_a_tls_1_2_handshake_is_refused_and_1_3_is_served(reflector_port: tuple[int, PKI]) -> None:
    port, authority = reflector_port
    assert _handshake(port, authority, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(port, authority, ssl.TLSVersion.TLSv1_2)
