"""Kernel plumbing of a lab: namespaces, the underlay bridge, nodes, pods (veths, host-gw
routes, proxy ARP) and, in labs without Kubernetes, the lab's kube-proxy stand-in for one
service per cluster (a ``kubernetes: true`` lab runs kubeemu.proxy instead). Everything
is created inside lab namespaces (``ip -batch`` per namespace, sysctls from a thread that
entered it); nothing in the root namespace changes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import re
import subprocess
from collections.abc import Sequence

from fabric import netns as namespaces
from tools.lab.state import (
    NFT_TABLE,
    POD_GATEWAY,
    UL_BRIDGE,
    ClusterRecord,
    LabError,
    LabState,
    NodeRecord,
    PodRecord,
    Progress,
    find_node,
    locked,
    quiet,
    require_root,
    require_state,
    save_state,
    stderr_progress,
)

_log = logging.getLogger(__name__)

# -- kernel plumbing -------------------------------------------------------------------------


def _ip_batch(netns: str | None, cmds: Sequence[str], what: str) -> None:
    """Run ``ip [-n NETNS] -batch -`` (one process for many commands; stops at the first error)."""
    if not cmds:
        return
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    res = subprocess.run(argv, input="\n".join(cmds) + "\n", capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LabError(f"{what}: {' '.join(argv)} failed: {res.stderr.strip() or res.stdout.strip()}")


def _write_sysctls(netns: str, values: dict[str, str]) -> None:
    """Write /proc/sys entries as seen from inside ``netns``.

    /proc/sys/net resolves against the network namespace of the task that opens it, so a
    short-lived thread enters the namespace (``setns`` affects only the calling thread), writes,
    and exits. That avoids one ``ip netns exec sysctl`` process per value.
    """
    errors: list[str] = []

    def run() -> None:
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError as e:
                errors.append(f"{key}={value}: {e.strerror}")

    try:
        namespaces.run_in(netns, run)
    except OSError as e:
        raise LabError(f"sysctl in {netns}: {e}") from e
    if errors:
        raise LabError(f"sysctl in {netns}: {'; '.join(errors)}")


def _build_underlay(state: LabState) -> None:
    prefix = state.underlay.split("/")[1]
    _ip_batch(None, [f"netns add {state.ul_netns}"], "create the lab namespace")
    _ip_batch(
        state.ul_netns,
        [
            "link set lo up",
            f"link add {UL_BRIDGE} type bridge",
            f"addr add {state.gateway}/{prefix} dev {UL_BRIDGE}",
            f"link set {UL_BRIDGE} up",
        ],
        f"underlay bridge in {state.ul_netns}",
    )
    if state.underlay6:
        # IPv6 underlay on the same bridge: the lab's own ::1 (no DAD: usable at once).
        _write_sysctls(state.ul_netns, _IPV6_SYSCTLS)
        _ip_batch(
            state.ul_netns,
            [f"addr add {state.gateway6}/{_prefixlen(state.underlay6)} dev {UL_BRIDGE} nodad"],
            f"IPv6 underlay address in {state.ul_netns}",
        )


def _build_node(state: LabState, cluster: ClusterRecord, node: NodeRecord) -> None:
    """Create one node namespace, its underlay link, its pods and its intra-cluster routes."""
    prefix = state.underlay.split("/")[1]
    _ip_batch(None, [f"netns add {node.netns}"], f"namespace of node {node.key}")
    if node.underlay_ip6:
        # Before any link exists in the namespace: links take the namespace's defaults when created.
        _write_sysctls(node.netns, {**_IPV6_SYSCTLS, "net.ipv6.conf.all.forwarding": "1"})
    # The veth is created inside the lab namespace with its peer placed straight into the node
    # namespace: neither end ever exists in the root namespace.
    _ip_batch(
        state.ul_netns,
        [
            f"link add {node.ul_if} type veth peer name eth0 netns {node.netns}",
            f"link set {node.ul_if} master {UL_BRIDGE}",
            f"link set {node.ul_if} up",
        ],
        f"underlay link of node {node.key}",
    )
    _write_sysctls(
        node.netns,
        {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        },
    )
    cmds = [
        "link set lo up",
        f"addr add {node.underlay_ip}/{prefix} dev eth0",
        *([f"addr add {node.underlay_ip6}/{_prefixlen(state.underlay6)} dev eth0 nodad"] if node.underlay_ip6 else []),
        "link set eth0 up",
        f"route replace default via {state.gateway} dev eth0",
    ]
    cmds += [cmd for peer in cluster.nodes if peer.name != node.name and peer.built for cmd in _host_gw(peer)]
    _ip_batch(node.netns, cmds, f"node {node.key}")
    for pod in node.pods:
        add_pod(node, pod)
    _install_service(cluster, node)
    # Play the cluster's CNI for the others: they learn the new node's pod CIDR (host-gw).
    for peer in cluster.nodes:
        if peer.name != node.name and peer.built:
            _ip_batch(peer.netns, _host_gw(node), f"host-gw route to {node.key} on {peer.key}")


#: IPv6 in lab namespaces: on, and no duplicate address detection (a DAD-tentative address is
#: unusable for a second or more; every lab address is unique by construction).
_IPV6_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "0",
    "net.ipv6.conf.default.disable_ipv6": "0",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}
#: The pods' IPv6 default gateway: a static link-local address on the node side of every pod
#: veth (Calico's fe80::1 idea without proxy NDP: the node simply owns the address, so it answers
#: neighbour solicitations for it, and a link-local address may repeat on every veth).
POD_GATEWAY6 = "fe80::1"


def _prefixlen(cidr: str) -> str:
    return cidr.split("/")[1]


def _host_gw(node: NodeRecord) -> list[str]:
    """The cluster CNI's host-gw routes to ``node``'s pod CIDRs, one per family (for its peers)."""
    out = []
    if node.pod_cidr:
        out.append(f"route replace {node.pod_cidr} via {node.underlay_ip} dev eth0")
    if node.pod_cidr6 and node.underlay_ip6:
        out.append(f"route replace {node.pod_cidr6} via {node.underlay_ip6} dev eth0")
    return out


def _link_exists(netns: str, ifname: str) -> bool:
    res = subprocess.run(["ip", "-n", netns, "link", "show", "dev", ifname], capture_output=True, check=False)
    return res.returncode == 0


def add_pod(node: NodeRecord, pod: PodRecord) -> None:
    """Give ``pod`` its namespace on ``node``, Calico style; idempotent.

    The one way the lab makes a pod: its static pods (``_build_node``) and the pods the lab
    kubelet runs for the emulated API server (``tools/kubelet_lab.py``, through
    :func:`add_pods`) both come here. Order: the pod namespace, a veth whose ends the kernel
    creates straight in the node namespace (up) and in the pod (as ``eth0``; no end ever exists in
    the root namespace), the node's /32 route and proxy ARP on its end, then the pod's address
    and its default route via the link-local gateway. Calling it again for a pod that exists
    re-applies addresses and routes (the pod keeps only ``pod.ip`` and ``pod.ip6``); a pod
    namespace without its node-side veth is rebuilt. Three ``ip`` runs for a new pod (the root
    namespace, the node's, the pod's) and one thread for the node's sysctls.
    """
    _add_pods(node, [pod])


def add_pods(node: NodeRecord, pods: Sequence[PodRecord]) -> dict[str, LabError]:
    """:func:`add_pod` for several pods of ``node`` at once, with the same commands and the same
    result, the runs shared: one ``ip`` run in the root namespace for every new pod's namespace
    and veth, one in the node's for every route, one thread for every sysctl, then one run in
    each pod (a pod's addresses can only be set from inside it; :data:`POD_RUNS_AT_ONCE` of them
    side by side). What the lab kubelet calls for
    the pods that are waiting for their network when it gets to them.

    Returns the pods that failed, by name: when a shared run fails, every pod of the call is
    made again on its own with :func:`add_pod` (idempotent), so one bad pod fails alone."""
    try:
        _add_pods(node, pods)
        return {}
    except LabError as e:
        if len(pods) == 1:
            return {pods[0].name: e}
    failed: dict[str, LabError] = {}
    for pod in pods:
        try:
            add_pod(node, pod)
        except LabError as e:
            failed[pod.name] = e
    return failed


def _add_pods(node: NodeRecord, pods: Sequence[PodRecord]) -> None:
    """The steps of :func:`add_pod` for ``pods``, each step's ``ip`` commands in one run."""
    if not namespaces.exists(node.netns):
        raise LabError(f"pod {node.key}/{pods[0].name}: node namespace {node.netns} does not exist")
    what = (f"namespace and veth of pod {node.key}/{pods[0].name}" if len(pods) == 1
            else f"namespaces and veths of {len(pods)} pods on {node.key}")
    new = [pod for pod in pods if not (namespaces.exists(pod.netns) and _link_exists(node.netns, pod.host_if))]
    delete_netns([pod.netns for pod in new])
    try:
        _add_namespaces_and_veths(node, new, what)
    except LabError:
        # The node's end of an older veth of the same name left behind (its namespace deleted
        # without :func:`remove_pod`, whose devices the kernel destroys later): delete it, and
        # whatever the failed run made, and make them again once.
        for pod in new:
            _delete_link(node.netns, pod.host_if)
        delete_netns([pod.netns for pod in new])
        _add_namespaces_and_veths(node, new, what)
    node_cmds = [cmd for pod in pods for cmd in _node_side(pod)]
    _ip_batch(node.netns, node_cmds, f"route to pod {node.key}/{pods[0].name}" if len(pods) == 1
              else f"routes to {len(pods)} pods on {node.key}")
    # proxy_delay 0: by default the kernel delays proxy-ARP answers by up to 0.8 s at
    # random, which turns a pod's first packet into a timeout (Calico sets it to 0 too).
    sysctls = {key: value for pod in pods if pod.ip
               for key, value in ((f"net.ipv4.conf.{pod.host_if}.proxy_arp", "1"),
                                  (f"net.ipv4.neigh.{pod.host_if}.proxy_delay", "0"))}
    if sysctls:
        _write_sysctls(node.netns, sysctls)
    if len(pods) == 1:
        _ip_batch(pods[0].netns, _pod_side(pods[0]), f"pod {node.key}/{pods[0].name}")
        return
    # One run inside each pod, a few side by side: a run waits on the kernel about as long as it
    # computes, so one after another would leave the cores idle half the time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(pods), POD_RUNS_AT_ONCE)) as pool:
        runs = [pool.submit(_ip_batch, pod.netns, _pod_side(pod), f"pod {node.key}/{pod.name}") for pod in pods]
    for run in runs:
        run.result()  # the first failure fails the call (add_pods then makes each pod on its own)


#: How many pods' own ``ip`` runs :func:`add_pods` has going at once.
POD_RUNS_AT_ONCE = 4


def _add_namespaces_and_veths(node: NodeRecord, new: Sequence[PodRecord], what: str) -> None:
    """The namespaces of the ``new`` pods and their veths.

    The veth is created from here with each end placed by the kernel straight into its
    namespace (``netns NODE`` ... ``peer ... netns POD``): neither end exists in the root
    namespace, and with the namespace it is one ``ip`` run instead of two. An IPv6 pod sets its
    sysctls in between: links take the namespace's defaults when created."""
    if any(pod.ip6 for pod in new):
        _ip_batch(None, [f"netns add {pod.netns}" for pod in new], what)
        for pod in new:
            if pod.ip6:
                _write_sysctls(pod.netns, _IPV6_SYSCTLS)
        _ip_batch(None, [_veth(node, pod) for pod in new], what)
    else:
        _ip_batch(None, [cmd for pod in new for cmd in (f"netns add {pod.netns}", _veth(node, pod))], what)


def _veth(node: NodeRecord, pod: PodRecord) -> str:
    return f"link add {pod.host_if} netns {node.netns} up type veth peer name eth0 netns {pod.netns}"


def _node_side(pod: PodRecord) -> list[str]:
    """The node's end of the pod's veth: up, the /32 (/128) route through it, the IPv6 gateway."""
    cmds = [f"link set {pod.host_if} up"]
    if pod.ip:
        cmds.append(f"route replace {pod.ip}/32 dev {pod.host_if}")
    if pod.ip6:
        cmds += [
            f"addr replace {POD_GATEWAY6}/64 dev {pod.host_if} nodad",
            f"route replace {pod.ip6}/128 dev {pod.host_if}",
        ]
    return cmds


def _pod_side(pod: PodRecord) -> list[str]:
    """Inside the pod: its addresses (only these) and its default routes via the gateways."""
    cmds = ["link set lo up", "addr flush dev eth0 scope global"]
    if pod.ip:
        cmds.append(f"addr add {pod.ip}/32 dev eth0")
    if pod.ip6:
        cmds.append(f"addr add {pod.ip6}/128 dev eth0 nodad")
    cmds.append("link set eth0 up")
    if pod.ip:
        cmds += [
            f"route replace {POD_GATEWAY} dev eth0 scope link",
            f"route replace default via {POD_GATEWAY} dev eth0",
        ]
    if pod.ip6:
        cmds.append(f"route replace ::/0 via {POD_GATEWAY6} dev eth0")
    return cmds


def remove_pod(node: NodeRecord, pod: PodRecord) -> bool:
    """Delete ``pod``'s veth, then its namespace (the node's /32 route through the veth goes with
    it); idempotent, returns whether there was anything to delete.

    The veth first, as a CNI's DEL does: the kernel destroys a deleted namespace's devices later,
    from a work queue, so the node's end would outlive the call for a moment, and a pod made again
    under the same name at once (a replacement of the same name, the tree repairing a leaf copy)
    would fail to create its veth with "File exists". Deleting one end of a veth deletes both, now."""
    had_link = _delete_link(node.netns, pod.host_if)
    return bool(delete_netns([pod.netns])) or had_link


def _delete_link(netns: str, ifname: str) -> bool:
    """``ip -n NETNS link del IFNAME``; False when there was no such link (or no namespace)."""
    if not namespaces.exists(netns):
        return False
    res = subprocess.run(["ip", "-n", netns, "link", "del", ifname], capture_output=True, text=True, check=False)
    return res.returncode == 0


#: Kubelet pod namespaces: ``<node netns>-k<10 hex>`` (static pods are ``-p<N>``).
_KUBE_POD_SUFFIX = re.compile(r"-k[0-9a-f]{10}$")


def kube_pod(node: NodeRecord, pod_key: str, ips: Sequence[str]) -> PodRecord:
    """The record of a pod the lab kubelet runs for Kubernetes pod ``pod_key`` (namespace/name)
    with addresses ``ips`` (``status.podIPs``: at most one per family, any order), which
    :func:`add_pod` configures as it does a dual-stack static pod's ``ip`` and ``ip6``.

    Names derive from a hash of the key (Kubernetes names are too long for interface names),
    so the kubelet needs no state of its own to find the namespace again for ``remove_pod``.
    """
    by_family: dict[int, str] = {}
    for ip in ips:
        fam = 6 if ":" in ip else 4
        if fam in by_family:
            raise LabError(f"pod {node.key}/{pod_key}: two IPv{fam} addresses {by_family[fam]} and {ip} "
                           "(a pod has one per family)")
        by_family[fam] = ip
    h = hashlib.sha256(pod_key.encode()).hexdigest()[:10]
    return PodRecord(name=pod_key, netns=f"{node.netns}-k{h}", ip=by_family.get(4, ""), ip6=by_family.get(6, ""),
                     host_if=f"vk{h}")


def kube_pod_namespaces(cluster: ClusterRecord) -> list[str]:
    """Namespaces of kubelet pods that exist on the nodes of ``cluster``."""
    prefixes = tuple(f"{n.netns}-k" for n in cluster.nodes)
    return [ns for ns in namespaces.list_all() if ns.startswith(prefixes) and _KUBE_POD_SUFFIX.search(ns)]


def service_ruleset(service_ip: str, backend: str) -> str:
    """The kube-proxy stand-in of one node of a lab without Kubernetes (a ``kubernetes: true``
    lab has no ``service_backend``: kubeemu.proxy programs its real Services): DNAT the lab
    service to its backend pod (for forwarded and locally generated traffic) and masquerade
    what was translated, as kube-proxy does for clients outside the cluster, so replies come
    back through this node."""
    # IPv6 services get their own table (family ip6, nftables' name for it; ``kflab6``).
    fam, table = ("ip6", f"{NFT_TABLE}6") if ":" in service_ip else ("ip", NFT_TABLE)
    dnat = f"{fam} daddr {service_ip} dnat to {backend};"
    return (
        f"table {fam} {table} {{\n"
        f"  chain prerouting {{ type nat hook prerouting priority dstnat; {dnat} }}\n"
        f"  chain output {{ type nat hook output priority -100; {dnat} }}\n"
        f"  chain postrouting {{ type nat hook postrouting priority srcnat; "
        f"ct status dnat ct original {fam} daddr {service_ip} masquerade; }}\n"
        f"}}\n"
    )


def _install_service(cluster: ClusterRecord, node: NodeRecord) -> None:
    services = ((cluster.service_ip, cluster.service_backend), (cluster.service_ip6, cluster.service_backend6))
    rules = "".join(service_ruleset(ip, b) for ip, b in services if ip is not None and b is not None)
    if not rules:
        return
    res = subprocess.run(
        ["ip", "netns", "exec", node.netns, "nft", "-f", "-"], input=rules, capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise LabError(
            f"lab service of cluster {cluster.name} on node {node.key}: nft failed: {res.stderr.strip()} "
            "(is the nftables package installed?)"
        )


def set_failed(name: str, spec: str, failed: bool, progress: Progress = stderr_progress) -> NodeRecord:
    """``lab fail`` / ``lab heal``: set the node's underlay veth end in the lab namespace down or
    up. The node loses (regains) every other node and the reflector at once; nothing inside the
    node changes, as when a machine drops off the network."""
    require_root()
    with locked(name):
        state = require_state(name)
        node = find_node(state, spec)
        _ip_batch(state.ul_netns, [f"link set {node.ul_if} {'down' if failed else 'up'}"],
                  f"{'cut' if failed else 'reconnect'} node {node.key}")  # fmt: skip
        node.failed = failed
        save_state(state)
        progress(f"lab {name}: node {node.key} {'cut off the underlay' if failed else 'back on the underlay'}")
        return node


def delete_netns(names: Sequence[str]) -> list[str]:
    """Delete the named namespaces that exist; returns those deleted (veths die with them)."""
    gone = []
    for ns in names:
        if namespaces.exists(ns):
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise LabError(f"ip netns del {ns} failed: {res.stderr.strip()}")
            gone.append(ns)
    return gone


def build(state: LabState, progress: Progress = quiet) -> LabState:
    """Create every namespace and link of ``state`` that is not built yet (recording progress).

    A node recorded as not built (a crash mid-way) is wiped and rebuilt from scratch.
    """
    if not state.ul_built or not namespaces.exists(state.ul_netns):
        delete_netns([state.ul_netns])
        progress(f"lab {state.name}: creating the lab namespace {state.ul_netns} (underlay {state.underlay})")
        _build_underlay(state)
        state.ul_built = True
        save_state(state)
    for cluster in state.clusters:
        for node in cluster.nodes:
            if node.built and namespaces.exists(node.netns):
                continue
            delete_netns([*(p.netns for p in node.pods), node.netns])
            progress(f"lab {state.name}: building node {node.key} ({node.underlay_ip}, {len(node.pods)} pods)")
            _build_node(state, cluster, node)
            node.built = True
            save_state(state)
    return state
