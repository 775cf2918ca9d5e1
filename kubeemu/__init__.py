"""kubeemu: an in-memory, wire-compatible Kubernetes API server emulator for the lab and tests.

One process (or one ``ServerThread``) per emulated cluster. It speaks kube-apiserver's REST and
watch protocol closely enough that client-go/kubectl, the official ``kubernetes`` Python client
and ``kubernetes_asyncio`` work unchanged for what the project uses. It is a lab and test
component, never a production dependency: no authentication, no persistence, no admission.

Modules: ``server`` (HTTP, discovery, watch streams, admin faults), ``store`` (objects,
resourceVersion, watch log, controllers), ``resources`` (served kinds, CRDs), ``schema``
(custom resources pruned and validated by their CRD's schema), ``patch``,
``selectors``, ``errors`` (Status objects), ``runner`` (in-thread server), ``lab`` (process
start + kubeconfig), ``kubelet`` (the lab kubelet), ``dns`` (the lab's cluster DNS,
``python -m kubeemu.dns``, on the shared codec ``fabric.dnswire``), ``bench`` (benchmark).
"""
