"""The one-machine lab: whole clusters built from network namespaces, driven by a topology file.

What ``lab up`` builds (``NAME`` defaults to ``kf``; nothing is created in the root namespace)::

    NAME-ul                      the lab namespace: bridge br-ul with the underlay gateway (.1),
      br-ul  198.18.0.1/16       fabric-reflector listens on .1:4880 here (--relays K: fabric-relay i
                                 on .1:7947+i, node n's session through relay n mod K)
      ul<hash> --- veth ---+
                           |
    NAME-<cluster>-<node>  eth0 198.18.0.11/16 (default via .1), ip_forward=1, fabric-agent
      veth-p0 (proxy_arp)  route 10.10.1.2/32 dev veth-p0     <- Calico-style pod plumbing
      route <podCIDR of every other node of the SAME cluster> via <its underlay IP>  (host-gw)
                           |
    NAME-<cluster>-<node>-p0  eth0 10.10.1.2/32
                              169.254.1.1 dev eth0 scope link; default via 169.254.1.1

The lab plays each cluster's own CNI (pod veths, host-gw routes inside a cluster); every route
*between* clusters is the fabric's job. It also plays each cluster's kube-proxy for one lab
service per cluster: the service IP (host 10 of the cluster's first service CIDR) is DNATed to
the cluster's first pod by an nftables table ``kflab`` in *every node namespace of that cluster*
- where kube-proxy's rules live - and, as kube-proxy does for traffic from outside the cluster,
masqueraded, so the reply returns through the node that translated it even when the backend's
node would route it back directly (P2P clusters). That fixed service is the stand-in of labs
without Kubernetes; a ``kubernetes: true`` lab runs the lab kube-proxy (:mod:`kubeemu.proxy`,
one per cluster, upstream's nftables rules in every node namespace) and its lab service is a
real Service ``default/lab-check`` whose EndpointSlices list the static pods.
``lab fail NODE`` / ``lab heal NODE`` set the node's underlay veth end in the lab namespace
down / up: the node is cut off from every other node and from the reflector, exactly like a
dead machine, and comes back as it was.

Pods answer their default gateway through proxy ARP on the node-side veth, which needs the node
to have *some* route to 169.254.1.1 out of another device: the node's default route towards the
lab gateway provides it (the lab namespace does not forward, so that route never carries pod
traffic anywhere).

Order of ``up`` (each step recorded in ``/run/kosmos-fabric/lab/NAME/state.json`` before the
next, written atomically, so a crash leaves an accurate record for ``down``):

1. load and validate the topology file (nothing is created if it is invalid);
2. plan names (namespaces, interface names) and refuse collisions or changes to what runs;
3. create namespaces, the underlay bridge, then each node, then its pods (``ip -batch`` per
   namespace; sysctls written from a thread that entered the namespace);
4. start the reflector, wait until its status socket answers, start the relays (``--relays``),
   start one agent per node;
5. poll the reflector status until every node reports its planned version applied.

``up`` on a running lab adds only what is missing (new nodes, pods, stopped processes) and
touches nothing that runs. ``down`` needs no state at all: it finds the lab's namespaces under
/run/netns by name and its processes by namespace inode.

``kubernetes: true`` in the topology adds, per cluster, an emulated API server (kubeemu) on
127.0.0.1 and a lab kubelet that runs the Pods bound to the cluster's nodes as lab pods
(:func:`add_pod`, namespaces ``NAME-<cluster>-<node>-k<hash>``, IPs from the node's pod CIDR
other than the static pods'), plus ``kubeconfig`` in the state directory with one context per
cluster. Those two processes live in the root namespace (kubectl must reach the servers), so
``down`` finds them by the PID and start time recorded in the state file, not by namespace.

Modules: :mod:`~tools.lab.state` (state file, names, lookups), :mod:`~tools.lab.planning` (pure
planning), :mod:`~tools.lab.plumbing` (namespaces, links, pods, services),
:mod:`~tools.lab.procs` (reflector and agents), :mod:`~tools.lab.kube` (emulated Kubernetes),
:mod:`~tools.lab.kubelet` (the lab kubelet process), :mod:`~tools.lab.bpf` (bpffs, ``lab bpf``),
:mod:`~tools.lab.tree` (ClusterTree: ``role: host``/``tree:``, kosmos-tree, the leaves joined),
:mod:`~tools.lab.mcs` (``kosmos-mcs``: multi-cluster services in every Kubernetes lab),
:mod:`~tools.lab.supervisor` (restarts kosmos-tree, kosmos-mcs, the schedulers and the cluster DNS),
:mod:`~tools.lab.commands` (the verbs) and :mod:`~tools.lab.report`. This package re-exports
their public names, so callers write ``from tools import lab; lab.up(...)``. Lab and test code
only: production code never imports it.
"""

from tools.lab.bpf import bpf_dump, mount_bpffs, render_bpf, umount_bpffs
from tools.lab.commands import (
    add_node,
    down,
    exec_in,
    pin_running,
    start_agent_cmd,
    start_reflector_cmd,
    stop_agent,
    stop_reflector,
    up,
)
from tools.lab.kube import (
    kube_nodes_ready,
    kubeconfig_path,
    start_apiserver,
    start_controller_manager,
    start_kubelet,
    start_kubernetes,
    wait_kube_nodes,
    write_kubeconfig,
)
from tools.lab.planning import merge_plan, plan
from tools.lab.plumbing import (
    POD_GATEWAY6,
    add_pod,
    add_pods,
    build,
    delete_netns,
    kube_pod,
    kube_pod_namespaces,
    remove_pod,
    service_ruleset,
    set_failed,
)
from tools.lab.procs import (
    ROOT_NETNS,
    laggards,
    log_tail,
    query_status,
    start_agent,
    start_process,
    start_reflector,
    status_client,
    wait_in_sync,
    wait_reflector,
)
from tools.lab.report import render_status, status, status_doc
from tools.lab.state import (
    BPF_ROOT,
    DEFAULT_NAME,
    DEFAULT_TOPOLOGY,
    DEFAULT_UP_TIMEOUT_S,
    IFNAMSIZ,
    LAB_ROOT,
    NFT_TABLE,
    POD_GATEWAY,
    SERVICE_HOST,
    STATE_VERSION,
    UL_BRIDGE,
    ClusterRecord,
    LabError,
    LabState,
    LabUsageError,
    NodeRecord,
    PodRecord,
    ProcRecord,
    Progress,
    StateError,
    bpf_dir,
    check_lab_name,
    find_node,
    load_state,
    lock_path,
    locked,
    quiet,
    require_root,
    require_state,
    resolve_target,
    save_state,
    state_dir,
    state_file,
    stderr_progress,
)

__all__ = [
    "BPF_ROOT",
    "DEFAULT_NAME",
    "DEFAULT_TOPOLOGY",
    "DEFAULT_UP_TIMEOUT_S",
    "IFNAMSIZ",
    "LAB_ROOT",
    "NFT_TABLE",
    "POD_GATEWAY",
    "POD_GATEWAY6",
    "ROOT_NETNS",
    "SERVICE_HOST",
    "STATE_VERSION",
    "UL_BRIDGE",
    "ClusterRecord",
    "LabError",
    "LabState",
    "LabUsageError",
    "NodeRecord",
    "PodRecord",
    "ProcRecord",
    "Progress",
    "StateError",
    "add_node",
    "add_pod",
    "add_pods",
    "bpf_dir",
    "bpf_dump",
    "build",
    "check_lab_name",
    "delete_netns",
    "down",
    "exec_in",
    "find_node",
    "kube_nodes_ready",
    "kube_pod",
    "kube_pod_namespaces",
    "kubeconfig_path",
    "laggards",
    "load_state",
    "lock_path",
    "locked",
    "log_tail",
    "merge_plan",
    "mount_bpffs",
    "pin_running",
    "plan",
    "query_status",
    "quiet",
    "remove_pod",
    "render_bpf",
    "render_status",
    "require_root",
    "require_state",
    "resolve_target",
    "save_state",
    "service_ruleset",
    "set_failed",
    "start_agent",
    "start_agent_cmd",
    "start_apiserver",
    "start_controller_manager",
    "start_kubelet",
    "start_kubernetes",
    "start_process",
    "start_reflector",
    "start_reflector_cmd",
    "state_dir",
    "state_file",
    "status",
    "status_client",
    "status_doc",
    "stderr_progress",
    "stop_agent",
    "stop_reflector",
    "umount_bpffs",
    "up",
    "wait_in_sync",
    "wait_kube_nodes",
    "wait_reflector",
    "write_kubeconfig",
]
