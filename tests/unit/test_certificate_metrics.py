"""The reflector's server certificate expiry metric (issue 20): the notAfter of the certificate
it serves, at start and after a renewal is read (fabric.control.tls.server_credentials'
``served``, fabric.control.reflector_metrics.ServedCertificate). The agent's certificate
metrics are tested with its CertificateKeeper (tests/unit/test_bootstrap.py)."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from prometheus_client import CollectorRegistry

from fabric.control import client, identity, pki, reflector, reflector_metrics, tls
from tests.unit.test_control_session import CONFIG
from tests.unit.test_tls import PKI, run

METRIC = "fabric_reflector_certificate_expiry_timestamp_seconds"


def _not_after(d: tls.TLSDir) -> float:
    return x509.load_pem_x509_certificate(d.cert.read_bytes()).not_valid_after.replace(tzinfo=datetime.UTC).timestamp()


def test_reflector_exposes_the_expiry_of_the_server_certificate_it_serves(tmp_path: Path) -> None:
    fabric_pki = PKI(tmp_path, pki.make_ca())
    server_dir = fabric_pki.server()
    reader = fabric_pki.client("reader", identity.role("reader", "ops"))
    served = reflector_metrics.ServedCertificate()
    registry = CollectorRegistry()
    registry.register(served)
    assert registry.get_sample_value(METRIC) is None  # nothing served yet: no series

    async def body() -> None:
        refl = reflector.Reflector(CONFIG, startup_hold=0)
        (target,) = await refl.start(["127.0.0.1:0"], tls.server_credentials(server_dir, served.update))
        try:
            first = _not_after(server_dir)
            assert registry.get_sample_value(METRIC) == first
            # A renewal with another lifetime: read at the next connection, then the metric's.
            key = pki.new_key()
            cert = fabric_pki.ca.sign_server(key.public_key(), ips=["127.0.0.1"], lifetime=datetime.timedelta(days=7))
            pki.write_tls_dir(server_dir.path, key, cert, fabric_pki.ca.cert)
            renewed = _not_after(server_dir)
            assert renewed != first
            assert await client.get_status(target, tls_dir=reader) is not None
            assert registry.get_sample_value(METRIC) == renewed
        finally:
            await refl.stop(0)

    run(body())


def test_a_bad_pem_does_not_change_the_metric() -> None:
    served = reflector_metrics.ServedCertificate()
    served.update(b"not a certificate")
    assert served.not_after is None
