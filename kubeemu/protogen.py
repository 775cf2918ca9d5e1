"""Generate ``kubeemu/data/k8s_proto.json``: the protobuf message tables of the built-in kinds.

kubectl's typed clients (``kubectl create namespace|configmap|secret|deployment|service``,
``expose``, ``scale`` ...) send Kubernetes protobuf, not JSON. :mod:`kubeemu.protobuf` decodes it
generically from a table of messages; this script builds that table from upstream's sources:

1. ``generated.proto`` of each API package (k8s.io/api ``<group>/<version>`` and apimachinery's
   ``meta/v1``, ``runtime``, ``util/intstr``, ``api/resource``) gives every message, each field's
   number, proto type and whether it is repeated or a map.
2. The Go ``*.go`` files of the same package give each field's JSON side from its struct tags
   (``json:"name,omitempty" protobuf:"bytes,1,opt,name=x"``): the JSON name (``$ref`` where proto
   says ``ref``), ``omitempty``, ``,inline`` (``Volume.volumeSource`` is flattened into the
   Volume in JSON) and whether the Go field is a pointer (a present zero value is kept).
3. ``register.go``'s ``GroupName`` maps each package to its API group, so that the
   ``runtime.Unknown`` envelope's ``apiVersion``/``kind`` find the message.

Regenerate (upstream tags matching the emulated version, v1.32 = v0.32.x)::

    python -m kubeemu.protogen --api /path/to/kubernetes/api --apimachinery /path/to/apimachinery \\
        --ref v0.32.9 > kubeemu/data/k8s_proto.json

Both paths are git checkouts (``git show REF:path`` is read, so a bare mirror works). The
committed table is checked against this script's output by ``tests/unit/test_kubeemu_protobuf.py``
when the sources are at hand (``KUBEEMU_K8S_API_SRC`` / ``KUBEEMU_K8S_APIMACHINERY_SRC``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

# The API packages of k8s.io/api whose kinds the emulator serves or a controller writes (stable
# versions only; beta/alpha kinds are not served).
API_PACKAGES = (
    "core/v1",
    "apps/v1",
    "autoscaling/v1",
    "batch/v1",
    "coordination/v1",
    "discovery/v1",
    "networking/v1",
    "policy/v1",
    "rbac/v1",
    "storage/v1",
    "scheduling/v1",
    "events/v1",
    "authentication/v1",
    "authorization/v1",
    "certificates/v1",
    "node/v1",
)
MACHINERY_PACKAGES = ("pkg/apis/meta/v1", "pkg/runtime", "pkg/runtime/schema", "pkg/util/intstr", "pkg/api/resource")

# Flags of a field (bit mask in the table).
REPEATED, OMITEMPTY, POINTER, INLINE = 1, 2, 4, 8

_MSG = re.compile(r"^message (\w+) \{")
_FIELD = re.compile(r"^\s+(optional|repeated) ([\w.]+) (\w+) = (\d+);")
_MAP = re.compile(r"^\s+map<([\w.]+), ([\w.]+)> (\w+) = (\d+);")
_PACKAGE = re.compile(r"^package ([\w.]+);")
_STRUCT = re.compile(r"^type (\w+) struct \{")
_TAG = re.compile(r"`([^`]*)`")
_GROUP = re.compile(r'^const GroupName = "([^"]*)"', re.M)
_SCALARS = frozenset(
    {
        "string",
        "bytes",
        "bool",
        "int32",
        "int64",
        "uint32",
        "uint64",
        "double",
        "float",
        "sint32",
        "sint64",
        "fixed32",
        "fixed64",
    }
)


def _git(repo: Path, ref: str, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _show(repo: Path, ref: str, path: str) -> str:
    return _git(repo, ref, "show", f"{ref}:{path}")


def _go_files(repo: Path, ref: str, pkg: str) -> list[str]:
    names = _git(repo, ref, "ls-tree", "--name-only", f"{ref}:{pkg}").split()
    return [
        f"{pkg}/{n}"
        for n in names
        if n.endswith(".go")
        and not n.endswith("_test.go")
        and not n.startswith("zz_generated")
        and n != "generated.pb.go"
    ]


def parse_proto(text: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(package, {message: {"fields": [[num, proto_name, type, repeated]], "nullable": bool}})."""
    package = ""
    messages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    comments: list[str] = []
    for line in text.splitlines():
        if m := _PACKAGE.match(line):
            package = m.group(1)
        if line.startswith("//"):
            comments.append(line)
            continue
        if m := _MSG.match(line):
            current = {"fields": [], "nullable": any("+protobuf.nullable=true" in c for c in comments)}
            messages[m.group(1)] = current
        elif current is not None and (m := _FIELD.match(line)):
            ptype = m.group(2).lstrip(".")
            if ptype not in _SCALARS and "." not in ptype:
                ptype = f"{package}.{ptype}"
            current["fields"].append([int(m.group(4)), m.group(3), ptype, m.group(1) == "repeated"])
        elif current is not None and (m := _MAP.match(line)):
            k, v = m.group(1).lstrip("."), m.group(2).lstrip(".")
            if v not in _SCALARS and "." not in v:
                v = f"{package}.{v}"
            current["fields"].append([int(m.group(4)), m.group(3), f"map<{k},{v}>", False])
        elif line.startswith("}"):
            current = None
        comments = []
    return package, messages


def parse_go_tags(texts: list[str]) -> dict[tuple[str, str], tuple[str, int]]:
    """{(struct, proto_name): (json_name, flags)} from the struct tags of Go source files."""
    out: dict[tuple[str, str], tuple[str, int]] = {}
    for text in texts:
        struct = ""
        for line in text.splitlines():
            if m := _STRUCT.match(line):
                struct = m.group(1)
                continue
            if line.startswith("}"):
                struct = ""
                continue
            if not struct or 'protobuf:"' not in line:
                continue
            tag = _TAG.search(line)
            if tag is None:
                continue
            tags = dict(re.findall(r'(\w+):"([^"]*)"', tag.group(1)))
            pname = next((p[5:] for p in tags.get("protobuf", "").split(",") if p.startswith("name=")), "")
            if not pname:
                continue
            jparts = tags.get("json", "").split(",")
            flags = 0
            if "omitempty" in jparts[1:]:
                flags |= OMITEMPTY
            if "inline" in jparts[1:]:
                flags |= INLINE
            decl = line[: tag.start()].split()
            gotype = decl[-1] if decl else ""
            if gotype.startswith("*"):
                flags |= POINTER
            out[(struct, pname)] = (jparts[0] or pname, flags)
    return out


def build(api: Path, machinery: Path, ref: str) -> dict[str, Any]:
    """The whole table: ``messages`` (full name -> fields) and ``kinds`` (apiVersion/Kind -> message)."""
    messages: dict[str, list[list[Any]]] = {}
    nullable: list[str] = []
    kinds: dict[str, str] = {}
    for repo, pkgs, is_api in ((machinery, MACHINERY_PACKAGES, False), (api, API_PACKAGES, True)):
        for pkg in pkgs:
            package, msgs = parse_proto(_show(repo, ref, f"{pkg}/generated.proto"))
            gofiles = _go_files(repo, ref, pkg)
            tags = parse_go_tags([_show(repo, ref, f) for f in gofiles])
            group = ""
            if is_api:
                reg = _GROUP.search(_show(repo, ref, f"{pkg}/register.go"))
                if reg is None:
                    raise ValueError(f"{pkg}/register.go at {ref} has no GroupName constant")
                group = reg.group(1)
            version = pkg.rsplit("/", 1)[1]
            for name, msg in msgs.items():
                full = f"{package}.{name}"
                rows: list[list[Any]] = []
                for num, pname, ptype, repeated in msg["fields"]:
                    jname, flags = tags.get((name, pname), (pname, 0))
                    rows.append([num, jname, ptype, flags | (REPEATED if repeated else 0)])
                messages[full] = rows
                if msg["nullable"]:
                    nullable.append(full)
                if is_api and any(r[1] == "metadata" for r in rows):
                    kinds[f"{group}/{version}/{name}" if group else f"{version}/{name}"] = full
    # meta/v1 kinds that travel as request bodies (DeleteOptions ...) under any group's version
    for name in ("DeleteOptions", "Status", "APIResourceList", "List"):
        kinds[f"meta/{name}"] = f"k8s.io.apimachinery.pkg.apis.meta.v1.{name}"
    return {
        "ref": ref,
        "flags": {"repeated": REPEATED, "omitempty": OMITEMPTY, "pointer": POINTER, "inline": INLINE},
        "kinds": dict(sorted(kinds.items())),
        "nullable": sorted(nullable),
        "messages": dict(sorted(messages.items())),
    }


def dumps(table: dict[str, Any]) -> str:
    """The committed form: one message per line, so diffs after a regeneration stay readable."""
    lines = [
        "{",
        f'"ref": {json.dumps(table["ref"])},',
        f'"flags": {json.dumps(table["flags"])},',
        f'"kinds": {json.dumps(table["kinds"], separators=(",", ":"))},',
        f'"nullable": {json.dumps(table["nullable"])},',
        '"messages": {',
    ]
    items = list(table["messages"].items())
    for i, (name, rows) in enumerate(items):
        sep = "," if i < len(items) - 1 else ""
        lines.append(f"{json.dumps(name)}: {json.dumps(rows, separators=(',', ':'))}{sep}")
    lines += ["}", "}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubeemu.protogen", description=__doc__.split("\n")[0])
    p.add_argument("--api", type=Path, required=True, help="git checkout of k8s.io/api (kubernetes/api)")
    p.add_argument("--apimachinery", type=Path, required=True, help="git checkout of k8s.io/apimachinery")
    p.add_argument("--ref", default="v0.32.9", help="tag or commit to read in both (default v0.32.9)")
    args = p.parse_args(argv)
    sys.stdout.write(dumps(build(args.api, args.apimachinery, args.ref)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
