"""``fabric-tool export|unexport|services``: multi-cluster services by hand (issue 18 item 5).

``export SERVICE -n NS --cluster C`` creates the ServiceExport of Service NS/SERVICE in member C
(``kosmos-mcs`` then imports it into every member), ``unexport`` deletes it, and ``services``
reads every member: what is exported where (with each export's ``Valid`` and ``Conflict``
conditions, as ``kosmos-mcs`` wrote them), what each member imports (the ServiceImport's IPs) and
how many endpoints of each exporting cluster it holds (ready/total, from the EndpointSlices
``kosmos-mcs`` wrote there); a table, or ``-o json``.

Which API server is cluster C's, in this order: ``--server C=URL`` (repeatable; no credentials:
emulators, ``kubectl proxy``), ``--kubeconfig FILE`` (the context named C, else the current one
for a single cluster), else the lab's (``--lab``, default the default lab: cluster C's emulated
API server, as ``fabric-tool pending`` finds it). Every error names the value and where it came
from: a cluster the lab or the flags do not have, a Service that does not exist, the MCS CRDs not
installed in the member (``deploy/base/member``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from mcs import kube as mk
from scheduler.kube import Api, ApiError, connect_kubeconfig, resource_path
from tools import lab

Obj = dict[str, Any]

EPILOG = """examples:
  fabric-tool export web -n shop --cluster east            east's Service shop/web, into every member
  fabric-tool unexport web -n shop --cluster east
  fabric-tool services                                      every member of the default lab
  fabric-tool services -o json | jq '.[] | select(.conflict)'
  fabric-tool services --kubeconfig members.kubeconfig      one context per member, named after it
  fabric-tool export web -n shop --cluster east --server east=http://127.0.0.1:8001
"""


class McsError(lab.LabError):
    """A failed export/unexport/services (exit 1), message naming the value and its source."""


class McsUsageError(lab.LabUsageError):
    """Bad input to export/unexport/services (exit 2)."""


def _server(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not CLUSTER=URL (http:// or https://)")
    return name, url


def _targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", action="append", default=[], type=_server, metavar="CLUSTER=URL",
                   help="cluster CLUSTER's API server at URL, no credentials (repeatable)")
    p.add_argument("--kubeconfig", metavar="FILE", help="a kubeconfig with one context per member, named after it")
    p.add_argument("--lab", default=None, metavar="NAME",
                   help=f"the lab whose clusters to use (default {lab.DEFAULT_NAME}, when neither --server nor "
                        "--kubeconfig is given)")


def add_parsers(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    for verb, what in (("export", "create the ServiceExport of a Service in one member cluster: every member "
                                  "imports it (kosmos-mcs)"),
                       ("unexport", "delete the ServiceExport of a Service in one member cluster")):
        p = sub.add_parser(verb, help=what, description=f"fabric-tool {verb}: {what}.", epilog=EPILOG,
                           formatter_class=formatter)
        p.add_argument("service", metavar="SERVICE", help="the Service's name")
        p.add_argument("-n", "--namespace", default="default", metavar="NS", help="its namespace (default default)")
        p.add_argument("--cluster", required=True, metavar="C", help="the member cluster it lives in")
        _targets(p)
    s = sub.add_parser("services", help="multi-cluster services: exports, imports, endpoint counts, conflicts",
                       description="fabric-tool services: what every member exports (with the Valid and Conflict "
                                   "conditions), imports (the ServiceImport's IPs) and how many endpoints of each "
                                   "exporting cluster it holds (ready/total). Reads only.",
                       epilog=EPILOG, formatter_class=formatter)
    s.add_argument("-n", "--namespace", metavar="NS", help="one namespace (default: all)")
    s.add_argument("--cluster", action="append", default=[], metavar="C",
                   help="read only these members (repeatable; default: every one)")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table (default) or json")
    _targets(s)


@dataclass
class Cluster:
    name: str
    api: Api
    source: str  # where its API server came from, for messages


def clusters(args: argparse.Namespace, wanted: Sequence[str] = ()) -> list[Cluster]:
    """The members named ``wanted`` (all when empty), from the flags or the lab (module docstring)."""
    found: list[Cluster] = []
    if args.lab and (args.server or args.kubeconfig):
        raise McsUsageError(f"--lab {args.lab} and --server/--kubeconfig name the clusters twice: give one of them")
    if args.server or args.kubeconfig:
        for name, url in args.server:
            found.append(Cluster(name, Api(url), f"--server {name}={url}"))
        if args.kubeconfig:
            try:
                with open(args.kubeconfig, encoding="utf-8") as f:
                    doc = yaml.safe_load(f)
            except (OSError, yaml.YAMLError) as e:
                raise McsUsageError(f"--kubeconfig {args.kubeconfig}: {e}") from None
            contexts = [str(c.get("name")) for c in (doc or {}).get("contexts") or [] if isinstance(c, dict)]
            for ctx in contexts:
                if any(c.name == ctx for c in found):
                    continue
                try:
                    found.append(Cluster(ctx, connect_kubeconfig(doc, ctx, user_agent="fabric-tool"),
                                         f"--kubeconfig {args.kubeconfig} context {ctx}"))
                except Exception as e:  # the loader's ConfigException names what is missing
                    raise McsUsageError(f"--kubeconfig {args.kubeconfig} context {ctx}: {e}") from None
        where = "--server/--kubeconfig"
    else:
        name = args.lab or lab.DEFAULT_NAME
        state = lab.require_state(name)
        if not state.kubernetes:
            raise McsError(f"lab {name} runs no Kubernetes API servers (its topology lacks 'kubernetes: true')")
        for c in state.clusters:
            if not c.api_url:
                raise McsError(f"lab {name}: cluster {c.name} has no API server running; run 'fabric-tool lab up'")
            found.append(Cluster(c.name, Api(c.api_url), f"lab {name}"))
        where = f"lab {name}"
    names = [c.name for c in found]
    for w in wanted:
        if w not in names:
            raise McsUsageError(f"--cluster {w!r}: {where} has no such cluster "
                                f"(clusters: {', '.join(names) or 'none'})")
    return [c for c in found if not wanted or c.name in wanted]


def _exports_path(ns: str | None, name: str | None = None) -> str:
    return resource_path(mk.GROUP_VERSION, "serviceexports", ns, name)


def _crd_missing(c: Cluster, e: ApiError, resource: str) -> McsError:
    return McsError(f"cluster {c.name} ({c.source}) does not serve {resource}.multicluster.x-k8s.io ({e.status} "
                    f"{e.reason or 'NotFound'}): the MCS CRDs are not installed there (kubectl apply -k "
                    "deploy/base/member, or 'fabric-tool join')")


def export(args: argparse.Namespace) -> int:
    (c,) = clusters(args, [args.cluster])
    ns, name = args.namespace, args.service
    try:
        svc = c.api.get_or_none(resource_path("v1", "services", ns, name))
    except ApiError as e:
        raise McsError(f"cluster {c.name} ({c.source}): reading Service {ns}/{name}: {e}") from None
    except Exception as e:  # unreachable API server
        raise McsError(f"cluster {c.name} ({c.source}): {type(e).__name__}: {e}") from None
    if svc is None:
        raise McsError(f"cluster {c.name} ({c.source}) has no Service {ns}/{name} (SERVICE, -n {ns})")
    if (svc.get("spec") or {}).get("type") == "ExternalName":
        raise McsError(f"Service {ns}/{name} in cluster {c.name} is of type ExternalName, which cannot be exported")
    body = {"apiVersion": mk.GROUP_VERSION, "kind": "ServiceExport", "metadata": {"namespace": ns, "name": name}}
    try:
        c.api.create(_exports_path(ns), body)
    except ApiError as e:
        if e.status == 409:
            print(f"ServiceExport {ns}/{name} in cluster {c.name} exists already: exported")
            return 0
        if e.status == 404:
            raise _crd_missing(c, e, "serviceexports") from None
        raise McsError(f"cluster {c.name} ({c.source}): creating ServiceExport {ns}/{name}: {e}") from None
    print(f"exported Service {ns}/{name} of cluster {c.name}: kosmos-mcs imports it into every member as "
          f"{name}.{ns}.svc.clusterset.local (Service {mk.derived_name(name)})")
    return 0


def unexport(args: argparse.Namespace) -> int:
    (c,) = clusters(args, [args.cluster])
    ns, name = args.namespace, args.service
    try:
        ex = c.api.get_or_none(_exports_path(ns, name))
        if ex is None:
            # Tell a missing CRD from a missing export.
            c.api.get(_exports_path(ns))
            raise McsError(f"cluster {c.name} ({c.source}) has no ServiceExport {ns}/{name}: not exported there")
        uid = (ex.get("metadata") or {}).get("uid")
        c.api.request("DELETE", _exports_path(ns, name),
                      {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}} if uid else None)
    except ApiError as e:
        if e.status == 404:
            raise _crd_missing(c, e, "serviceexports") from None
        raise McsError(f"cluster {c.name} ({c.source}): ServiceExport {ns}/{name}: {e}") from None
    print(f"unexported Service {ns}/{name} of cluster {c.name}: kosmos-mcs removes its imports")
    if mk.owned(ex):
        print(f"note: that ServiceExport was created by kosmos-mcs (auto-export: the Service's "
              f"{mk.AUTO_CREATE_ANNOTATION} annotation or a namespace prefix); it comes back unless that is removed")
    return 0


def _list(c: Cluster, gv: str, resource: str, ns: str | None, **query: Any) -> list[Obj]:
    try:
        return list(c.api.get(resource_path(gv, resource, ns), **query).get("items") or [])
    except ApiError as e:
        if e.status == 404 and gv == mk.GROUP_VERSION:
            raise _crd_missing(c, e, resource) from None
        raise McsError(f"cluster {c.name} ({c.source}): listing {resource}: {e}") from None
    except Exception as e:  # unreachable API server
        raise McsError(f"cluster {c.name} ({c.source}): {type(e).__name__}: {e}") from None


def collect(members: Sequence[Cluster], namespace: str | None = None) -> list[Obj]:
    """One entry per multi-cluster service (namespace/name), as ``services -o json`` prints it."""
    out: dict[tuple[str, str], Obj] = {}

    def entry(ns: str, name: str) -> Obj:
        return out.setdefault((ns, name), {"namespace": ns, "name": name, "exports": [], "imports": [],
                                           "conflict": ""})
    for c in members:
        for ex in _list(c, mk.GROUP_VERSION, "serviceexports", namespace):
            meta = ex.get("metadata") or {}
            conds = {str(x.get("type")): x for x in (ex.get("status") or {}).get("conditions") or []
                     if isinstance(x, dict)}
            valid, conflict = conds.get("Valid") or {}, conds.get("Conflict") or {}
            e = entry(str(meta.get("namespace")), str(meta.get("name")))
            e["exports"].append({"cluster": c.name, "valid": valid.get("status", "Unknown"),
                                 "reason": valid.get("reason", "") if valid.get("status") != "True" else "",
                                 "message": valid.get("message", "") if valid.get("status") != "True" else "",
                                 "conflict": conflict.get("status") == "True", "auto": mk.owned(ex)})
            if conflict.get("status") == "True":
                e["conflict"] = str(conflict.get("message") or conflict.get("reason") or "")
        slices = _list(c, "discovery.k8s.io/v1", "endpointslices", namespace,
                       labelSelector=f"{mk.APP_MANAGED_BY_LABEL}={mk.MANAGED_BY}")
        for imp in _list(c, mk.GROUP_VERSION, "serviceimports", namespace):
            if not mk.owned(imp):
                continue
            meta = imp.get("metadata") or {}
            ns, name = str(meta.get("namespace")), str(meta.get("name"))
            counts: dict[str, dict[str, int]] = {}
            for s in slices:
                labels = (s.get("metadata") or {}).get("labels") or {}
                if (s.get("metadata") or {}).get("namespace") != ns or labels.get(mk.MCS_SERVICE_NAME_LABEL) != name:
                    continue
                n = counts.setdefault(str(labels.get(mk.SOURCE_CLUSTER_LABEL, "?")), {"ready": 0, "total": 0})
                for ep in s.get("endpoints") or []:
                    n["total"] += 1
                    n["ready"] += 1 if (ep.get("conditions") or {}).get("ready") is not False else 0
            spec = imp.get("spec") or {}
            entry(ns, name)["imports"].append({"cluster": c.name, "type": spec.get("type", ""),
                                               "ips": list(spec.get("ips") or []),
                                               "endpoints": dict(sorted(counts.items()))})
    return [out[k] for k in sorted(out)]


def render(entries: Sequence[Obj]) -> str:
    """``services``' table: one line per service, then its conflict (if any) indented."""
    rows = [("NAMESPACE", "NAME", "EXPORTED BY", "IMPORTED IN (IP)",
             "ENDPOINTS (ready/total by exporter, per importer)")]
    for e in entries:
        exported = ", ".join(f"{x['cluster']}" + ("" if x["valid"] == "True" else f" ({x['reason'] or 'not valid'})")
                             + ("*" if x["auto"] else "") for x in e["exports"]) or "-"
        imported = ", ".join(f"{i['cluster']} ({', '.join(i['ips']) or i['type']})" for i in e["imports"]) or "-"
        eps = "; ".join(f"{i['cluster']}: " + (", ".join(f"{src} {n['ready']}/{n['total']}"
                                                          for src, n in i["endpoints"].items()) or "none")
                        for i in e["imports"]) or "-"
        rows.append((e["namespace"], e["name"], exported, imported, eps))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    heads: list[Obj | None] = [None, *entries]
    for r, head in zip(rows, heads, strict=True):
        lines.append("  ".join(v.ljust(widths[i]) for i, v in enumerate(r[:4])) + "  " + r[4])
        if head is not None and head["conflict"]:
            lines.append(f"  conflict: {head['conflict']}")
    if not entries:
        lines.append("(no ServiceExports or ServiceImports)")
    elif any(x["auto"] for e in entries for x in e["exports"]):
        lines.append("* exported by kosmos-mcs's auto-export (annotation or namespace prefix)")
    return "\n".join(lines)


def services(args: argparse.Namespace) -> int:
    entries = collect(clusters(args, args.cluster), args.namespace)
    print(json.dumps(entries, indent=2) if args.output == "json" else render(entries))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "export":
        return export(args)
    if args.command == "unexport":
        return unexport(args)
    return services(args)
