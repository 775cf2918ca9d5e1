"""``fabric-tool`` and everything behind it (the ``kosmos-fabric-lab`` distribution, never
installed in production).

:mod:`tools.cli` is the one place that wires verbs to functions. :mod:`tools.lab` builds whole
clusters from network namespaces; :mod:`tools.diagnose` holds ``check``, its probes and
``diagnose``; :mod:`tools.bench` the benchmark suite; :mod:`tools.install` the Kubernetes verbs
(``install``, ``join``, ``unjoin``, ``uninstall``); :mod:`tools.nsutil` starts processes inside
namespaces by exec and tracks them by PID and start time. May import anything in the tree;
nothing outside ``tools`` and the tests imports it.
"""
