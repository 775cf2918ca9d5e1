"""Mutual TLS on the ``Fabric`` gRPC service: the reflector's server credentials, every client's
channel, the ``--tls-dir``/``--insecure`` flags, and what a client says when a handshake fails.

A TLS directory (``--tls-dir DIR``) holds :data:`~fabric.control.pki.CERT_FILE` (this process's
certificate), :data:`~fabric.control.pki.KEY_FILE` and :data:`~fabric.control.pki.CA_FILE` (the
fabric CA: the reflector accepts only clients it signed, clients accept only a reflector it
signed): the layout of a mounted Kubernetes TLS Secret and of ``fabric-tool cert issue``.

Server (:func:`server_credentials`): gRPC's dynamic SSL credentials, requiring a client
certificate. gRPC core calls our fetcher at every new connection (``add_handshakers``); it
re-reads the directory when a file changed and a consistent pair (key matching certificate) is
there, so a renewed server certificate is served without a restart while established sessions
keep theirs. A half-written renewal (new key, old certificate) is skipped until it is complete.
Ports are added with :func:`add_secure_port`, and the fetcher answers a configuration only to a
port being bound and after a change (gRPC core swaps a port's handshaker factory at every answer,
unsafely under concurrent handshakes: see the fetcher).

Clients: :func:`channel` is the one way every client (agent session, records, status, tools)
makes a channel, aio or blocking, plaintext only when given no TLS directory. Before it
connects it checks its own certificate (:func:`check_own`) and logs which file is not acceptable
and why. The files read and the check's verdict are cached per directory (:class:`_Material`)
while the files' stamp (inode, mtime, size) stays the same and the certificate (and its CA) has
not expired: reading, parsing and verifying the signature cost about 4 ms of CPU, which every
channel paid twice (the control benchmark opens a thousand); a renewed file, a new stamp, is
read at the next channel as before. When an RPC fails, :func:`explain_failure` adds the same check to the error, because
under TLS 1.3 the server verifies the client certificate after the client finished its side, so
a refused client sees only "Socket closed".

What gRPC lets us do, found out for grpc 1.85 (the venv's):

* **TLS version.** Python's ``ssl_server_credentials``/``ssl_channel_credentials`` call
  ``grpc_ssl_*_credentials_create_ex``, whose config carries ``min_tls_version = TLS1_2`` and
  ``max_tls_version = TLS1_3`` fixed (``ssl_security_connector.h``, ``grpc_ssl_config``); the
  setter ``grpc_tls_credentials_options_set_min_tls_version`` belongs to the experimental TLS
  credentials that grpcio does not expose, and there is no channel argument for it. What is
  left is ``GRPC_SSL_CIPHER_SUITES``, read when ``grpc`` is imported, which lists the TLS 1.2
  suites only: :mod:`fabric.control` sets it to one pre-shared-key suite that gRPC never
  configures, so a TLS 1.2 handshake finds no cipher and fails at the handshake, and TLS 1.3
  is untouched (tests/unit/test_tls_version.py). Should ``grpc`` be loaded before
  :mod:`fabric.control`, or the operator set another list, the session's version is still in the
  auth context (``ssl_tls_version``): :func:`fabric.control.identity.of_context` refuses an
  identity from a session below TLS 1.3 at its first RPC.
* **Key type.** ECDSA P-256. Ed25519 certificates fail the handshake in gRPC's BoringSSL
  (``NO_COMMON_SIGNATURE_ALGORITHMS``: gRPC does not enable Ed25519 signatures).
* **Refused handshakes at the server.** gRPC core logs each one itself, on stderr, one line at
  INFO severity from ``ssl_transport_security.cc``: ``Handshake failed with error SSL_ERROR_SSL:
  ... PEER_DID_NOT_RETURN_A_CERTIFICATE`` (no client certificate), ``CERTIFICATE_VERIFY_FAILED:
  certificate has expired`` / ``unable to get local issuer certificate`` (another CA) /
  ``unsupported certificate purpose`` (a serverAuth-only certificate). The line has no peer
  address, and gRPC offers Python no hook for a failed handshake (server interceptors and
  handlers run only after one succeeded), so the reflector cannot count or attribute them. The
  line disappears with ``GRPC_VERBOSITY=ERROR``; keep the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import grpc

from fabric.control import pki

_log = logging.getLogger(__name__)

INSECURE_WARNING = (
    "--insecure: the control channel is plaintext and unauthenticated; anything that reaches the "
    "reflector can announce any node and read the whole topology"
)


class TLSError(ValueError):
    """TLS material that cannot be used; the message names the file and says why."""


@dataclasses.dataclass(frozen=True)
class TLSDir:
    """A ``--tls-dir``: certificate, key and the fabric CA of one process."""

    path: Path

    @property
    def cert(self) -> Path:
        return self.path / pki.CERT_FILE

    @property
    def key(self) -> Path:
        return self.path / pki.KEY_FILE

    @property
    def ca(self) -> Path:
        return self.path / pki.CA_FILE

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate, key, CA) PEM; TLSError names a file that cannot be read, or a key that
        is not the certificate's."""
        out = []
        for f in (self.cert, self.key, self.ca):
            try:
                out.append(f.read_bytes())
            except OSError as e:
                raise TLSError(f"TLS directory {self.path}: cannot read {f.name}: {e.strerror}") from None
        cert, key, ca = out
        try:
            if not pki.key_matches(pki.load_key(key, str(self.key)), pki.load_cert(cert, str(self.cert))):
                raise TLSError(f"{self.key} is not the key of {self.cert}")
        except pki.PKIError as e:
            raise TLSError(str(e)) from None
        return cert, key, ca

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for f in (self.cert, self.key, self.ca):
            try:
                st = os.stat(f)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def add_flags(p: argparse.ArgumentParser, role: str) -> None:
    """``--tls-dir`` and ``--insecure`` (``role``: what the certificate in the directory is)."""
    p.add_argument("--tls-dir", metavar="DIR",
                   help=f"mutual TLS: DIR holds {pki.CERT_FILE} ({role}), {pki.KEY_FILE} and {pki.CA_FILE} "
                   "(the fabric CA); made by 'fabric-tool cert issue' or a mounted TLS Secret")  # fmt: skip
    p.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC without certificates (tests, the control benchmark); "
                   "logs a warning")  # fmt: skip


def choose(tls_dir: str | None, insecure: bool) -> TLSDir | None:
    """The transport the flags choose: a TLSDir, or None for ``--insecure``. Secure is the
    default: neither flag is an error that says what to pass."""
    if tls_dir and insecure:
        raise TLSError("--tls-dir and --insecure exclude each other")
    if insecure:
        return None
    if not tls_dir:
        raise TLSError(
            f"no TLS material: pass --tls-dir DIR (with {pki.CERT_FILE}, {pki.KEY_FILE} and {pki.CA_FILE}, e.g. "
            "from 'fabric-tool cert issue'), or --insecure for a plaintext channel"
        )
    d = TLSDir(Path(tls_dir))
    d.read()  # refuse to start on missing or mismatched files
    return d


def from_args(args: argparse.Namespace) -> TLSDir | None:
    """:func:`choose` for a parser made with :func:`add_flags`; logs the ``--insecure`` warning."""
    d = choose(args.tls_dir, args.insecure)
    announce(d)
    return d


def announce(d: TLSDir | None) -> None:
    """Log the transport at start: a warning for plaintext."""
    if d is None:
        _log.warning(INSECURE_WARNING)
    else:
        _log.info("mutual TLS with %s", d.path)


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


#: Set (per thread) while :func:`add_secure_port` binds a port: the fetcher then answers with
#: the current configuration, which the port's handshaker factory is built from.
_binding = threading.local()


def add_secure_port(server: grpc.Server | grpc.aio.Server, address: str, credentials: grpc.ServerCredentials) -> int:
    """``server.add_secure_port`` for credentials of :func:`server_credentials`: every secure
    port of a fabric server is added through here (see the fetcher in :func:`server_credentials`
    for why)."""
    _binding.on = True
    try:
        port: int = server.add_secure_port(address, credentials)
        return port
    finally:
        _binding.on = False


def server_credentials(d: TLSDir, served: Callable[[bytes], None] | None = None) -> grpc.ServerCredentials:
    """Credentials for :func:`add_secure_port`: client certificates of the CA in ``d`` required,
    ``d`` re-read when it changes (see the module header). ``served`` is called with the
    certificate (PEM) being served: now, and at each renewal read (on a gRPC core thread: it
    must be quick and not raise; the reflector's certificate expiry metric)."""
    cert, key, ca = d.read()
    problem = pki.explain(cert, ca, "server")
    if problem is not None:
        raise TLSError(f"{d.cert}: {problem}")
    if served is not None:
        served(cert)
    lock = threading.Lock()
    seen = [d._stamp()]
    initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
    current = [initial]
    #: Ports bound with these credentials (the first gets ``initial`` from gRPC without a fetch),
    #: and how many more answers a renewal still owes (one per port).
    ports = [1]
    owed = [0]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Runs on a gRPC core thread at every new connection, and in add_secure_port for every
        # port but the first: never raise, stay cheap. A configuration answered (not None)
        # makes gRPC core build a new handshaker factory for that port and free the old one,
        # outside the lock under which the connection then takes the factory
        # (ssl_security_connector.cc, add_handshakers, grpc 1.85): answering one at every
        # connection crashed the reflector (SIGSEGV in cygrpc, "No match found for server
        # name") as 1,000 agents connected at once. So it answers one only when it must: to a
        # port being bound (gRPC hands the initial configuration to the first port only; a
        # later port answered None fails to bind), and after the files changed, once per port
        # (gRPC does not say which port a fetch is for: the next calls, whichever they are).
        try:
            stamp = d._stamp()
            with lock:
                if getattr(_binding, "on", False):
                    ports[0] += 1
                    return current[0]
                if stamp == seen[0]:
                    if owed[0] > 0:
                        owed[0] -= 1
                        return current[0]
                    return None
                try:
                    c, k, a = d.read()
                except TLSError as e:
                    _log.debug("server TLS files changing, keeping the current ones: %s", e)
                    return None
                seen[0] = stamp
                current[0] = grpc.ssl_server_certificate_configuration([(k, c)], root_certificates=a)
                owed[0] = ports[0] - 1
            if served is not None:
                served(c)
            why = pki.explain(c, a, "server")
            if why is not None:
                _log.error("%s: %s; serving it anyway (it replaced the previous one)", d.cert, why)
            else:
                _log.info("serving the renewed server certificate %s", d.cert)
            return current[0]
        except Exception:  # a bug here must not take the server's handshakes down
            _log.exception("reloading %s", d.path)
            return None

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------

#: The channel argument naming the host the server certificate must carry.
_NAME_OVERRIDE = "grpc.ssl_target_name_override"

_reported: dict[Path, str | None] = {}
_reported_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class _Material:
    """One successful :meth:`TLSDir.read` of a client directory and its check, valid while the
    files' stamp is ``stamp``. ``good_until``: the check found the certificate acceptable, and
    that verdict holds until this time (the earliest end of validity of the certificate and the
    CA file's certificates); None when it found a problem (then it is checked again each time,
    since a certificate not yet valid becomes valid without a file changing). ``good_from``: the
    certificate's start of validity, with ``good_until`` (a caller may ask about an earlier
    time, :func:`fabric.control.bootstrap.problem`)."""

    stamp: tuple[tuple[int, int, int], ...]
    pem: tuple[bytes, bytes, bytes]
    good_until: datetime.datetime | None
    good_from: datetime.datetime | None

    def good_at(self, now: datetime.datetime) -> bool:
        """The check found the certificate acceptable, and that holds at ``now``."""
        return self.good_from is not None and self.good_until is not None and self.good_from <= now < self.good_until


_material: dict[Path, _Material] = {}
_material_lock = threading.Lock()


def client_material(d: TLSDir, now: datetime.datetime | None = None) -> tuple[tuple[bytes, bytes, bytes], str | None]:
    """(certificate, key, CA) PEM of ``d`` and why the certificate is not acceptable as a client
    certificate at ``now`` (default: now; None: it is): from the cache while the stamp is
    unchanged and an acceptable certificate is valid at ``now``, else read and checked again.
    TLSError as :meth:`TLSDir.read` (never cached: a file that cannot be read is tried again the
    next time)."""
    stamp = d._stamp()  # before reading: a file replaced meanwhile gives another stamp next time
    now = pki.utcnow() if now is None else pki.aware(now)
    with _material_lock:
        got = _material.get(d.path)
    if got is not None and got.stamp == stamp and got.good_at(now):
        return got.pem, None
    pem = d.read()
    cert, _key, ca = pem
    why = pki.explain(cert, ca, "client", now)
    good_until = good_from = None
    if why is None:
        parsed = pki.load_cert(cert)
        ends = [parsed.not_valid_after, *(c.not_valid_after for c in pki._load_cas(ca))]
        good_until = min(pki.aware(t) for t in ends)
        good_from = pki.aware(parsed.not_valid_before)
    with _material_lock:
        _material[d.path] = _Material(stamp, pem, good_until, good_from)
    return pem, None if why is None else f"{d.cert}: {why}"


def check_own(d: TLSDir) -> str | None:
    """Why this process's client certificate is not acceptable (one sentence naming the file),
    or None. Logged when the answer changes, so a reconnect loop does not repeat it."""
    try:
        _pem, problem = client_material(d)
    except TLSError as e:
        problem = str(e)
    with _reported_lock:
        changed = _reported.get(d.path, "") != problem
        _reported[d.path] = problem
    if changed and problem is not None:
        _log.error("client certificate not acceptable, the reflector will refuse it: %s", problem)
    return problem


def credentials(d: TLSDir) -> grpc.ChannelCredentials:
    """Channel credentials from ``d``, read now, or as cached by :func:`check_own` while the
    files are unchanged (a renewed certificate is used from the next channel on)."""
    (cert, key, ca), _problem = client_material(d)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


@overload
def channel(target: str, tls: TLSDir | None, *, options: Sequence[tuple[str, Any]] | None = ...,
            sync: Literal[False] = ...) -> grpc.aio.Channel: ...  # fmt: skip


@overload
def channel(target: str, tls: TLSDir | None, *, options: Sequence[tuple[str, Any]] | None = ...,
            sync: Literal[True]) -> grpc.Channel: ...  # fmt: skip


def channel(
    target: str, tls: TLSDir | None, *, options: Sequence[tuple[str, Any]] | None = None, sync: bool = False
) -> grpc.aio.Channel | grpc.Channel:
    """A channel to the reflector at ``target``: mutual TLS with ``tls``, plaintext with None;
    an asyncio channel, or a blocking one with ``sync``. With TLS, checks this process's
    certificate first (:func:`check_own`: logs what is wrong, connects anyway, since the file
    may be replaced before the handshake and the server decides). A unix socket target has no
    host name to check: the server certificate must name :data:`~fabric.control.pki.SERVICE_NAME`
    (every one :meth:`~fabric.control.pki.CA.sign_server` makes does)."""
    opts = list(options or ())
    if tls is None:
        return grpc.insecure_channel(target, options=opts) if sync else grpc.aio.insecure_channel(target, options=opts)
    check_own(tls)
    try:
        creds = credentials(tls)
    except TLSError as e:
        # Missing files now: a channel that fails like an unreachable reflector, with the reason
        # logged by check_own; the caller's retry loop picks the files up once they are there.
        _log.debug("%s", e)
        creds = grpc.ssl_channel_credentials()
    if target.startswith("unix:") and not any(k == _NAME_OVERRIDE for k, _ in opts):
        opts.append((_NAME_OVERRIDE, pki.SERVICE_NAME))
    if sync:
        return grpc.secure_channel(target, creds, options=opts)
    return grpc.aio.secure_channel(target, creds, options=opts)


def explain_failure(tls: TLSDir | None, code: grpc.StatusCode | None, details: str) -> str:
    """What to add to an RPC failure's message: with TLS and an UNAVAILABLE failure (how a
    refused handshake ends), why our own certificate is not acceptable, or that it is and the
    reflector may trust another CA; without TLS, that a TLS reflector refuses plaintext so;
    "" otherwise."""
    if code not in (grpc.StatusCode.UNAVAILABLE, None):
        return ""
    if tls is None:
        if "Socket closed" in details:
            return " (if the reflector requires mutual TLS, this is how it refuses a plaintext client: pass --tls-dir)"
        return ""
    problem = check_own(tls)
    if problem is not None:
        return f" (our client certificate is not acceptable: {problem})"
    if any(s in details for s in ("CERTIFICATE_VERIFY_FAILED", "is not in peer certificate", "Hostname Verification")):
        return (f" (this side refused the reflector's server certificate: it is not signed by the CA in {tls.ca}, "
                "has expired, or does not name the address dialled)")  # fmt: skip
    if "Socket closed" in details or "andshake" in details or "SSL" in details or "certificate" in details:
        return (f" (if the TLS handshake was refused: our client certificate {tls.cert} is valid under "
                f"{tls.ca}; the reflector may trust another CA or have a server certificate this CA did not "
                "sign; its log names the reason)")  # fmt: skip
    return ""
