"""The kosmos scheduler (add-on, to come): places pods over real and virtual nodes by policy.

May import only :mod:`fabric.control`'s public client (``client``, ``api``), :mod:`fabric.types`
and process plumbing (``fabric.logs``, ``fabric.health``): it is a client of the reflector's
control channel like any other (import-linter enforces it).
"""
