"""The lab kubelet's process runtime: containers as real processes in a pod's namespaces.

Modules, in the order a container comes to life:

* :mod:`~kubeemu.runtime.quantity` (re-exported from :mod:`kubeemu.quantity`) and
  :mod:`~kubeemu.runtime.admission`: node capacity/allocatable and the kubelet's resource fit check;
* :mod:`~kubeemu.runtime.env`: a container's environment (``env``, ``envFrom``, downward API) and
  ``$(VAR)`` expansion of ``command``/``args``;
* :mod:`~kubeemu.runtime.volumes`: volume contents under the pod's state directory;
* :mod:`~kubeemu.runtime.dns`: the pod's resolv.conf (``dnsPolicy``, ``dnsConfig``, the kubelet's
  ``--cluster-dns``/``--cluster-domain``/``--resolv-conf``), bound over ``/etc/resolv.conf``;
* :mod:`~kubeemu.runtime.spawner` and :mod:`~kubeemu.runtime.zygote`: the kubelet's shim spawner,
  one process per kubelet (the zygote, with the shim's code loaded) that forks each shim in the
  pod's namespaces, and the kubelet's handle on it (no interpreter per container; init reaps shims);
* :mod:`~kubeemu.runtime.shim`: the per-container shim process (mounts, hostname, pipes -> CRI log,
  exit code file), never the kubelet's child, so containers outlive the kubelet;
* :mod:`~kubeemu.runtime.backoff` and :mod:`~kubeemu.runtime.probes`: restart back-off, probes;
* :mod:`~kubeemu.runtime.pods`: the per-pod sync (start, restart, probe, status, kill, adopt);
* :mod:`~kubeemu.runtime.access`: the ``ContainerAccess`` protocol the kubelet HTTP API uses.
"""
