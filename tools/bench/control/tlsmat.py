"""TLS material for the control benchmark's mutual-TLS variant (``bench control-tls``): one fabric
CA, the reflector's server certificate, a ``reader`` certificate for the driver's GetStatus, and
one ``node/<cluster>/<node>`` client certificate per simulated agent (and the joiner), each in its
own ``--tls-dir`` layout (``fabric.control.pki.write_tls_dir``) under one root directory.

Issued once per run, before anything is timed, with the production code (``fabric.control.pki``:
ECDSA P-256, the same extensions ``fabric-tool cert issue`` gives); how long that took is
reported in the notes (:class:`Issued`), never inside a measured figure.

The N simulated agents connect with pre-issued node certificates. For the bootstrap's
certificate exchange (:mod:`fabric.control.bootstrap`) the CA is also written as a CA directory
(:data:`CA_DIR`, the reflector's ``--ca-dir``: it signs the exchanged certificates) and the
agents named by ``bootstrap`` get a ``bootstrap/<cluster>`` certificate (:func:`bootstrap_dir`),
with which :func:`tools.bench.control.agents.node_credentials` makes its key and CSR and calls
``IssueCertificate`` inside the timed span.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from tools.bench.control.shapes import Shape

_log = logging.getLogger(__name__)

#: Sub-directories of the material root.
SERVER_DIR = "server"
READER_DIR = "reader"
#: The CA with its key, for the reflector's ``--ca-dir`` (``fabric.control.pki.CA.save``).
CA_DIR = "ca"
#: The reader identity the driver polls GetStatus with (GetStatus: every role but bootstrap).
READER_NAME = "bench-driver"


def agent_dir(root: Path, i: int) -> Path:
    """Agent ``i``'s ``--tls-dir`` under the material root (the joiner's too)."""
    return Path(root) / f"agent-{i}"


def bootstrap_dir(root: Path, i: int) -> Path:
    """Agent ``i``'s bootstrap ``--tls-dir`` (its cluster's ``bootstrap/<cluster>`` certificate)."""
    return Path(root) / f"bootstrap-{i}"


def node_identity(shape: Shape, i: int) -> str:
    """``node/<cluster>/<node>`` of agent ``i``: what its announcement says, so the reflector's
    authorization (fabric.control.authz) admits it."""
    from fabric.control import identity

    ann = shape.announcement(i)
    return str(identity.node(ann.cluster, ann.name))


@dataclasses.dataclass(frozen=True)
class Issued:
    """What issuing the material cost (outside every timed part of the benchmark)."""

    certificates: int
    #: Seconds for key generation and signing, and for writing the files (fsync'd).
    sign_s: float
    write_s: float

    def note(self) -> str:
        per = (self.sign_s + self.write_s) * 1000 / max(1, self.certificates)
        return (
            f"TLS material, issued before the timed part with fabric.control.pki (ECDSA P-256): "
            f"{self.certificates:,} certificates (one node/<cluster>/<node> per simulated agent and the joiner, "
            f"the joiner's bootstrap/<cluster> one, the reflector's server certificate, the driver's reader "
            f"certificate) in {self.sign_s:.2f}s of key "
            f"generation and signing plus {self.write_s:.2f}s writing the files ({per:.2f} ms per certificate)"
        )


def issue(root: Path, shape: Shape, indexes: Iterable[int], bootstrap: Iterable[int] = ()) -> Issued:
    """Write a CA (and its :data:`CA_DIR`), the server and reader directories, one node directory
    per index and one bootstrap directory per index in ``bootstrap`` under ``root``; returns
    the time it took."""
    from fabric.control import identity, pki

    root = Path(root)
    t0 = time.monotonic()
    ca = pki.make_ca("kosmos-fabric bench CA")
    pairs = []
    server_key = pki.new_key()
    pairs.append((root / SERVER_DIR, server_key, ca.sign_server(server_key.public_key())))
    reader_key = pki.new_key()
    reader = identity.role(identity.READER, READER_NAME)
    pairs.append((root / READER_DIR, reader_key, ca.sign_client(reader, reader_key.public_key())))
    for i in indexes:
        key = pki.new_key()
        who = identity.parse(node_identity(shape, i))
        pairs.append((agent_dir(root, i), key, ca.sign_client(who, key.public_key())))
    for i in bootstrap:
        key = pki.new_key()
        who = identity.role(identity.BOOTSTRAP, shape.announcement(i).cluster)
        pairs.append((bootstrap_dir(root, i), key, ca.sign_client(who, key.public_key())))
    t1 = time.monotonic()
    for directory, key, cert in pairs:
        pki.write_tls_dir(directory, key, cert, ca.cert)
    ca.save(root / CA_DIR)
    t2 = time.monotonic()
    return Issued(len(pairs), t1 - t0, t2 - t1)
