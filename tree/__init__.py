"""ClusterTree (add-on, in progress): leaf clusters as virtual nodes of a root cluster.

Built so far: the tree manager, its virtual nodes, and its side of the fabric's control
channel. Modules, in the order a Cluster meets them: ``spec`` (``spec.clusterTreeOptions`` read
and checked) -> ``manager`` (one reconciler per enabled Cluster, leader election, garbage) ->
``leaf`` (one leaf: its kubeconfig Secret, probe, informers, the reconcile pass) -> ``forge``
(pure: the virtual nodes a leaf's nodes and pods call for, their add-on records, and
NetworkUnavailable from the fabric's reachability records) -> ``vnode`` (ownership and the root
writes); ``fabric_link`` (the records published, the reachability records watched, on one event
loop thread), ``metrics`` and ``main`` (the ``kosmos-tree`` command) around them. Pods bound to
the virtual nodes: ``pods`` (pure: a root pod's leaf copy, its status back, its updates) ->
``podsync`` (one syncer per leaf), with ``deps``/``deps_refs`` (the objects a pod names, copied first) and
``convert`` (Kosmos' pod convert policies) as its hooks; ``kubelet`` (the virtual nodes' kubelet
server: ``kubectl logs``/``exec`` relayed to the leaf pods, over ``websocket``) and ``events``
(leaf Events about our pods reflected to the root pods, one per connected leaf).

May import only the standard library, the root pyproject's third-party packages,
:mod:`fabric.types`, process plumbing (``fabric.logs``, ``fabric.health``, ``fabric.backoff``),
:mod:`fabric.control`'s public client, and the scheduler's generic modules (``scheduler.kube``:
API access and informers; ``scheduler.election``: the Lease elector; ``scheduler.podutil`` and
``scheduler.framework``: quantities and pod requests; ``scheduler.selectors``;
``scheduler.policy``: the leaf label and taint), never its loop, cache, queue or plugins, nor
``kubeemu`` or ``tools`` (import-linter enforces it).
"""
