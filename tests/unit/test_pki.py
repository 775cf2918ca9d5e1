"""fabric.control.pki: what the certificates carry, why one is not acceptable (one sentence
naming it), the files on disk; and ``fabric-tool ca init`` / ``cert issue|issue-server|check``."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fabric.control import identity, pki
from tools import cli

NODE = identity.node("east", "e1")
NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> pki.CA:
    return pki.make_ca(now=NOW - datetime.timedelta(days=1))


def test_client_certificate_carries_the_identity_as_its_one_uri_and_client_auth_only(ca: pki.CA) -> None:
    key = pki.new_key()
    cert = ca.sign_client(NODE, pki.make_csr(key, NODE), now=NOW)
    assert pki.certificate_identity(cert) == NODE
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node/east/e1"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after.replace(tzinfo=datetime.UTC) == NOW + pki.DEFAULT_CLIENT_LIFETIME
    assert pki.key_matches(key, cert)
    assert pki.explain(pki.cert_pem(cert), ca.pem, "client", NOW) is None
    assert pki.explain(pki.cert_pem(cert), ca.pem, "server", NOW) is not None


def test_server_certificate_names_the_service_localhost_and_the_given_addresses(ca: pki.CA) -> None:
    cert = ca.sign_server(pki.new_key().public_key(), dns_names=["r.example"], ips=["10.0.0.5", "::1"], now=NOW)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [pki.SERVICE_NAME, "localhost", "r.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    assert pki.explain(pki.cert_pem(cert), ca.pem, "server", NOW) is None
    with pytest.raises(pki.PKIError, match="'nope' is not an IP address"):
        ca.sign_server(pki.new_key().public_key(), ips=["nope"])


def _with_uris(ca: pki.CA, uris: list[str]) -> bytes:
    """A certificate of ``ca`` with these URI SANs (built by hand: the CA never makes such)."""
    key = pki.new_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                            critical=False)  # fmt: skip
    return pki.cert_pem(b.sign(ca.key, hashes.SHA256()))


def test_explain_names_the_certificate_and_the_reason(ca: pki.CA) -> None:
    key = pki.new_key()
    good = pki.cert_pem(ca.sign_client(NODE, key.public_key(), now=NOW))
    other = pki.make_ca("another CA", now=NOW - datetime.timedelta(days=1))
    foreign = pki.cert_pem(other.sign_client(NODE, key.public_key(), now=NOW))
    cases = {
        "unknown CA": pki.explain(foreign, ca.pem, "client", NOW),
        "expired": pki.explain(good, ca.pem, "client", NOW + datetime.timedelta(days=2)),
        "not yet": pki.explain(good, ca.pem, "client", NOW - datetime.timedelta(hours=1)),
        "server only": pki.explain(pki.cert_pem(ca.sign_server(key.public_key(), now=NOW)), ca.pem, "client", NOW),
        "CA itself": pki.explain(ca.pem, ca.pem, "client", NOW),
        "no uri": pki.explain(_with_uris(ca, []), ca.pem, "client", NOW),
        "two uris": pki.explain(_with_uris(ca, [NODE.uri, "kosmos-fabric:tree/x"]), ca.pem, "client", NOW),
        "bad uri": pki.explain(_with_uris(ca, ["kosmos-fabric:node/East/e1"]), ca.pem, "client", NOW),
        "garbage": pki.explain(b"not a certificate", ca.pem, "client", NOW),
    }
    assert "issued by CN=another CA, which is not the fabric CA (CN=kosmos-fabric CA)" in str(cases["unknown CA"])
    assert "(unknown CA)" in str(cases["unknown CA"])
    assert "expired since 2026-12-07T12:00:00Z (now 2026-12-08T12:00:00Z)" in str(cases["expired"])
    assert "not yet valid: valid from 2026-12-06T11:55:00Z" in str(cases["not yet"])
    assert "wrong usage: extended key usage serverAuth, a client needs clientAuth" in str(cases["server only"])
    assert "wrong usage" in str(cases["CA itself"])
    assert "carries 0 kosmos-fabric: identity URIs (none)" in str(cases["no uri"])
    assert "carries 2 kosmos-fabric: identity URIs" in str(cases["two uris"])
    assert "'East' is not a name" in str(cases["bad uri"])
    assert "not a PEM certificate" in str(cases["garbage"])
    for text in cases.values():
        assert text is not None and "\n" not in text
    for name in ("unknown CA", "expired", "not yet", "server only", "no uri", "two uris"):
        assert str(cases[name]).startswith("certificate CN="), name


def test_a_csr_contributes_its_key_only_and_must_ask_for_the_identity_issued(ca: pki.CA) -> None:
    key = pki.new_key()
    with pytest.raises(pki.PKIError, match="asks for kosmos-fabric:node/west/w1, not kosmos-fabric:node/east/e1"):
        ca.sign_client(NODE, pki.make_csr(key, identity.node("west", "w1")))
    forged = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())
    )
    cert = ca.sign_client(NODE, forged)  # no URI asked: the signer's identity goes in
    assert pki.certificate_identity(cert) == NODE and pki.key_matches(key, cert)


def test_files_are_written_atomically_keys_0600(tmp_path: Path, ca: pki.CA) -> None:
    key = pki.new_key()
    pki.write_tls_dir(tmp_path / "d", key, ca.sign_client(NODE, key.public_key()), ca.cert)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "d").iterdir()}
    assert modes == {pki.CERT_FILE: 0o644, pki.KEY_FILE: 0o600, pki.CA_FILE: 0o644}  # no temporary file left
    ca.save(tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca" / pki.CA_KEY_FILE).stat().st_mode) == 0o600
    loaded = pki.CA.load(tmp_path / "ca")
    assert loaded.cert == ca.cert
    with pytest.raises(pki.PKIError, match=r"CA directory .*missing: No such file"):
        pki.CA.load(tmp_path / "missing")


def test_fabric_tool_ca_init_cert_issue_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "e1"
    assert cli.main(["ca", "init", "--dir", str(ca_dir)]) == 0
    assert cli.main(["ca", "init", "--dir", str(ca_dir)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert cli.main(["cert", "issue", "node/east/e1", "--ca-dir", str(ca_dir), "--out-dir", str(out),
                     "--days", "2"]) == 0  # fmt: skip
    cert = x509.load_pem_x509_certificate((out / pki.CERT_FILE).read_bytes())
    assert pki.certificate_identity(cert) == NODE
    assert cert.not_valid_after - cert.not_valid_before == datetime.timedelta(days=2) + pki.CLOCK_SKEW
    assert cli.main(["cert", "check", "--tls-dir", str(out)]) == 0
    assert "acceptable as a client certificate" in capsys.readouterr().out
    assert cli.main(["cert", "check", "--tls-dir", str(out), "--usage", "server"]) == 1
    assert "wrong usage" in capsys.readouterr().out
    assert cli.main(["cert", "issue-server", "--ca-dir", str(ca_dir), "--out-dir", str(tmp_path / "r"),
                     "--ip", "10.0.0.5"]) == 0  # fmt: skip
    assert cli.main(["cert", "check", "--tls-dir", str(tmp_path / "r"), "--usage", "server"]) == 0
    assert cli.main(["cert", "issue", "node/East/e1", "--ca-dir", str(ca_dir), "--out-dir", str(out)]) == 2
    assert "'East' is not a name" in capsys.readouterr().err
    assert cli.main(["cert", "issue", "tree/a", "--ca-dir", str(tmp_path / "nope"), "--out-dir", str(out)]) == 1
    assert "CA directory" in capsys.readouterr().err
