"""Node certificates: the reflector signs them (``IssueCertificate``), an agent gets its first one
with its cluster's bootstrap credential and renews it with its own before it expires.

Why the reflector signs: it already holds the one fact a signature depends on, the current
fabric configuration (which clusters are members), and every agent already reaches it; a
second signer would need both. It signs with the fabric CA it is given (``fabric-reflector
--ca-dir``: ``ca.crt`` and ``ca.key``); without one it issues nothing.

Objects and the order they are used in:

1. Server side, :class:`Signer`: one ``IssueCertificate`` request (a CSR and a node name) and
   the caller's proven identity -> a client certificate of ``node/<cluster>/<node>``, after
   :func:`fabric.control.authz.issue_refusal` (``bootstrap/<c>`` gets any node of cluster
   ``<c>``, ``node/<c>/<n>`` only itself, ``<c>`` a member of the configuration). The CSR gives
   only its public key (:meth:`fabric.control.pki.CA.sign_client`); the signer decides the rest.
   A cluster removed by ``unjoin`` gets nothing more: with SyncNode refusing its agents at their
   next connect, that is the revocation (certificates are short-lived; no revocation list).
2. Agent side, :class:`CertificateKeeper` over the agent's ``--tls-dir`` D:

   * :meth:`~CertificateKeeper.ensure` before the first session: when D holds no acceptable
     certificate of this node (:func:`problem`) and a bootstrap directory is given
     (``--bootstrap-dir``: a TLS directory with the ``bootstrap/<cluster>`` certificate), it
     makes a new key (it never leaves the node) and a CSR, calls ``IssueCertificate`` with the
     bootstrap identity (:func:`obtain`) and writes D atomically (:func:`fabric.control.pki.write_tls_dir`).
   * :meth:`~CertificateKeeper.run` then renews at about 2/3 of the certificate's lifetime
     (:func:`renewal_time`, jittered so agents started together do not renew together) with
     its own node identity. The running session keeps its TLS session: the new files are used
     by the next connection. A failed renewal is logged and retried with back-off
     (:class:`fabric.backoff.Backoff`); the session goes on until the certificate really
     expires, and once it has, the next attempt uses the bootstrap directory if there is one.
   * Metrics (the agent's, :class:`fabric.health.AgentMetrics`):
     ``fabric_agent_certificate_expiry_timestamp_seconds``, the notAfter of the certificate in
     D (the one the next connection uses), set whenever the keeper reads or writes it, and
     ``fabric_agent_certificate_renewals_total{result="ok|error"}``, every request (the
     bootstrap exchange and each renewal): an operator sees a node whose renewals fail long
     before its certificate expires.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Callable, Collection
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fabric import health
from fabric.backoff import Backoff
from fabric.control import authz, pki, tls
from fabric.control import client as control_client
from fabric.control import identity as ident

_log = logging.getLogger(__name__)

#: A CSR larger than this is refused unread (an ECDSA P-256 CSR is about 500 bytes).
MAX_CSR_BYTES = 16 * 1024
#: Renew when this fraction of the lifetime has passed (minus up to :data:`RENEW_JITTER` of it).
RENEW_AT = 2 / 3
RENEW_JITTER = 0.1
#: Waits between failed attempts (seconds): first, longest.
RETRY_BACKOFF = (1.0, 300.0)
#: A wait for a renewal time far ahead is cut into steps this long (seconds), so a suspended
#: host or a clock that jumped is noticed when it wakes.
MAX_SLEEP_S = 60.0
#: Deadline of one IssueCertificate call (seconds).
CALL_TIMEOUT_S = 10.0


class Refused(Exception):
    """An IssueCertificate request refused: ``text`` says why; ``authorization`` tells a refusal
    of the caller (PERMISSION_DENIED) from a request that is wrong in itself (INVALID_ARGUMENT)."""

    def __init__(self, text: str, *, authorization: bool) -> None:
        super().__init__(text)
        self.text = text
        self.authorization = authorization


class Signer:
    """The reflector's half: node certificates signed by the fabric CA, ``lifetime`` long."""

    def __init__(self, ca: pki.CA, lifetime: datetime.timedelta = pki.DEFAULT_CLIENT_LIFETIME) -> None:
        if lifetime <= datetime.timedelta(0):
            raise ValueError(f"node certificate lifetime must be positive, got {lifetime}")
        self.ca = ca
        self.lifetime = lifetime

    @classmethod
    def load(cls, ca_dir: Path, lifetime: datetime.timedelta = pki.DEFAULT_CLIENT_LIFETIME) -> Signer:
        """From a CA directory (``fabric-tool ca init``); PKIError names what is wrong."""
        return cls(pki.CA.load(ca_dir), lifetime)

    def issue(
        self, caller: ident.Identity | None, node: str, csr_pem: bytes, members: Collection[str],
        now: datetime.datetime | None = None,
    ) -> tuple[bytes, bytes]:  # fmt: skip
        """(certificate PEM, CA PEM) of ``node/<caller's cluster>/<node>`` for the CSR's key;
        :class:`Refused` says why not."""
        refused = authz.issue_refusal(caller, node, members)
        if refused is not None:
            raise Refused(refused, authorization=True)
        assert caller is not None and caller.cluster is not None  # issue_refusal refuses the rest
        who = ident.node(caller.cluster, node)
        if len(csr_pem) > MAX_CSR_BYTES:
            raise Refused(f"CSR for {who}: {len(csr_pem)} bytes, at most {MAX_CSR_BYTES}", authorization=False)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise Refused(f"CSR for {who}: not a PEM certificate signing request ({e})", authorization=False) from None
        try:
            cert = self.ca.sign_client(who, csr, lifetime=self.lifetime, now=now)
        except pki.PKIError as e:
            raise Refused(str(e), authorization=False) from None
        _log.info("issued %s to %s, valid until %s", pki.describe(cert), caller, cert.not_valid_after)
        return pki.cert_pem(cert), self.ca.pem


# --------------------------------------------------------------------------------------------
# Agent side
# --------------------------------------------------------------------------------------------


def problem(d: tls.TLSDir, who: ident.Identity, now: datetime.datetime | None = None) -> str | None:
    """Why ``d`` holds no certificate ``who`` can connect with now (missing files, a key that is
    not the certificate's, unknown CA, expired, another identity), or None. The files are read
    and checked as every client channel does (tls.client_material: cached while unchanged and
    valid), and then the certificate's identity is compared with ``who``."""
    try:
        (cert_pem, _key, _ca), why = tls.client_material(d, now)
    except tls.TLSError as e:
        return str(e)
    if why is not None:
        return why
    holder = pki.certificate_identity(pki.load_cert(cert_pem))
    if holder != who:
        return f"{d.cert}: a certificate of {holder}, this process is {who}"
    return None


def renewal_time(
    cert: x509.Certificate, received: datetime.datetime, rng: random.Random | None = None
) -> datetime.datetime:
    """When to renew ``cert``, which this node received (wrote) at ``received``: after
    :data:`RENEW_AT` of its remaining lifetime then, minus a random part of up to
    :data:`RENEW_JITTER` of it (agents whose certificates were issued together spread out;
    always before expiry). Why not from ``notBefore``: signers back-date it by their clock skew
    allowance (:data:`fabric.control.pki.CLOCK_SKEW`, 5 min), which would dwarf a short lifetime."""
    start = max(pki.aware(cert.not_valid_before), pki.aware(received))
    lifetime = pki.aware(cert.not_valid_after) - start
    fraction = RENEW_AT - RENEW_JITTER * (rng or random).random()
    return start + lifetime * fraction


async def obtain(
    target: str, via: tls.TLSDir, out: Path, who: ident.Identity, timeout: float = CALL_TIMEOUT_S
) -> x509.Certificate:
    """Ask the reflector at ``target`` for a certificate of ``who``, authenticated with the
    certificate in ``via`` (the bootstrap one, or ``who``'s own for a renewal), with a new key
    made here; check what comes back and write it to ``out`` (key, then certificate). Raises
    :class:`~fabric.control.client.ReflectorUnavailable`, a refusal's ``grpc.aio.AioRpcError``
    or :class:`~fabric.control.pki.PKIError` (an answer that is not a certificate of ``who``)."""
    assert who.node is not None, who
    key = pki.new_key()
    csr_pem = pki.make_csr(key, who).public_bytes(serialization.Encoding.PEM)
    cert_pem, ca_pem = await control_client.issue_certificate(target, via, csr_pem, who.node, timeout=timeout)
    cert = pki.load_cert(cert_pem, f"certificate issued by {target}")
    ca = pki.load_cert(ca_pem, f"CA sent by {target}")
    if not pki.key_matches(key, cert):
        raise pki.PKIError(f"{pki.describe(cert)} from {target} is not for the key sent")
    why = pki.explain(cert_pem, ca_pem, "client")
    if why is not None:
        raise pki.PKIError(f"certificate from {target}: {why}")
    if (got := pki.certificate_identity(cert)) != who:
        raise pki.PKIError(f"{pki.describe(cert)} from {target} is of {got}, not {who}")
    pki.write_tls_dir(out, key, cert, ca)
    return cert


class CertificateKeeper:
    """Gets and renews one agent's node certificate (see the module docstring)."""

    def __init__(
        self,
        target: str,
        tls_dir: tls.TLSDir,
        who: ident.Identity,
        bootstrap_dir: tls.TLSDir | None = None,
        *,
        backoff: tuple[float, float] = RETRY_BACKOFF,
        rng: random.Random | None = None,
        clock: Callable[[], datetime.datetime] = pki.utcnow,
        metrics: health.AgentMetrics | None = None,
    ) -> None:
        self.target = target
        self.tls = tls_dir
        self.who = who
        self.bootstrap = bootstrap_dir
        self._backoff = Backoff(*backoff, rng=rng)
        self._rng = rng or random.Random()
        self._clock = clock
        #: Certificates obtained (bootstrap and renewals) and attempts that failed.
        self.issued = 0
        self.failures = 0
        self._metrics = metrics or health.AgentMetrics()
        self._renewals_ok = self._metrics.certificate_renewals.labels(result="ok")
        self._renewals_error = self._metrics.certificate_renewals.labels(result="error")
        #: Set once this node holds a certificate it can connect with (or can get none: no
        #: bootstrap directory, the session then reports why it is refused).
        self.ready = asyncio.Event()

    async def _attempt(self, why: str) -> bool:
        """One request, with our own certificate if it is still good, else the bootstrap one."""
        own_ok = problem(self.tls, self.who, self._clock()) is None
        via = self.tls if own_ok or self.bootstrap is None else self.bootstrap
        try:
            cert = await obtain(self.target, via, self.tls.path, self.who)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any failure is retried; the reason is logged
            self.failures += 1
            self._renewals_error.inc()
            wait = self._backoff.next()
            _log.warning("%s for %s with %s failed (retrying in %.1fs): %s", why, self.who, via.cert, wait, e)
            await asyncio.sleep(wait)
            return False
        self.issued += 1
        self._renewals_ok.inc()
        self._in_use(cert)
        self._backoff.reset()
        _log.info("%s: %s for %s, valid until %s (written to %s)", why, pki.describe(cert), self.who,
                  cert.not_valid_after, self.tls.path)  # fmt: skip
        return True

    def _in_use(self, cert: x509.Certificate) -> None:
        """``cert`` is the one in D now: its notAfter is the expiry metric."""
        self._metrics.certificate_expiry.set(pki.aware(cert.not_valid_after).timestamp())

    async def ensure(self) -> None:
        """Until this node holds a usable certificate: get one with the bootstrap credential.
        Returns at once when D is fine, or when there is no bootstrap directory to get one with."""
        while (why := problem(self.tls, self.who, self._clock())) is not None:
            if self.bootstrap is None:
                _log.error("no usable node certificate and no --bootstrap-dir to get one: %s", why)
                break
            _log.info("no usable node certificate (%s): asking %s with %s", why, self.target, self.bootstrap.cert)
            if await self._attempt("bootstrap"):
                break
        self.ready.set()

    async def run(self) -> None:
        """:meth:`ensure`, then renew before each expiry, forever (cancel to stop)."""
        await self.ensure()
        while True:
            try:
                cert = pki.load_cert(self.tls.cert.read_bytes(), str(self.tls.cert))
                received = datetime.datetime.fromtimestamp(self.tls.cert.stat().st_mtime, datetime.UTC)
            except (OSError, pki.PKIError) as e:
                _log.warning("cannot read %s to plan its renewal (%s); retrying", self.tls.cert, e)
                await asyncio.sleep(self._backoff.next())
                await self.ensure()
                continue
            self._in_use(cert)
            due = renewal_time(cert, received, self._rng)
            while (left := (due - self._clock()).total_seconds()) > 0:
                await asyncio.sleep(min(left, MAX_SLEEP_S))
            await self._attempt("renewal")
