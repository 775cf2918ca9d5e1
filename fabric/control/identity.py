"""Who a client of the reflector is: the identity its client certificate proves.

An identity is one string, ``<role>/<name>``, carried in the client certificate as a URI
subject alternative name ``kosmos-fabric:<role>/<name>`` (one such URI per certificate). The
role bounds what the client may do at the reflector (the rules live with the reflector's
authorization, not here):

======================  ====================================================================
``node/<cluster>/<n>``  an agent: node ``<n>`` of member cluster ``<cluster>``
``bootstrap/<cluster>`` ``join``'s short-lived credential: may only ask for node certificates
                        of its own cluster
``tree/<name>``         a tree manager (publishes its leaves' records)
``scheduler/<name>``    a scheduler (reads records)
``reader/<name>``       a tool such as ``fabric-tool status``: status only
``admin/<name>``        the operator's own tools (``fabric-tool install``): everything
``relay/<name>``        a fabric-relay (:mod:`fabric.control.relay`): carries the SyncNode
                        sessions of agents whose node certificates it verified itself
======================  ====================================================================

Names use the characters of Kubernetes object names (and ``/`` between a node's cluster and
node). A plaintext session (``--insecure``) has no identity: :func:`of_context` returns None and
the reflector applies only the rules that need none.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

#: The URI scheme of the subject alternative name that carries an identity.
URI_PREFIX = "kosmos-fabric:"

NODE = "node"
BOOTSTRAP = "bootstrap"
TREE = "tree"
SCHEDULER = "scheduler"
READER = "reader"
ADMIN = "admin"
#: The multi-cluster services controller (``kosmos-mcs``): reads reachability records and the status.
MCS = "mcs"
#: A fabric-relay (fabric.control.relay): vouches for the node identities its agents proved to it.
RELAY = "relay"
ROLES = frozenset({NODE, BOOTSTRAP, TREE, SCHEDULER, READER, ADMIN, MCS, RELAY})

#: One segment: a DNS-1123 subdomain's characters (Kubernetes node and cluster names).
_SEGMENT = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """A proven (or, in tests, assumed) client identity. Build one with :func:`parse`,
    :func:`node` or :func:`role`, which check it."""

    role: str
    name: str

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"

    @property
    def uri(self) -> str:
        """The subject alternative name URI that carries this identity in a certificate."""
        return f"{URI_PREFIX}{self}"

    @property
    def cluster(self) -> str | None:
        """The member cluster of a node or bootstrap identity (None for add-ons and tools)."""
        if self.role == NODE:
            return self.name.split("/", 1)[0]
        if self.role == BOOTSTRAP:
            return self.name
        return None

    @property
    def node(self) -> str | None:
        """The node name of a node identity (None otherwise)."""
        return self.name.split("/", 1)[1] if self.role == NODE else None


def parse(text: str, source: str = "identity") -> Identity:
    """``node/c1/n1`` -> Identity; a ValueError names the value and ``source`` (where it came
    from: a certificate, a flag) and what is wrong with it."""
    role, sep, name = text.partition("/")
    if not sep:
        raise ValueError(f"{source}: {text!r} is not <role>/<name>")
    if role not in ROLES:
        raise ValueError(f"{source}: {text!r}: unknown role {role!r} (one of {', '.join(sorted(ROLES))})")
    segments = name.split("/")
    want = 2 if role == NODE else 1
    if len(segments) != want:
        shape = "node/<cluster>/<node>" if role == NODE else f"{role}/<name>"
        raise ValueError(f"{source}: {text!r} is not {shape}")
    for seg in segments:
        if not _SEGMENT.fullmatch(seg):
            raise ValueError(
                f"{source}: {text!r}: {seg!r} is not a name (lower-case letters, digits, '-' and '.', "
                "starting and ending with a letter or digit, at most 253 characters)"
            )
    return Identity(role, name)


def node(cluster: str, node_name: str) -> Identity:
    """The identity of agent ``node_name`` of ``cluster`` (checked)."""
    return parse(f"{NODE}/{cluster}/{node_name}", "node identity")


def role(role_name: str, name: str) -> Identity:
    """The identity of an add-on or tool (checked)."""
    return parse(f"{role_name}/{name}", f"{role_name} identity")


def from_uri(uri: str, source: str = "certificate") -> Identity:
    """The identity in a subject alternative name URI ``kosmos-fabric:<role>/<name>``."""
    if not uri.startswith(URI_PREFIX):
        raise ValueError(f"{source}: URI {uri!r} does not start with {URI_PREFIX!r}")
    return parse(uri[len(URI_PREFIX) :], f"{source}: URI {uri!r}")


class _HasAuthContext(Protocol):
    def auth_context(self) -> Mapping[str, Sequence[bytes]]: ...


#: gRPC's auth-context properties that list a peer certificate's URI names: ``peer_uri`` in
#: current gRPC core, and every subject alternative name under ``x509_subject_alternative_name``
#: (both checked with a real handshake in grpc 1.85: tests/unit/test_tls.py).
_URI_PROPERTIES = ("peer_uri", "x509_subject_alternative_name")
#: The only TLS version a fabric session may use (the auth context's ``ssl_tls_version``).
TLS_VERSION = "TLSv1.3"


def of_context(context: _HasAuthContext | Any) -> Identity | None:
    """The identity of an RPC's peer, from its verified client certificate; None on a plaintext
    channel. A TLS peer whose certificate carries no identity URI, or more than one, raises
    ValueError (the server requires client certificates, so such a peer holds a certificate of
    the fabric CA that was not made for a fabric client: a configuration error to name), and so
    does a session below TLS 1.3."""
    auth = context.auth_context()
    if b"ssl" not in auth.get("transport_security_type", ()):
        return None
    uris: set[str] = set()
    for prop in _URI_PROPERTIES:
        for raw in auth.get(prop, ()):
            value = raw.decode("utf-8", "replace")
            if value.startswith(URI_PREFIX):
                uris.add(value)
    version = b"".join(auth.get("ssl_tls_version", ())).decode("ascii", "replace")
    if version and version != TLS_VERSION:
        # gRPC's SSL credentials cannot pin the handshake to TLS 1.3 (fabric.control.tls says
        # why); two fabric processes always negotiate it, so an older session is a foreign peer.
        raise ValueError(f"client session uses {version}; the fabric requires {TLS_VERSION}")
    if len(uris) != 1:
        subject = b", ".join(auth.get("x509_subject", ()) or auth.get("x509_common_name", ())).decode(
            "utf-8", "replace"
        )
        found = ", ".join(sorted(uris)) or "none"
        raise ValueError(
            f"client certificate {subject or '(no subject)'}: expected exactly one {URI_PREFIX} URI "
            f"subject alternative name, found {found}"
        )
    return from_uri(uris.pop(), "client certificate")
