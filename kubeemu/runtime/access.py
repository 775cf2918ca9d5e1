"""The ``ContainerAccess`` protocol: what the kubelet HTTP API (``kubeemu.kubeletapi``) needs.

The kubelet's ``/containerLogs/{ns}/{pod}/{container}`` and ``/exec/{ns}/{pod}/{container}``
endpoints are served by :func:`kubeemu.kubeletapi.make_app`, which knows nothing about how
containers run. The runtime (:class:`kubeemu.runtime.pods.Runtime`) implements this protocol:
where a container's CRI-format log file is, which argv runs a command inside a running
container's namespaces, and whether a container is running. The protocol lives here, in its own
module with no dependencies, so both sides import it without importing each other.
"""

from __future__ import annotations

import pathlib
from typing import Protocol


class ContainerAccess(Protocol):
    """Logs and exec of the containers one kubelet runs."""

    def log_path(self, namespace: str, pod: str, container: str, previous: bool) -> pathlib.Path:
        """The CRI-format log file of the container's current attempt (``previous``: the one before).

        Raises ``LookupError`` with an upstream-like message when there is none, e.g.
        ``previous terminated container "c" in pod "p" not found`` or
        ``container "c" in pod "p" is waiting to start: ContainerCreating``.
        """
        ...

    def exec_argv(self, namespace: str, pod: str, container: str, command: list[str]) -> list[str]:
        """The argv that runs ``command`` inside the running container's namespaces and root
        (``nsenter --target PID --net --mount --uts --root --wd -- command``).

        Raises ``LookupError`` if the pod or container is unknown or the container is not running.
        """
        ...

    def is_running(self, namespace: str, pod: str, container: str) -> bool:
        """Whether the container's current attempt is running."""
        ...
