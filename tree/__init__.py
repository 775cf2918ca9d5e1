"""ClusterTree (add-on, to come): leaf clusters as virtual nodes of a root cluster, pods and
their dependencies synced both ways.

May import only :mod:`fabric.control`'s public client (``client``, ``api``), :mod:`fabric.types`
and process plumbing (``fabric.logs``, ``fabric.health``): it is a client of the reflector's
control channel like any other (import-linter enforces it).
"""
