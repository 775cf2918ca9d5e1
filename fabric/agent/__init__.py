"""The per-node agent (``fabric-agent``): everything that runs on a node and nothing else.

* :mod:`fabric.agent.agent` - the process: control session, reconcile loop, ``main``.
* :mod:`fabric.agent.probes` - tunnel probes (ICMP through the tunnel) to the gateways it uses.
* :mod:`fabric.agent.config` - flags and environment into an :class:`~fabric.agent.config.AgentConfig`.
* :mod:`fabric.agent.render` - the pure step from a planned ``NodeState`` to kernel objects.
* :mod:`fabric.agent.translator` - loads and feeds the global-IP translation programs.
* :mod:`fabric.agent.xlate_metrics` - translation counters as Prometheus metrics.

May import: :mod:`fabric.netlink`, :mod:`fabric.bpf`, the shared modules at the ``fabric`` root
and :mod:`fabric.control`'s public client. Nothing else may import the agent (import-linter).
"""
