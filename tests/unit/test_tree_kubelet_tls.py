"""The kubelet server over TLS (tree/kubelet.py): HTTPS with the given certificate, client
certificates required and verified against the client CA when one is given (as virtual-kubelet's
``--client-verify-ca``), and the WebSocket dialer (tree/websocket.py) over TLS with a client
certificate, passing a refusal's status and body on."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from scheduler.kube import Api
from tree import websocket as ws
from tree.kubelet import KubeletServer

pytestmark = pytest.mark.unit

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _issue(path: Path, name: str, ca: tuple[object, object] | None, *, server: bool = False,
           is_ca: bool = False) -> tuple[object, object]:
    """A certificate and key (EC P-256) written as ``name.crt``/``name.key`` under ``path``;
    self-signed when ``ca`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = ca if ca is not None else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)  # type: ignore[attr-defined]
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not is_ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = b.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    (path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca = _issue(tmp_path, "ca", None, is_ca=True)
    _issue(tmp_path, "kubelet", ca, server=True)
    _issue(tmp_path, "apiserver", ca)
    return tmp_path


@pytest.fixture
def server(pki: Path) -> Iterator[KubeletServer]:
    s = KubeletServer(lambda _ns, _name: None, "127.0.0.1", 0, cert_file=str(pki / "kubelet.crt"),
                      key_file=str(pki / "kubelet.key"), client_ca=str(pki / "ca.crt"), timeout=5.0)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_https_with_a_verified_client_certificate(server: KubeletServer, pki: Path) -> None:
    assert server.url.startswith("https://127.0.0.1:")
    client = Api(server.url, ca_file=str(pki / "ca.crt"), cert_file=str(pki / "apiserver.crt"),
                 key_file=str(pki / "apiserver.key"))
    assert client._pool.request("GET", server.url + "/healthz").data == b"ok"
    r = client._pool.request("GET", server.url + "/containerLogs/ns1/web/c")
    assert r.status == 404 and b"pod ns1/web has no copy in a leaf cluster" in r.data
    anonymous = Api(server.url, ca_file=str(pki / "ca.crt"))
    with pytest.raises(urllib3.exceptions.HTTPError):
        anonymous._pool.request("GET", server.url + "/healthz")


def test_the_websocket_dialer_speaks_tls_and_passes_a_refusal_on(server: KubeletServer, pki: Path) -> None:
    client = Api(server.url, ca_file=str(pki / "ca.crt"), cert_file=str(pki / "apiserver.crt"),
                 key_file=str(pki / "apiserver.key"))
    got = ws.dial(client, "/exec/ns1/web/c?command=true&stdout=1", list(ws.CHANNEL_PROTOCOLS), 5.0)
    assert isinstance(got, ws.Refused)
    assert got.status == 404 and b"pod ns1/web has no copy in a leaf cluster" in got.body


def test_a_client_ca_needs_tls() -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        KubeletServer(lambda _ns, _name: None, "127.0.0.1", 0, client_ca="/nonexistent")
