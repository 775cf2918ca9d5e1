"""fabric-agent configuration: one typed, declarative table.

Every parameter has a default, a unit in its name, and the reason for its default in its
``help``. Sources, highest precedence first: command-line flag, environment variable
(``FABRIC_<FLAG>``, e.g. ``FABRIC_RESYNC_PERIOD`` for ``--resync-period``), default. A bad value is refused with the
parameter, the value and the source it came from, before anything is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fabric import cli_types, logs, nodeinfo, types
from fabric.agent import multipath as multipath_mod
from fabric.netlink import objects


class ConfigError(ValueError):
    """A configuration value is invalid; the message names parameter, value and source."""


@dataclasses.dataclass(frozen=True, slots=True)
class AgentConfig:
    reflector: str
    cluster: str
    node: str
    underlay_ip: str
    pod_cidrs: tuple[str, ...]
    resync_period_s: float = 30.0
    table: int = objects.DEFAULT_TABLE
    rule_priority: int = objects.DEFAULT_RULE_PRIORITY
    keepalive_interval_s: float = 2.0
    probe_interval_s: float = 0.1
    probe_multiplier: int = 3
    metrics_listen: str = ""
    log_level: str = "info"
    #: bpffs directory holding the translator's pinned maps (one subdirectory per node).
    bpf_pin_root: str = "/sys/fs/bpf/kosmos-fabric"
    cleanup: bool = False
    #: Dual stack: the node's IPv6 underlay address when ``underlay_ip`` is IPv4 (vx-bridge-6 and
    #: vx-local-6 ride on it); "" for a single-stack node.
    underlay_ip6: str = ""
    #: Take the underlay addresses and pod CIDRs from this node's Node object (a DaemonSet).
    in_cluster: bool = False
    #: With ``in_cluster``: a kubeconfig instead of the pod's service account (tests, debugging).
    kubeconfig: str = ""
    #: With ``in_cluster`` and no ``underlay_ip``: how to find the underlay (the Cluster's
    #: ``autodetectionMethod``), used when this node's interface is ``*``.
    autodetection_method: str = nodeinfo.DEFAULT_METHOD
    #: The Cluster's ``defaultNICName``: an interface name, or ``*`` for the method.
    underlay_interface: str = nodeinfo.AUTO_NIC
    #: The Cluster's ``nicNodeNames`` as ``(node, interface)`` pairs; this node's entry wins
    #: over ``underlay_interface``.
    nic_overrides: tuple[tuple[str, str], ...] = ()
    #: Mutual TLS to the reflector: a directory with tls.crt, tls.key, ca.crt (fabric.control.tls).
    tls_dir: str = ""
    #: A TLS directory with this cluster's bootstrap certificate (``join``'s credential): with no
    #: usable certificate in ``tls_dir`` the agent gets its own with it (fabric.control.bootstrap).
    bootstrap_dir: str = ""
    #: Where IssueCertificate goes (the bootstrap exchange and renewals); "" = ``reflector``. Set
    #: when ``reflector`` is a fabric-relay, which carries SyncNode only (fabric.control.relay).
    issuer: str = ""
    #: Plaintext to the reflector instead (explicit; ``main`` refuses to start with neither).
    insecure: bool = False
    #: ``net.ipv4.fib_multipath_hash_seed`` while the plan has active/active routes: ``auto``
    #: (derived from the fabric CA, the same on every agent), ``off``, or a number (fabric.agent.multipath).
    multipath_hash_seed: str = "auto"


@dataclasses.dataclass(frozen=True)
class _Param:
    name: str  # dataclass field name
    flag: str
    help: str
    parse: Callable[[str], Any]
    required: bool = False
    repeat: bool = False


def _multiplier(text: str) -> int:
    v = int(text, 10)
    if not 1 <= v <= 50:
        raise ValueError("must be an integer from 1 to 50")
    return v


def _table_id(text: str) -> int:
    if text.strip() == "main":
        return objects.RT_TABLE_MAIN
    v = int(text, 0)
    if not 1 <= v <= 0xFFFFFFFF or v in (253, 255):
        raise ValueError("must be 'main' (254) or a routing table id from 1 to 2^32-1 other than 253 and 255 "
                         "(default, local)")
    return v


def _priority(text: str) -> int:
    v = int(text, 0)
    if not 1 <= v < 32766:
        raise ValueError("must be from 1 to 32765 (the main table's rule sits at 32766)")
    return v


def _ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


def _cidr(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=True))


def _name(text: str) -> str:
    if not text or len(text) > 63 or not all(c.isalnum() or c == "-" for c in text) or text != text.lower():
        raise ValueError("must be a DNS-1123 label (lower-case letters, digits and '-')")
    return text


def _listen(text: str) -> str:
    return "" if text in ("", "off") else cli_types.grpc_target(text)


def _abs_path(text: str) -> str:
    if not text.startswith("/") or "\0" in text:
        raise ValueError("must be an absolute path")
    return os.path.normpath(text)


def _dir(text: str) -> str:
    if not text or "\0" in text:
        raise ValueError("must be a directory path")
    return text


def _level(text: str) -> str:
    return logs.parse_level(text)


def _underlay_interface(text: str) -> str:
    return nodeinfo.check_ifname(text, auto_ok=True)


PARAMS: tuple[_Param, ...] = (
    _Param("reflector", "--reflector", "gRPC target of fabric-reflector, HOST:PORT or unix:/path",
           cli_types.grpc_target, required=True),
    _Param("cluster", "--cluster", "name of this node's cluster", _name, required=True),
    _Param("node", "--node", "name of this node (unique inside its cluster)", _name, required=True),
    _Param("underlay_ip", "--underlay-ip", "this node's underlay address; tunnels bind to the interface holding it",
           _ip, required=True),
    _Param("underlay_ip6", "--underlay-ip6", "this node's IPv6 underlay address on a dual-stack node whose "
           "--underlay-ip is IPv4 (the IPv6 tunnels vx-bridge-6/vx-local-6 ride on it)", _ip),
    _Param("pod_cidrs", "--pod-cidr", "pod CIDR of this node, one per address family (repeatable; env: "
           "comma-separated)", _cidr,
           required=True, repeat=True),
    _Param("resync_period_s", "--resync-period", "seconds between full resyncs that repair drift (jittered +20%%); "
           "30 s repairs hand-made damage quickly while one dump per period costs little", cli_types.positive_float),
    _Param("table", "--table", "routing table for fabric routes: 'main' (254, the default: no ip rule, the "
           "fastest) or a table of their own selected by an ip rule (Kosmos used 200; any extra rule costs every "
           "forwarded packet a few per cent, see BENCHMARKS.md, datapath)", _table_id),
    _Param("rule_priority", "--rule-priority", "priority of the ip rule selecting --table when it is not main; "
           "below main's (32766)", _priority),
    _Param("keepalive_interval_s", "--keepalive-interval", "the keepalive interval this agent proposes; the "
           "reflector clamps it to its range and the session runs at the smaller of it and the reflector's (as "
           "BGP's hold time); a reflector silent for 3 intervals is considered lost", cli_types.positive_float),
    _Param("probe_interval_s", "--probe-interval", "seconds between liveness probes (ICMP echo through the tunnel) "
           "to the gateways this node depends on; with --probe-multiplier it sets how fast a dead gateway is "
           "reported (0.1 s x 3 = 0.3 s, a few packets per second per gateway)", cli_types.positive_float),
    _Param("probe_multiplier", "--probe-multiplier", "unanswered probe intervals after which a peer is reported "
           "unreachable (BFD's detect multiplier)", _multiplier),
    _Param("metrics_listen", "--metrics-listen", "HOST:PORT serving /metrics, /healthz, /readyz ('off' disables)",
           _listen),
    _Param("log_level", "--log-level", "debug, info, warning or error", _level),
    _Param("bpf_pin_root", "--bpf-pin-root", "directory on a bpf filesystem for the global-IP translator's pinned "
           "maps (kept across restarts so counters and mappings survive); used only when the cluster has "
           "globalCIDRs", _abs_path),
    _Param("autodetection_method", "--autodetection-method", "with --in-cluster and no --underlay-ip: how to "
           "find the underlay address when the node's interface is '*': kubernetes-internal-ip (the Node's "
           "InternalIP), first-found, can-reach=IP or interface=REGEX (the Cluster's autodetectionMethod)",
           nodeinfo.check_method),
    _Param("underlay_interface", "--underlay-interface", "with --in-cluster and no --underlay-ip: the underlay "
           "interface, or '*' to use --autodetection-method (the Cluster's defaultNICName)", _underlay_interface),
    _Param("nic_overrides", "--nic-override", "with --in-cluster: NODE=IFNAME, the underlay interface of one node, "
           "winning over --underlay-interface (repeatable; env: comma-separated; the Cluster's nicNodeNames)",
           nodeinfo.parse_nic_override, repeat=True),
    _Param("tls_dir", "--tls-dir", "mutual TLS to the reflector: DIR holds tls.crt (this node's client certificate, "
           "identity node/<cluster>/<node>), tls.key and ca.crt (the fabric CA); required unless --insecure. With "
           "--bootstrap-dir the agent writes it itself and renews it before it expires", _dir),
    _Param("bootstrap_dir", "--bootstrap-dir", "a TLS directory holding this cluster's bootstrap certificate "
           "(bootstrap/<cluster>, from 'fabric-tool join'): when --tls-dir holds no usable certificate of this node, "
           "the agent makes a key and asks the reflector for one with it", _dir),
    _Param("issuer", "--issuer", "gRPC target of fabric-reflector for IssueCertificate (this node's first "
           "certificate and its renewals), HOST:PORT or unix:/path, when --reflector is a fabric-relay (relays "
           "carry SyncNode only); default: --reflector", cli_types.grpc_target),
    _Param("multipath_hash_seed", "--multipath-hash-seed", "the kernel's multipath hash seed "
           "(net.ipv4.fib_multipath_hash_seed, Linux >= 6.11, IPv4 and IPv6) in this node's namespace while it "
           "routes over several active gateways: 'auto' derives it from the fabric CA so every node hashes alike "
           "(a flow's replies then cross the gateway of its requests, and a gateway's loss cuts only its own "
           "flows); a number from 1 to 4294967295 sets it (the same on every node); 'off' leaves the kernel's",
           multipath_mod.parse_setting),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fabric-agent",
        description="Per-node Kosmos Fabric agent: programs vxlan tunnels, routes, FDB and neighbours "
        "from the state the reflector plans for this node.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  fabric-agent --reflector 198.18.0.1:4880 --cluster east --node e1 \\\n"
        "      --underlay-ip 198.18.0.11 --pod-cidr 10.10.1.0/24\n"
        "  FABRIC_REFLECTOR=10.0.0.5:4880 FABRIC_CLUSTER=east FABRIC_NODE=e1 \\\n"
        "      FABRIC_UNDERLAY_IP=192.168.1.11 FABRIC_POD_CIDR=10.10.1.0/24 fabric-agent\n"
        "  fabric-agent --cleanup --cluster east --node e1   # remove every kernel object the fabric owns\n"
        "      (with --cluster/--node also the node's translator pins), then exit\n\n"
        "Every flag can also be set as FABRIC_<FLAG> in the environment (flags win).",
    )
    for prm in PARAMS:
        default = _default(prm.name)
        extra = f" (default: {default})" if default not in (None, "", ()) else ""
        p.add_argument(prm.flag, dest=prm.name, action="append" if prm.repeat else "store",
                       help=prm.help + extra, metavar=prm.flag.lstrip("-").upper().replace("-", "_"))
    p.add_argument("--in-cluster", action="store_true",
                   help="read --underlay-ip, --underlay-ip6 and --pod-cidr from this node's Node object "
                        "(InternalIP addresses, spec.podCIDRs) when not given; for the DaemonSet")
    p.add_argument("--kubeconfig", default="", metavar="FILE",
                   help="with --in-cluster: use FILE instead of the pod's service account")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, unauthenticated session to the reflector instead of --tls-dir (tests); "
                   "logs a warning (env: FABRIC_INSECURE=true)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove every link, route, nexthop, rule, neighbour and FDB entry the fabric owns, and the "
                   "translator's tc filters (and, given --cluster and --node, its pinned maps), then exit")
    return p


def _default(field: str) -> Any:
    for f in dataclasses.fields(AgentConfig):
        if f.name == field:
            return None if f.default is dataclasses.MISSING else f.default
    raise KeyError(field)


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Build the configuration from flags, then environment, then defaults."""
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    cleanup = bool(ns.cleanup)
    in_cluster = bool(ns.in_cluster)
    from_node = {"underlay_ip", "pod_cidrs"} if in_cluster else set()
    for prm in PARAMS:
        raw = getattr(ns, prm.name)
        source = f"flag {prm.flag}"
        env_name = "FABRIC_" + prm.flag.lstrip("-").upper().replace("-", "_")
        if raw is None and env_name in env:
            raw = [s.strip() for s in env[env_name].split(",") if s.strip()] if prm.repeat else env[env_name]
            source = f"environment variable {env_name}"
        if raw is None:
            if prm.required and not cleanup and prm.name not in from_node:
                raise ConfigError(f"{prm.flag} is required ({prm.help}); set the flag or {env_name}")
            continue
        try:
            values[prm.name] = tuple(prm.parse(r) for r in raw) if prm.repeat else prm.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{prm.flag}: invalid value {raw!r} from {source}: {e}") from None
    if cleanup:
        values.setdefault("reflector", "")
        values.setdefault("cluster", "")
        values.setdefault("node", "")
        values.setdefault("underlay_ip", "")
        values.setdefault("pod_cidrs", ())
    if in_cluster:
        values.setdefault("underlay_ip", "")
        values.setdefault("pod_cidrs", ())
    if ns.kubeconfig and not in_cluster:
        raise ConfigError(f"--kubeconfig {ns.kubeconfig}: only meaningful with --in-cluster")
    _check_underlay_choice(values, in_cluster or cleanup)
    values["cleanup"] = cleanup
    values["in_cluster"] = in_cluster
    values["kubeconfig"] = ns.kubeconfig
    values["insecure"] = bool(ns.insecure)
    if not ns.insecure and "FABRIC_INSECURE" in env:
        try:
            values["insecure"] = cli_types.boolean(env["FABRIC_INSECURE"])
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"--insecure: invalid value {env['FABRIC_INSECURE']!r} from environment variable "
                              f"FABRIC_INSECURE: {e}") from None
    cfg = AgentConfig(**values)
    if cfg.underlay_ip6:
        if ipaddress.ip_address(cfg.underlay_ip6).version != 6:
            raise ConfigError(f"--underlay-ip6: {cfg.underlay_ip6} is not an IPv6 address")
        if cfg.underlay_ip and ipaddress.ip_address(cfg.underlay_ip).version == 6:
            raise ConfigError(
                f"--underlay-ip6 {cfg.underlay_ip6}: --underlay-ip {cfg.underlay_ip} is IPv6 already (give "
                "--underlay-ip6 only with an IPv4 --underlay-ip)"
            )
    return cfg


def _check_underlay_choice(values: dict[str, Any], in_cluster: bool) -> None:
    """The autodetection flags choose among the node's addresses only in a cluster; a node given
    twice in --nic-override is a mistake, not a precedence rule."""
    seen: dict[str, str] = {}
    for node, nic in values.get("nic_overrides", ()):
        if node in seen:
            raise ConfigError(f"--nic-override: node {node} given twice ({node}={seen[node]} and {node}={nic})")
        seen[node] = nic
    if in_cluster:
        return
    given = [(flag, v) for flag, key, default in (
        ("--autodetection-method", "autodetection_method", nodeinfo.DEFAULT_METHOD),
        ("--underlay-interface", "underlay_interface", nodeinfo.AUTO_NIC),
        ("--nic-override", "nic_overrides", ()),
    ) if (v := values.get(key, default)) != default]  # fmt: skip
    if given:
        flag, v = given[0]
        raise ConfigError(f"{flag} {v!r}: only meaningful with --in-cluster (without it --underlay-ip is given)")


def with_node_facts(cfg: AgentConfig, facts: nodeinfo.NodeFacts) -> AgentConfig:
    """``cfg`` completed from the Node object: flags given explicitly win."""
    return dataclasses.replace(
        cfg,
        underlay_ip=cfg.underlay_ip or facts.underlay_ip,
        underlay_ip6=cfg.underlay_ip6 or ("" if cfg.underlay_ip else facts.underlay_ip6),
        pod_cidrs=cfg.pod_cidrs or facts.pod_cidrs,
    )


def announcement(cfg: AgentConfig, underlay_mtu: int) -> types.NodeAnnouncement:
    return types.NodeAnnouncement(
        cluster=cfg.cluster,
        name=cfg.node,
        underlay_ip=cfg.underlay_ip,
        pod_cidrs=tuple(types.canonical_cidr(c) for c in cfg.pod_cidrs),
        underlay_mtu=underlay_mtu,
        capabilities=("p2p", "gateway", "ipv4", "ipv6"),
        extra_underlay_ips=(cfg.underlay_ip6,) if cfg.underlay_ip6 else (),
    )
