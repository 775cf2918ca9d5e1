"""kosmos-scheduler: a Kubernetes scheduler with upstream kube-scheduler's framework semantics,
serving the ``default-scheduler`` and ``kosmos-scheduler`` profiles, for real nodes and for the
virtual nodes that stand for leaf clusters.

Modules, in the order a pod meets them: ``kube`` (API access, informers) -> ``queue`` (active,
back-off, unschedulable) -> ``scheduler`` (the loop: snapshot, PreFilter/Filter/Score, assume,
bind) over ``cache`` (nodes with their pods, assumed ones included) and ``profile`` (plugins per
extension point, from ``plugins.REGISTRY`` and a KubeSchedulerConfiguration); ``framework`` is the
plugins' contract; ``podutil`` (quantities, pod requests, NodeInfo upkeep) and ``selectors`` (label
and node selectors, tolerations) are the one implementation of those rules the cache, the plugins
and ``policy`` (Kosmos' distribution and workload policies) share; ``election`` (Lease),
``metrics`` and ``main`` (the ``kosmos-scheduler`` command) around it.

May import only the standard library, the root pyproject's third-party packages,
:mod:`fabric.types`, process plumbing (``fabric.logs``, ``fabric.health``) and
:mod:`fabric.control`'s public client (``client``, ``api``); never ``kubeemu`` or ``tools``
(import-linter enforces it).
"""
