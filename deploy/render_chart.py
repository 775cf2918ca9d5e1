#!/usr/bin/env python3
"""Generate the Helm chart deploy/helm/kosmos-fabric from the kustomize base, so they never drift.

The kustomize base (deploy/base, plus deploy/overlays/monitoring for the ServiceMonitors) is the
one source. This script renders it with ``kubectl kustomize`` and writes:

* ``crds/clusters.kosmos.io.yaml``: the CRD as rendered (Helm installs crds/ before templates
  and never templates them);
* ``templates/<component>.yaml``: every other object except the Namespace (Helm's
  ``--create-namespace`` makes it; label it ``pod-security.kubernetes.io/enforce=privileged``),
  with the settings listed in :data:`POINTS` replaced by Helm expressions, and each component
  behind its ``enabled`` switch;
* ``values.yaml``: the base's own values at those points, so ``helm template`` with the default
  values renders exactly the kustomize base (a unit test checks it object by object).

The relay tier (deploy/overlays/relay = base + components/relay) is rendered too: its new objects
go to ``templates/relay.yaml`` behind ``relay.enabled`` (off by default), and a base object the
component changes (the agent DaemonSet: ``--reflector`` = the relays' Service, ``--certificates-from`` = the
reflector) is written twice in its own template, ``{{- if .Values.relay.enabled }}`` the
overlay's version ``{{- else }}`` the base's ``{{- end }}``, so ``relay.enabled=true`` renders
exactly the overlay (checked by the same test).

The templates use only ``{{ .Values.x }}``, ``{{ .Values.x | quote }}``, ``{{- toYaml .Values.x
| nindent N }}``, ``{{ .Release.Namespace }}`` and ``{{- if .Values.x }}`` / ``{{- else }}`` /
``{{- end }}``.

Usage: ``deploy/render_chart.py`` (write) or ``deploy/render_chart.py --check`` (exit 1 and
list the files that differ from a fresh rendering; for tests and CI).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

_log = logging.getLogger("render_chart")

DEPLOY = Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "kosmos-fabric"
BASE = DEPLOY / "base"
MONITORING = DEPLOY / "overlays" / "monitoring"
RELAY = DEPLOY / "overlays" / "relay"
#: The switch of the relay tier: its objects, and the base objects its component changes.
RELAY_SWITCH = "relay.enabled"
NAMESPACE = "kosmos-system"
VERSION = "0.1.0"

#: (kind, name, path in the object, values key, style). Styles: "quote" (a string scalar),
#: "raw" (a number), "block" (a mapping or list, rendered with toYaml), "image" (the image
#: reference, split into image.repository and image.tag). A dot inside a key is written ``\.``.
POINTS: tuple[tuple[str, str, str, str, str], ...] = (
    ("Deployment", "kosmos-fabric-reflector", "spec.replicas", "reflector.replicas", "raw"),
    ("Deployment", "kosmos-fabric-reflector", "spec.template.spec.containers.0.image", "image", "image"),
    ("Deployment", "kosmos-fabric-reflector", "spec.template.spec.containers.0.imagePullPolicy",
     "image.pullPolicy", "quote"),
    ("Deployment", "kosmos-fabric-reflector", "spec.template.spec.containers.0.resources",
     "reflector.resources", "block"),
    ("Deployment", "kosmos-fabric-reflector", "spec.template.spec.tolerations", "reflector.tolerations", "block"),
    ("Deployment", "kosmos-fabric-reflector", "spec.template.spec.nodeSelector", "reflector.nodeSelector", "block"),
    ("Service", "kosmos-fabric-reflector", "spec.type", "reflector.service.type", "quote"),
    ("PodDisruptionBudget", "kosmos-fabric-reflector", "spec.minAvailable",
     "reflector.podDisruptionBudget.minAvailable", "raw"),
    ("DaemonSet", "kosmos-fabric-agent", "spec.template.spec.containers.0.image", "image", "image"),
    ("DaemonSet", "kosmos-fabric-agent", "spec.template.spec.containers.0.imagePullPolicy",
     "image.pullPolicy", "quote"),
    ("DaemonSet", "kosmos-fabric-agent", "spec.template.spec.containers.0.resources", "agent.resources", "block"),
    ("DaemonSet", "kosmos-fabric-agent", "spec.template.spec.tolerations", "agent.tolerations", "block"),
    ("DaemonSet", "kosmos-fabric-agent", "spec.template.spec.nodeSelector", "agent.nodeSelector", "block"),
    ("ConfigMap", "kosmos-fabric-agent", "data.cluster", "agent.cluster", "quote"),
    ("ConfigMap", "kosmos-fabric-agent", "data.reflector", "agent.reflector", "quote"),
    ("Deployment", "kosmos-mcs", "spec.replicas", "mcs.replicas", "raw"),
    ("Deployment", "kosmos-mcs", "spec.template.spec.containers.0.image", "image", "image"),
    ("Deployment", "kosmos-mcs", "spec.template.spec.containers.0.imagePullPolicy", "image.pullPolicy", "quote"),
    # The whole argument list and the container ports: the DNS responders (--dns-listen
    # NAME=0.0.0.0:PORT, one per member, with a container port each) are per installation.
    ("Deployment", "kosmos-mcs", "spec.template.spec.containers.0.args", "mcs.args", "block"),
    ("Deployment", "kosmos-mcs", "spec.template.spec.containers.0.ports", "mcs.ports", "block"),
    ("Deployment", "kosmos-mcs", "spec.template.spec.containers.0.resources", "mcs.resources", "block"),
    ("Deployment", "kosmos-mcs", "spec.template.spec.tolerations", "mcs.tolerations", "block"),
    ("Deployment", "kosmos-mcs", "spec.template.spec.nodeSelector", "mcs.nodeSelector", "block"),
    ("PodDisruptionBudget", "kosmos-mcs", "spec.minAvailable", "mcs.podDisruptionBudget.minAvailable", "raw"),
    ("Deployment", "kosmos-tree", "spec.replicas", "tree.replicas", "raw"),
    ("Deployment", "kosmos-tree", "spec.template.spec.containers.0.image", "image", "image"),
    ("Deployment", "kosmos-tree", "spec.template.spec.containers.0.imagePullPolicy", "image.pullPolicy", "quote"),
    # The whole argument list: --fabric-cluster (this cluster's name in the fabric), --root-id,
    # the kubelet server's client CA are per installation.
    ("Deployment", "kosmos-tree", "spec.template.spec.containers.0.args", "tree.args", "block"),
    ("Deployment", "kosmos-tree", "spec.template.spec.containers.0.resources", "tree.resources", "block"),
    ("Deployment", "kosmos-tree", "spec.template.spec.tolerations", "tree.tolerations", "block"),
    ("Deployment", "kosmos-tree", "spec.template.spec.nodeSelector", "tree.nodeSelector", "block"),
    ("PodDisruptionBudget", "kosmos-tree", "spec.minAvailable", "tree.podDisruptionBudget.minAvailable", "raw"),
    ("ConfigMap", "kosmos-scheduler-config", "data.config\\.yaml", "scheduler.config", "quote"),
    ("Deployment", "kosmos-scheduler", "spec.replicas", "scheduler.replicas", "raw"),
    ("Deployment", "kosmos-scheduler", "spec.template.spec.containers.0.image", "image", "image"),
    ("Deployment", "kosmos-scheduler", "spec.template.spec.containers.0.imagePullPolicy", "image.pullPolicy",
     "quote"),
    # --fabric-cluster (this cluster's name in the fabric) is per installation.
    ("Deployment", "kosmos-scheduler", "spec.template.spec.containers.0.args", "scheduler.args", "block"),
    ("Deployment", "kosmos-scheduler", "spec.template.spec.containers.0.resources", "scheduler.resources", "block"),
    ("Deployment", "kosmos-scheduler", "spec.template.spec.tolerations", "scheduler.tolerations", "block"),
    ("Deployment", "kosmos-scheduler", "spec.template.spec.nodeSelector", "scheduler.nodeSelector", "block"),
    ("PodDisruptionBudget", "kosmos-scheduler", "spec.minAvailable", "scheduler.podDisruptionBudget.minAvailable",
     "raw"),
    ("Deployment", "kosmos-fabric-relay", "spec.replicas", "relay.replicas", "raw"),
    ("Deployment", "kosmos-fabric-relay", "spec.template.spec.containers.0.image", "image", "image"),
    ("Deployment", "kosmos-fabric-relay", "spec.template.spec.containers.0.imagePullPolicy", "image.pullPolicy",
     "quote"),
    ("Deployment", "kosmos-fabric-relay", "spec.template.spec.containers.0.resources", "relay.resources", "block"),
    ("Deployment", "kosmos-fabric-relay", "spec.template.spec.nodeSelector", "relay.nodeSelector", "block"),
    ("Service", "kosmos-fabric-relay", "spec.type", "relay.service.type", "quote"),
    ("PodDisruptionBudget", "kosmos-fabric-relay", "spec.minAvailable", "relay.podDisruptionBudget.minAvailable",
     "raw"),
)
#: Which template (and switch) an object goes to, by its app.kubernetes.io/component label;
#: objects only in the monitoring overlay go to servicemonitor.yaml, objects only in the relay
#: overlay to relay.yaml.
#: Components off by default (every other switch defaults to true: the base has them).
OFF_BY_DEFAULT = frozenset({"relay", "servicemonitor"})
SWITCHES = {"reflector": "reflector.enabled", "agent": "agent.enabled", "relay": RELAY_SWITCH, "mcs": "mcs.enabled",
            "mcs-member": "mcsMember.enabled", "tree": "tree.enabled", "scheduler": "scheduler.enabled",
            "servicemonitor": "serviceMonitor.enabled"}
_HEADER = "# Generated by deploy/render_chart.py from deploy/base: edit the base and re-run, never this file.\n"


class RenderError(RuntimeError):
    """kustomize failed or the base lacks a field POINTS names (the message says which)."""


def kustomize(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH`` as a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RenderError("kubectl not found on PATH: it renders the kustomize base")
    p = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed: {p.stderr.strip()}")
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def _ident(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _walk(obj: Any, path: str) -> tuple[Any, str | int]:
    """The container holding ``path``'s last element, and that element's key/index (``\\.``: a
    dot inside a key, as in a ConfigMap's ``data.config\\.yaml``)."""
    parts: list[str | int] = [int(p) if p.isdigit() else p.replace("\\.", ".")
                              for p in re.split(r"(?<!\\)\.", path)]
    cur = obj
    for p in parts[:-1]:
        cur = cur[p]
    return cur, parts[-1]


def _set_nested(values: dict[str, Any], key: str, value: Any) -> None:
    *head, last = key.split(".")
    cur = values
    for h in head:
        cur = cur.setdefault(h, {})
    cur[last] = value


def _expr(key: str, style: str) -> str:
    if style == "quote":
        return f"{{{{ .Values.{key} | quote }}}}"
    if style == "image":
        return '"{{ .Values.image.repository }}:{{ .Values.image.tag }}"'
    return f"{{{{ .Values.{key} }}}}"


def _block_replacer(key: str) -> Callable[[re.Match[str]], str]:
    """``key: TOKEN`` -> ``key:`` plus ``{{- toYaml .Values.KEY | nindent N }}`` on the next line,
    N being the indentation the key's content needs (two more than the key, four in a list item)."""

    def replace(m: re.Match[str]) -> str:
        indent, item, name = m[1], m[2] or "", m[3]
        inner = len(indent) + (4 if item else 2)
        return f"{indent}{item}{name}:\n{' ' * inner}{{{{- toYaml .Values.{key} | nindent {inner} }}}}"

    return replace


def template_text(
    objs: list[dict[str, Any]],
    values: dict[str, Any],
    relay_versions: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> str:
    """Objects as Helm template text (POINTS substituted); records the base's values in ``values``.
    An object with a version in ``relay_versions`` (the relay overlay changes it) is written as
    both, chosen by :data:`RELAY_SWITCH`."""
    docs: list[str] = []
    for obj in objs:
        text = _object_text(obj, values)
        alt = (relay_versions or {}).get(_ident(obj))
        if alt is not None:
            text = (f"{{{{- if .Values.{RELAY_SWITCH} }}}}\n{_object_text(alt, values)}{{{{- else }}}}\n"
                    f"{text}{{{{- end }}}}\n")
        docs.append(text)
    return "---\n".join(docs)


def _object_text(obj: dict[str, Any], values: dict[str, Any]) -> str:
    """One object as Helm template text (POINTS substituted); records its values in ``values``."""
    obj = yaml.safe_load(yaml.safe_dump(obj))  # a private copy
    kind, name = _ident(obj)
    blocks: dict[str, str] = {}
    scalars: dict[str, str] = {}
    for pkind, pname, path, key, style in POINTS:
        if (pkind, pname) != (kind, name):
            continue
        try:
            parent, last = _walk(obj, path)
            current = parent[last]
        except (KeyError, IndexError, TypeError) as e:
            raise RenderError(f"{kind}/{name}: no field {path} in the base (POINTS names it): {e!r}") from e
        token = f"__HELM_{len(blocks) + len(scalars)}__"
        if style == "image":
            repo, _, tag = str(current).rpartition(":")
            _set_nested(values, "image.repository", repo)
            _set_nested(values, "image.tag", tag)
        else:
            _set_nested(values, key, current)
        parent[last] = token
        (blocks if style == "block" else scalars)[token] = key if style == "block" else _expr(key, style)
    meta = obj["metadata"]
    if meta.get("namespace") == NAMESPACE:
        meta["namespace"] = "__HELM_NS__"
    for s in obj.get("subjects") or []:
        if s.get("namespace") == NAMESPACE:
            s["namespace"] = "__HELM_NS__"
    text = yaml.safe_dump(obj, sort_keys=False, width=10**6)
    text = text.replace("__HELM_NS__", "{{ .Release.Namespace }}")
    for token, expr in scalars.items():
        text = text.replace(token, expr)
    for token, key in blocks.items():
        text = re.sub(rf"^( *)(- )?(\S+): {token}$", _block_replacer(key), text, flags=re.MULTILINE)
        if token in text:
            raise RenderError(f"{kind}/{name}: could not place {key} as a block")
    return text


class _ValuesDumper(yaml.SafeDumper):
    """values.yaml's dumper: a multi-line string (the scheduler's configuration file) as a literal
    block, so it reads and edits like the file it is."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_ValuesDumper.add_representer(str, _str)


def render() -> dict[str, str]:
    """The chart's generated files, by path relative to the chart directory."""
    base = kustomize(BASE)
    monitoring = kustomize(MONITORING)
    relay = kustomize(RELAY)
    base_ids = {_ident(o) for o in base}
    by_ident = {_ident(o): o for o in base}
    # Base objects the relay component changes: written in both versions, behind RELAY_SWITCH.
    relay_versions = {_ident(o): o for o in relay if _ident(o) in base_ids and o != by_ident[_ident(o)]}
    groups: dict[str, list[dict[str, Any]]] = {name: [] for name in SWITCHES}
    crds: list[dict[str, Any]] = []
    for obj in base:
        if obj["kind"] == "Namespace":
            continue
        if obj["kind"] == "CustomResourceDefinition":
            crds.append(obj)
            continue
        component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if component not in groups:
            raise RenderError(f"{_ident(obj)}: label app.kubernetes.io/component must be one of {sorted(groups)}")
        groups[component].append(obj)
    groups["servicemonitor"] = [o for o in monitoring if _ident(o) not in base_ids]
    groups["relay"] = [o for o in relay if _ident(o) not in base_ids]
    for obj in groups["relay"]:
        if obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "relay":
            raise RenderError(f"{_ident(obj)}: an object of the relay component must be labelled "
                              "app.kubernetes.io/component: relay")

    values: dict[str, Any] = {"image": {}}
    files: dict[str, str] = {}
    for name, objs in groups.items():
        switch = SWITCHES[name]
        _set_nested(values, switch, name not in OFF_BY_DEFAULT)
        body = template_text(objs, values, relay_versions)
        files[f"templates/{name}.yaml"] = f"{_HEADER}{{{{- if .Values.{switch} }}}}\n{body}{{{{- end }}}}\n"
    for crd in crds:
        files[f"crds/{crd['metadata']['name']}.yaml"] = _HEADER + yaml.safe_dump(crd, sort_keys=False, width=10**6)
    files["values.yaml"] = (
        _HEADER
        + "# Defaults equal deploy/base; agent.enabled + mcsMember.enabled (member) / reflector.enabled +\n"
        + "# mcs.enabled + tree.enabled + scheduler.enabled (host) split member and host installs;\n"
        + "# relay.enabled (with the agents) adds the relay tier and points the agents at it.\n"
        + yaml.dump(values, Dumper=_ValuesDumper, sort_keys=False, width=10**6)
    )
    files["Chart.yaml"] = yaml.safe_dump(
        {
            "apiVersion": "v2",
            "name": "kosmos-fabric",
            "description": "Kosmos Fabric: multi-cluster network fabric (agent, route reflector, multi-cluster "
                           "services, ClusterTree, scheduler, CRDs)",
            "type": "application",
            "version": VERSION,
            "appVersion": VERSION,
        },
        sort_keys=False,
    )
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--check", action="store_true", help="compare with the chart on disk instead of writing it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        files = render()
    except RenderError as e:
        _log.error("render_chart: %s", e)
        return 2
    if args.check:
        stale = [rel for rel, text in files.items() if not (CHART / rel).is_file() or (CHART / rel).read_text() != text]
        on_disk = {str(f.relative_to(CHART)) for d in ("templates", "crds") for f in (CHART / d).glob("*.yaml")}
        stale += sorted(on_disk - set(files))
        for rel in stale:
            _log.error("render_chart: %s differs from deploy/base (run deploy/render_chart.py)", CHART / rel)
        return 1 if stale else 0
    for rel, text in files.items():
        dest = CHART / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    for d in ("templates", "crds"):
        for f in (CHART / d).glob("*.yaml"):
            if str(f.relative_to(CHART)) not in files:
                f.unlink()
    _log.info("wrote %d files under %s", len(files), CHART)
    return 0


if __name__ == "__main__":
    sys.exit(main())
