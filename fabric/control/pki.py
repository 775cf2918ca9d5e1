"""The fabric's certificates: a CA, client certificates that carry an identity, server
certificates of the reflector, and one sentence on why a certificate is not acceptable.

Everything is made with the ``cryptography`` package (no crypto of our own); keys are ECDSA
P-256 (BoringSSL, gRPC's TLS, takes it on both sides; it is also what kubeadm and most CAs use).

Objects and the order they are made in:

1. :func:`make_ca`: a key and a self-signed CA certificate (``CA:TRUE, pathlen 0``: it signs
   leaf certificates only). On disk (:meth:`CA.save`): ``ca.key`` (0600) and ``ca.crt`` in one
   directory (``fabric-tool ca init``).
2. :func:`new_key` and :func:`make_csr`: a holder makes its own key and asks for a certificate
   with a CSR, so the private key never leaves it (the bootstrap of issue 20 item 2 sends CSRs).
3. :meth:`CA.sign_client` (a CSR or a public key, for an :class:`~fabric.control.identity.Identity`):
   the identity's URI as the one subject alternative name, extended key usage clientAuth only,
   24 h by default. :meth:`CA.sign_server`: DNS and IP names of the reflector plus
   :data:`SERVICE_NAME`, serverAuth only. The signer decides what goes into a certificate;
   a CSR contributes only its public key (its signature is checked, and a URI it asks for must
   be the identity being issued).
4. :func:`write_tls_dir`: a holder's directory as every fabric process reads it (``--tls-dir``):
   :data:`CERT_FILE`, :data:`KEY_FILE` (0600), :data:`CA_FILE`. Each file is written atomically
   (temporary file in the same directory, fsync, rename), the key first, the certificate last,
   so a reader that sees a new certificate also sees its key; readers check that the two match
   (:func:`key_matches`) and keep what they had when they do not.
5. :func:`explain` tells why a certificate is not acceptable for a use (``client`` or
   ``server``) at a time: unknown CA, not yet valid, expired, wrong usage, no or several identity
   URIs. Clients run it on their own certificate before connecting and when a handshake fails,
   because the TLS error a peer sees says little ("handshake failed").
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fabric.control import identity as ident

#: File names in a ``--tls-dir`` (the keys of a Kubernetes ``kubernetes.io/tls`` Secret plus
#: ``ca.crt``, so a mounted Secret is a TLS directory as it is).
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
#: File names in a CA directory (``fabric-tool ca init``).
CA_KEY_FILE = "ca.key"

#: A DNS name every reflector server certificate carries: clients that dial a unix socket (no
#: host name to check) or an address the certificate does not list name this one instead.
SERVICE_NAME = "reflector.kosmos-fabric"

DEFAULT_CLIENT_LIFETIME = datetime.timedelta(hours=24)
DEFAULT_SERVER_LIFETIME = datetime.timedelta(days=90)
DEFAULT_CA_LIFETIME = datetime.timedelta(days=3650)
#: Certificates start this much before "now", so a peer whose clock is a little behind accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)

Usage = Literal["client", "server"]
_EKU = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}

PrivateKey = ec.EllipticCurvePrivateKey


class PKIError(ValueError):
    """A file or request that cannot be used; the message names it and says why."""


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def aware(t: datetime.datetime) -> datetime.datetime:
    """cryptography 38 returns naive UTC datetimes; compare everything as aware UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=datetime.UTC)


def _stamp(t: datetime.datetime) -> str:
    return aware(t).astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Keys, CSRs, PEM
# --------------------------------------------------------------------------------------------


def new_key() -> PrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key(pem: bytes, source: str = "key") -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise PKIError(f"{source}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{source}: a {type(key).__name__}, expected an ECDSA key")
    return key


def load_cert(pem: bytes, source: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise PKIError(f"{source}: not a PEM certificate ({e})") from None


def make_csr(key: PrivateKey, who: ident.Identity) -> x509.CertificateSigningRequest:
    """A CSR for ``who``'s client certificate, signed by ``key`` (proof that the asker holds it)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(who))]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(who.uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    """The certificate is for this key (a renewed pair read half-way is not)."""
    return _public_der(key.public_key()) == _public_der(cert.public_key())


def _public_der(pub: object) -> bytes:
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined, no-any-return]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``path`` so a reader sees the old content or the new, never a part; keys 0600
    from the start (the temporary file is created so), certificates 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_tls_dir(directory: Path, key: PrivateKey, cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """A holder's ``--tls-dir``: the CA first, the key, then the certificate (see the module header)."""
    directory = Path(directory)
    write_atomic(directory / CA_FILE, cert_pem(ca_cert))
    write_atomic(directory / KEY_FILE, key_pem(key), private=True)
    write_atomic(directory / CERT_FILE, cert_pem(cert))


# --------------------------------------------------------------------------------------------
# The CA
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CA:
    """The fabric CA: its key and self-signed certificate."""

    key: PrivateKey
    cert: x509.Certificate

    @classmethod
    def load(cls, directory: Path) -> CA:
        directory = Path(directory)
        try:
            key = load_key((directory / CA_KEY_FILE).read_bytes(), str(directory / CA_KEY_FILE))
            cert = load_cert((directory / CA_FILE).read_bytes(), str(directory / CA_FILE))
        except OSError as e:
            raise PKIError(f"CA directory {directory}: {e.strerror}: {e.filename}") from None
        if not key_matches(key, cert):
            raise PKIError(f"CA directory {directory}: {CA_KEY_FILE} is not the key of {CA_FILE}")
        return cls(key, cert)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        write_atomic(directory / CA_KEY_FILE, key_pem(self.key), private=True)
        write_atomic(directory / CA_FILE, cert_pem(self.cert))

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def _leaf(
        self,
        subject: str,
        public_key: ec.EllipticCurvePublicKey,
        names: Sequence[x509.GeneralName],
        usage: Usage,
        lifetime: datetime.timedelta,
        now: datetime.datetime | None,
    ) -> x509.Certificate:
        if lifetime <= datetime.timedelta(0):
            raise PKIError(f"certificate lifetime {lifetime} must be positive")
        now = aware(now or utcnow())
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([_EKU[usage]]), critical=False)
            .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def sign_client(
        self,
        who: ident.Identity,
        request: x509.CertificateSigningRequest | ec.EllipticCurvePublicKey,
        *,
        lifetime: datetime.timedelta = DEFAULT_CLIENT_LIFETIME,
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """A client certificate for ``who``: its URI the one SAN, clientAuth only."""
        public_key = _requested_key(request, who)
        return self._leaf(str(who), public_key, [x509.UniformResourceIdentifier(who.uri)], "client", lifetime, now)

    def sign_server(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        dns_names: Iterable[str] = (),
        ips: Iterable[str] = (),
        lifetime: datetime.timedelta = DEFAULT_SERVER_LIFETIME,
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """A reflector server certificate for its DNS names and IPs (plus :data:`SERVICE_NAME`,
        the name clients check on a unix socket, and ``localhost``), serverAuth only."""
        dns = list(dict.fromkeys([SERVICE_NAME, "localhost", *dns_names]))
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        for ip in dict.fromkeys(ips):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise PKIError(f"server certificate: {ip!r} is not an IP address") from None
        return self._leaf(SERVICE_NAME, public_key, names, "server", lifetime, now)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only (ECDHE does the key exchange); a CA also signs certificates."""
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)  # fmt: skip


def _requested_key(
    request: x509.CertificateSigningRequest | ec.EllipticCurvePublicKey, who: ident.Identity
) -> ec.EllipticCurvePublicKey:
    if isinstance(request, ec.EllipticCurvePublicKey):
        return request
    if not request.is_signature_valid:
        raise PKIError(f"CSR for {who}: its signature does not verify (the asker does not hold the key)")
    try:
        sans = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if any(u != who.uri for u in uris):
        raise PKIError(f"CSR for {who}: asks for {', '.join(uris)}, not {who.uri}")
    key = request.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(f"CSR for {who}: a {type(key).__name__}, expected an ECDSA key")
    return key


def make_ca(
    name: str = "kosmos-fabric CA", *, lifetime: datetime.timedelta = DEFAULT_CA_LIFETIME,
    now: datetime.datetime | None = None,
) -> CA:  # fmt: skip
    """A new CA: key and self-signed certificate that may sign leaf certificates only."""
    key = new_key()
    now = aware(now or utcnow())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(key, cert)


# --------------------------------------------------------------------------------------------
# Why a certificate is not acceptable
# --------------------------------------------------------------------------------------------


def describe(cert: x509.Certificate) -> str:
    """``certificate CN=node/c1/n1 (serial 1a2b...)``: how messages name a certificate."""
    return f"certificate {cert.subject.rfc4514_string() or '(empty subject)'} (serial {cert.serial_number:x})"


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """The signature of ``cert`` verifies with ``issuer``'s key (cryptography 38 has no
    ``verify_directly_issued_by``; this is its signature step, done by the library's verify)."""
    if cert.issuer != issuer.subject:
        return False
    pub = issuer.public_key()
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            algo = cert.signature_hash_algorithm
            if algo is None:
                return False
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algo))
        elif isinstance(pub, rsa.RSAPublicKey):
            algo = cert.signature_hash_algorithm
            if algo is None:
                return False
            pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algo)
        elif isinstance(pub, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            pub.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def identity_uris(cert: x509.Certificate) -> list[str]:
    """The ``kosmos-fabric:`` URIs among the certificate's subject alternative names."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(ident.URI_PREFIX)]


def explain(cert_pem: bytes, ca_pem: bytes, usage: Usage, now: datetime.datetime | None = None) -> str | None:
    """Why the certificate in ``cert_pem`` is not acceptable for ``usage`` under the CA(s) in
    ``ca_pem`` at ``now``, in one sentence naming the certificate; None when it is."""
    try:
        cert = load_cert(cert_pem)
    except PKIError as e:
        return str(e)
    what = describe(cert)
    now = aware(now or utcnow())
    cas = _load_cas(ca_pem)
    if not cas:
        return f"{what}: the CA file holds no PEM certificate"
    issuer = next((ca for ca in cas if _signed_by(cert, ca)), None)
    if issuer is None:
        names = "; ".join(ca.subject.rfc4514_string() for ca in cas)
        return (f"{what}: issued by {cert.issuer.rfc4514_string()}, which is not the fabric CA ({names}) "
                "or its signature does not verify (unknown CA)")  # fmt: skip
    start, end = aware(cert.not_valid_before), aware(cert.not_valid_after)
    if now < start:
        return f"{what}: not yet valid: valid from {_stamp(start)} (now {_stamp(now)})"
    if now > end:
        return f"{what}: expired since {_stamp(end)} (now {_stamp(now)})"
    if now > aware(issuer.not_valid_after):
        return f"{what}: its CA {issuer.subject.rfc4514_string()} expired since {_stamp(issuer.not_valid_after)}"
    try:
        ekus = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = []
    if _EKU[usage] not in ekus:
        have = ", ".join(getattr(o, "_name", o.dotted_string) for o in ekus) or "none"
        return f"{what}: wrong usage: extended key usage {have}, a {usage} needs {_EKU[usage]._name}"
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            return f"{what}: wrong usage: a CA certificate, not a {usage} certificate"
    except x509.ExtensionNotFound:
        pass
    if usage == "client":
        uris = identity_uris(cert)
        if len(uris) != 1:
            return (f"{what}: carries {len(uris)} {ident.URI_PREFIX} identity URIs "
                    f"({', '.join(uris) or 'none'}), a fabric client certificate carries exactly one")  # fmt: skip
        try:
            ident.from_uri(uris[0])
        except ValueError as e:
            return f"{what}: {e}"
    return None


def _load_cas(ca_pem: bytes) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for chunk in ca_pem.split(marker)[1:]:
        try:
            out.append(x509.load_pem_x509_certificate(marker + chunk))
        except ValueError:
            continue
    return out


def certificate_identity(cert: x509.Certificate) -> ident.Identity:
    """The identity a client certificate carries (ValueError unless exactly one)."""
    uris = identity_uris(cert)
    if len(uris) != 1:
        raise PKIError(f"{describe(cert)}: {len(uris)} identity URIs, expected one")
    return ident.from_uri(uris[0])
