"""Kosmos Fabric: the production code (the ``kosmos-fabric`` distribution).

Subpackages, bottom up: :mod:`fabric.netlink` and :mod:`fabric.bpf` (the dataplane; they know
nothing of the control plane), :mod:`fabric.control` (the gRPC service, planner, reflector and
the public client), :mod:`fabric.agent` (the per-node agent, a leaf nothing else imports).

The modules at this root are the ones more than one component uses: ``types`` (the plain values
everyone exchanges), ``topology`` (the topology file), ``crd`` (the ``Cluster`` custom resource;
``crd_schema`` is its structural schema), ``validation`` (the one schema check and the semantic
checks both readers share), ``nodeinfo`` (facts about a node's links and addresses), ``health``
(the /healthz /readyz /metrics endpoint both daemons serve), ``logs`` (one logging set-up),
``backoff`` (the one retry delay policy), ``icmp`` (the one ICMP echo codec), ``dnswire`` (the
one DNS wire codec, which the lab's cluster DNS shares), ``cli_types`` (argument types) and
``netns`` (entering network namespaces without forking). They import nothing above them.
Production code never imports ``tools`` or ``kubeemu`` (the lab distribution); import-linter
enforces all of it (``[tool.importlinter]`` in pyproject.toml, run as a test).
"""
