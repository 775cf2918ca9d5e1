"""The client side's cache of its TLS material (fabric.control.tls.client_material): a channel
reuses what the previous one read and checked while the files are unchanged, a replaced file is
read again, and a certificate that was acceptable is reported once it has expired. And the
server side's fetcher, which answers a new configuration only when a port needs one."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from fabric.control import identity, pki, tls

pytestmark = pytest.mark.unit

WHO = identity.node("c1", "n1")


def _issue(ca: pki.CA, directory: Path, lifetime: datetime.timedelta = pki.DEFAULT_CLIENT_LIFETIME) -> bytes:
    key = pki.new_key()
    cert = ca.sign_client(WHO, key.public_key(), lifetime=lifetime)
    pki.write_tls_dir(directory, key, cert, ca.cert)
    return pki.cert_pem(cert)


class _Reads:
    """Counts TLSDir.read calls (the files read and parsed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = tls.TLSDir.read

        def read(d: tls.TLSDir) -> tuple[bytes, bytes, bytes]:
            self.n += 1
            return real(d)

        monkeypatch.setattr(tls.TLSDir, "read", read)


def test_unchanged_files_are_read_once_and_a_replaced_certificate_is_picked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = pki.make_ca("test CA")
    d = tls.TLSDir(tmp_path / "agent")
    first = _issue(ca, d.path)
    reads = _Reads(monkeypatch)
    assert tls.check_own(d) is None
    tls.credentials(d)
    assert tls.check_own(d) is None
    assert reads.n == 1  # the second and third use what the first read and checked
    assert tls.client_material(d)[0][0] == first

    renewed = _issue(ca, d.path)  # a renewal: new key and certificate, new stamp
    assert renewed != first
    assert tls.client_material(d) == ((renewed, (d.key).read_bytes(), ca.pem), None)
    assert reads.n == 2

    other = pki.make_ca("another CA")
    pki.write_tls_dir(d.path, pki.load_key(d.key.read_bytes()), pki.load_cert(renewed), other.cert)
    problem = tls.check_own(d)
    assert problem is not None and "unknown CA" in problem and str(d.cert) in problem


def test_an_acceptable_certificate_is_reported_once_it_expires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = pki.make_ca("test CA")
    d = tls.TLSDir(tmp_path / "agent")
    _issue(ca, d.path, lifetime=datetime.timedelta(hours=1))
    assert tls.check_own(d) is None
    later = pki.utcnow() + datetime.timedelta(hours=2)
    monkeypatch.setattr(pki, "utcnow", lambda: later)
    problem = tls.check_own(d)
    assert problem is not None and "expired since" in problem
    assert "our client certificate is not acceptable" in tls.explain_failure(d, None, "Socket closed")


def test_a_problem_is_checked_again_each_time_and_an_unreadable_directory_is_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = pki.make_ca("test CA")
    d = tls.TLSDir(tmp_path / "agent")
    problem = tls.check_own(d)
    assert problem is not None and "cannot read" in problem
    with pytest.raises(tls.TLSError):
        tls.credentials(d)
    # Not yet valid (issued an hour ahead): a problem, which goes away with time alone.
    key = pki.new_key()
    ahead = pki.utcnow() + datetime.timedelta(hours=1)
    pki.write_tls_dir(d.path, key, ca.sign_client(WHO, key.public_key(), now=ahead), ca.cert)
    problem = tls.check_own(d)
    assert problem is not None and "not yet valid" in problem
    later = ahead + datetime.timedelta(minutes=1)
    monkeypatch.setattr(pki, "utcnow", lambda: later)
    assert tls.check_own(d) is None


def test_the_server_fetcher_answers_a_configuration_only_to_a_port_being_bound_or_after_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every configuration answered makes gRPC core swap the port's handshaker factory, which it
    does unsafely under concurrent handshakes (the reflector crashed with 1,000 agents
    connecting): an unchanged directory is answered None at a connection."""
    ca = pki.make_ca("test CA")
    d = tls.TLSDir(tmp_path / "server")
    key = pki.new_key()
    pki.write_tls_dir(d.path, key, ca.sign_server(key.public_key()), ca.cert)
    got: list[Callable[[], Any]] = []
    real = grpc.dynamic_ssl_server_credentials

    def capture(initial: Any, fetch: Callable[[], Any], **kw: Any) -> Any:
        got.append(fetch)
        return real(initial, fetch, **kw)

    monkeypatch.setattr(grpc, "dynamic_ssl_server_credentials", capture)
    creds = tls.server_credentials(d)
    (fetch,) = got
    assert fetch() is None  # a connection, nothing changed

    class Server:
        def add_secure_port(self, address: str, credentials: object) -> int:
            assert credentials is creds
            return 1 if fetch() is not None else 0

    assert tls.add_secure_port(Server(), "unix:/second", creds) == 1  # type: ignore[arg-type]
    assert fetch() is None
    key = pki.new_key()
    pki.write_tls_dir(d.path, key, ca.sign_server(key.public_key()), ca.cert)  # a renewal
    answers = [fetch() for _ in range(4)]
    assert [a is not None for a in answers] == [True, True, False, False]  # once per port (two)
