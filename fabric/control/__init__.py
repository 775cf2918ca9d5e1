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
