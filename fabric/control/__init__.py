"""The control plane: the one gRPC service between the reflector, agents, add-ons and tools.

``proto/fabric.proto`` is the source; ``protogen`` generates ``generated/`` (never edited).
``planner`` computes each node's state from the topology (pure), ``admission`` decides what may
join the topology (and says why not), ``election`` picks each cluster's gateways,
``incremental`` keeps the reflector's plans current part by part, ``reflector`` serves them
(sessions, coalesced deltas, leadership; ``reflector_service``, ``reflector_metrics`` and
``reflector_cli`` are its gRPC face, metrics and command line; ``record_store`` holds the add-on
records it serves; ``bounds`` the limits on what one client can make it hold or do),
``k8s_source`` feeds it from ``Cluster``
resources, ``codec`` converts between protobuf and :mod:`fabric.types`, and ``client`` and
``records`` (add-on records) with ``api`` are the public client every other component uses
(agents, add-ons, ``fabric-tool``).

May import: :mod:`fabric.types` and the shared modules at the ``fabric`` root; never the
dataplane (:mod:`fabric.netlink`, :mod:`fabric.bpf`), the agent, the add-ons or the lab.
"""

import os

#: The cipher list of TLS 1.2 for every gRPC channel and server of this process: one
#: pre-shared-key suite, which gRPC never configures, so no TLS 1.2 handshake can agree on a
#: cipher whatever the certificate, while TLS 1.3 (whose suites this list does not govern) is
#: untouched. It is how the handshake is pinned to TLS 1.3: grpcio has no minimum version to set
#: (see :mod:`fabric.control.tls`). gRPC reads it once, when ``grpc`` is imported, so it is set
#: here, before any module of this package imports ``grpc``; a value the operator set is kept
#: (then a TLS 1.2 session is still refused, at its first call: :func:`fabric.control.identity.of_context`).
TLS12_CIPHER_SUITES = "PSK-AES128-CBC-SHA"
os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", TLS12_CIPHER_SUITES)

