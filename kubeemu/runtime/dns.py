"""A pod's resolv.conf, as upstream's kubelet forms it (``pkg/kubelet/network/dns/dns.go``) and
its container runtime writes it.

:func:`pod_dns` is ``Configurer.GetPodDNS``: the pod's ``dnsPolicy`` picks a base,

* ``ClusterFirst`` (the default; for a ``hostNetwork`` pod it means ``Default``) and
  ``ClusterFirstWithHostNet``: the kubelet's ``--cluster-dns`` servers as the only nameservers,
  the search path ``<ns>.svc.<domain> svc.<domain> <domain>`` followed by the node's own search
  domains (duplicates dropped), and ``options ndots:5``; a kubelet without ``--cluster-dns``
  falls back to ``Default`` and says so in a ``MissingClusterDNS`` warning;
* ``Default``: the node's resolv.conf (``--resolv-conf``; an empty one means "no host DNS": a
  loopback nameserver per node family and the search path ``.``);
* ``None``: nothing,

then ``spec.dnsConfig`` is merged in (its nameservers and searches appended, duplicates
dropped; its options override options of the same name), and the result is cut to the limits
of ``pkg/apis/core/validation`` (``MaxDNSNameservers`` 3, ``MaxDNSSearchPaths`` 32,
``MaxDNSSearchListChars`` 2048, and no search domain over 253 characters: glibc aborts on
longer ones), each cut reported as upstream's ``DNSConfigForming`` warning.

:func:`render` is the file containerd writes from that (``search``, ``nameserver`` lines,
``options``); the runtime binds it over ``/etc/resolv.conf`` in every container of the pod.
Pure functions: no I/O but :func:`read_host_resolv_conf`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

#: ``validation.MaxDNSNameservers``: glibc reads at most three ``nameserver`` lines.
MAX_NAMESERVERS = 3
#: ``validation.MaxDNSSearchPaths`` (32 since ExpandedDNSConfig went GA in 1.28; 6 before).
MAX_SEARCH_PATHS = 32
#: ``validation.MaxDNSSearchListChars`` (2048 since 1.28; 256 before).
MAX_SEARCH_LIST_CHARS = 2048
#: ``DNS1123SubdomainMaxLength``: longer search domains are dropped (glibc 2.28 aborts on them).
MAX_SEARCH_DOMAIN_CHARS = 253
#: ``defaultDNSOptions`` of ClusterFirst pods.
DEFAULT_OPTIONS = ("ndots:5",)

POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")


@dataclass(frozen=True)
class ClusterDNS:
    """The kubelet's DNS settings: ``clusterDNS`` (``--cluster-dns``), ``clusterDomain``
    (``--cluster-domain``) and the node's resolver configuration (``--resolv-conf``, already
    read: its nameservers, searches and options; ``resolv_conf_set`` False when the flag is the
    empty string, upstream's "no host DNS")."""

    servers: tuple[str, ...] = ()
    domain: str = ""
    host_servers: tuple[str, ...] = ()
    host_searches: tuple[str, ...] = ()
    host_options: tuple[str, ...] = ()
    resolv_conf_set: bool = True
    node_ips: tuple[str, ...] = ()


@dataclass
class DNSConfig:
    """What the runtime gets (CRI ``DNSConfig``) plus the warnings the kubelet records on the pod."""

    servers: list[str] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    #: ``(reason, message)`` of each Warning event upstream records about this pod.
    warnings: list[tuple[str, str]] = field(default_factory=list)


def parse_resolv_conf(text: str) -> tuple[list[str], list[str], list[str]]:
    """Upstream ``parseResolvConf``: nameservers, searches (the last ``search`` line wins; each
    domain without its trailing dot, ``.`` dropped) and options (a later option of the same name
    replaces an earlier one)."""
    servers: list[str] = []
    searches: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0]
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "nameserver" and len(fields) > 1:
            servers.append(fields[1])
        elif fields[0] == "search":
            searches = [s.removesuffix(".") for s in fields[1:] if s != "."]
        elif fields[0] == "options":
            options = _merge_options(options, [(o.split(":", 1)[0], o.split(":", 1)[1] if ":" in o else None)
                                               for o in fields[1:]])
    return servers, searches, options


def read_host_resolv_conf(path: str, domain: str = "", servers: Sequence[str] = (),
                          node_ips: Sequence[str] = ()) -> ClusterDNS:
    """A :class:`ClusterDNS` with the node's resolver configuration read from ``path`` (the
    kubelet's ``--resolv-conf``; "" means none). An unreadable file is an error naming it, as
    upstream's kubelet fails the pod's sandbox then."""
    if not path:
        return ClusterDNS(tuple(servers), domain, resolv_conf_set=False, node_ips=tuple(node_ips))
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--resolv-conf {path}: {e.strerror or e}") from e
    hs, hsearch, hopts = parse_resolv_conf(text)
    return ClusterDNS(tuple(servers), domain, tuple(hs), tuple(hsearch), tuple(hopts), True, tuple(node_ips))


def check_cluster_dns(servers: Iterable[str], domain: str) -> tuple[tuple[str, ...], str]:
    """``--cluster-dns`` (IP addresses) and ``--cluster-domain`` (a DNS name) checked as the
    kubelet's configuration validation does; a ValueError names the bad value."""
    out = []
    for s in servers:
        s = s.strip()
        if not s:
            continue
        try:
            out.append(str(ipaddress.ip_address(s)))
        except ValueError:
            raise ValueError(f"--cluster-dns {s!r}: not an IP address") from None
    domain = domain.strip().removesuffix(".")
    if domain and not all(0 < len(lab) <= 63 and lab.replace("-", "a").isalnum() for lab in domain.split(".")):
        raise ValueError(f"--cluster-domain {domain!r}: not a DNS domain name")
    return tuple(out), domain


def _dedup(items: Iterable[str]) -> list[str]:
    """Upstream ``omitDuplicates``: first occurrence kept, order kept."""
    return list(dict.fromkeys(items))


def _merge_options(existing: Iterable[str], extra: Iterable[tuple[str, str | None]]) -> list[str]:
    """Upstream ``mergeDNSOptions``: by name, a later value replacing an earlier one. Upstream
    goes through a Go map (random order); the first position of each name is kept here, so the
    file is stable across syncs."""
    opts: dict[str, str] = {}
    for op in existing:
        name, _, value = op.partition(":")
        opts[name] = value
    for oname, ovalue in extra:
        opts[oname] = ovalue or ""
    return [f"{k}:{v}" if v else k for k, v in opts.items()]


def policy_type(pod: Mapping[str, Any]) -> tuple[str, str | None]:
    """Upstream ``getPodDNSType``: ``"cluster"``, ``"host"`` or ``"none"``, and an error for a
    policy the API server should have refused (the pod then gets ``cluster``)."""
    spec = pod.get("spec") or {}
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    if policy == "None":
        return "none", None
    if policy == "ClusterFirstWithHostNet":
        return "cluster", None
    if policy == "ClusterFirst":
        return ("host" if spec.get("hostNetwork") else "cluster"), None
    if policy == "Default":
        return "host", None
    return "cluster", f"invalid DNSPolicy={policy}"


def pod_dns(pod: Mapping[str, Any], cfg: ClusterDNS) -> DNSConfig:
    """Upstream ``GetPodDNS`` (module docstring)."""
    meta = pod.get("metadata") or {}
    out = DNSConfig(list(cfg.host_servers), list(cfg.host_searches), list(cfg.host_options))
    kind, err = policy_type(pod)
    if err:
        _log.error("pod %s/%s: %s; falling back to the ClusterFirst policy", meta.get("namespace"),
                   meta.get("name"), err)
    if kind == "none":
        out = DNSConfig()
    elif kind == "cluster" and cfg.servers:
        out.servers = list(cfg.servers)
        if cfg.domain:
            d = cfg.domain
            out.searches = _dedup([f"{meta.get('namespace', 'default')}.svc.{d}", f"svc.{d}", d, *out.searches])
        out.options = list(DEFAULT_OPTIONS)
    else:
        if kind == "cluster":
            out.warnings.append(("MissingClusterDNS",
                                 'kubelet does not have ClusterDNS IP configured and cannot create Pod using '
                                 '"ClusterFirst" policy. Falling back to "Default" policy.'))
        if not cfg.resolv_conf_set:
            out.servers = ["::1" if ":" in ip else "127.0.0.1" for ip in cfg.node_ips] or ["127.0.0.1"]
            out.searches = ["."]
    extra = (pod.get("spec") or {}).get("dnsConfig")
    if extra:
        out.servers = _dedup([*out.servers, *(str(s) for s in extra.get("nameservers") or [])])
        out.searches = _dedup([*out.searches, *(str(s) for s in extra.get("searches") or [])])
        out.options = _merge_options(out.options, [(str(o.get("name", "")), None if o.get("value") is None
                                                    else str(o["value"])) for o in extra.get("options") or []])
    _fit_limits(out)
    return out


def _fit_limits(cfg: DNSConfig) -> None:
    """Upstream ``formDNSConfigFitsLimits``: cut nameservers to 3; searches to 32, then without
    domains over 253 characters, then from the end until the line is at most 2048 characters."""
    if len(cfg.servers) > MAX_NAMESERVERS:
        cfg.servers = cfg.servers[:MAX_NAMESERVERS]
        cfg.warnings.append(("DNSConfigForming", "Nameserver limits were exceeded, some nameservers have been "
                             f"omitted, the applied nameserver line is: {' '.join(cfg.servers)}"))
    searches = cfg.searches
    exceeded = False
    if len(searches) > MAX_SEARCH_PATHS:
        searches, exceeded = searches[:MAX_SEARCH_PATHS], True
    kept = [s for s in searches if len(s) <= MAX_SEARCH_DOMAIN_CHARS]
    exceeded |= len(kept) != len(searches)
    searches = kept
    while searches and len(" ".join(searches)) > MAX_SEARCH_LIST_CHARS:
        searches, exceeded = searches[:-1], True
    cfg.searches = searches
    if exceeded:
        cfg.warnings.append(("DNSConfigForming", "Search Line limits were exceeded, some search paths have been "
                             f"omitted, the applied search line is: {' '.join(searches)}"))


def render(cfg: DNSConfig) -> str:
    """The resolv.conf containerd writes for a sandbox from the CRI ``DNSConfig``."""
    lines = []
    if cfg.searches:
        lines.append("search " + " ".join(cfg.searches))
    lines += [f"nameserver {s}" for s in cfg.servers]
    if cfg.options:
        lines.append("options " + " ".join(cfg.options))
    return "".join(line + "\n" for line in lines)
