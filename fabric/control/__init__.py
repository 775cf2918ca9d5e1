"""The control plane: the one gRPC service between the reflector, agents, add-ons and tools.

``proto/fabric.proto`` is the source; ``protogen`` generates ``generated/`` (never edited).
``planner`` computes each node's state from the topology (pure), ``reflector`` serves it
(grpc.aio: sessions, coalesced deltas, leadership), ``k8s_source`` feeds it from ``Cluster``
resources, ``codec`` converts between protobuf and :mod:`fabric.types`, and ``client`` with
``api`` is the public client every other component uses (agents, add-ons, ``fabric-tool``).

May import: :mod:`fabric.types` and the shared modules at the ``fabric`` root; never the
dataplane (:mod:`fabric.netlink`, :mod:`fabric.bpf`), the agent, the add-ons or the lab.
"""
