"""The lab's controller-manager: workload, endpoint and storage controllers of one emulated
cluster, as a separate process talking to its API server over HTTP (``python -m kubeemu.ctrl``).

:mod:`kubeemu.ctrl.base` holds the machinery (informers, work queue, reconcile loop);
:mod:`kubeemu.ctrl.manager` the process and the registry of controllers. The API server's own
asynchronous work (namespace cascade, garbage collection) stays in :mod:`kubeemu.controllers`.
"""
