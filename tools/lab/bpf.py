"""The lab's bpf filesystem (where agents pin their translation maps, so they survive an
agent restart) and ``lab bpf``: what the translation programs hold on a node.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from tools.lab.state import LabError, LabState, bpf_dir, find_node, require_state

_log = logging.getLogger(__name__)

def is_mountpoint(path: Path) -> bool:
    """Whether ``path`` is a mount point in this mount namespace (``/proc/self/mounts``)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[1] == str(path) for line in mounts if len(line.split()) > 1)


def mount_bpffs(state: LabState) -> None:
    """Mount the lab's bpffs if a cluster uses global IP or may get it later (a Kubernetes lab,
    whose Cluster resources can gain a globalCIDRsMap at any time); plain labs need none."""
    path = bpf_dir(state.name)
    wanted = state.kubernetes or any(c.global_cidrs for c in state.clusters)
    if not wanted or is_mountpoint(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"cannot mount a bpf filesystem on {path} for the translator: {p.stderr.strip()}")


def umount_bpffs(name: str) -> bool:
    path = bpf_dir(name)
    if not is_mountpoint(path):
        return False
    p = subprocess.run(["umount", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        _log.warning("cannot unmount %s: %s", path, p.stderr.strip())
        return False
    return True


def bpf_dump(name: str, spec: str) -> dict[str, Any]:
    """``fabric-tool lab bpf NODE``: the node's translator as the kernel holds it - mappings with
    packet/byte counters, drops (read from the pins, no compile) and which of our programs run on
    which device (read from tc in the node's namespace)."""
    from fabric.agent import translator
    from fabric.bpf import translate

    state = require_state(name)
    node = find_node(state, spec)
    instance = translator.instance_name(node.cluster, node.name)
    root = bpf_dir(name)
    doc: dict[str, Any] = {"node": node.key, "instance": instance, "pin_root": str(root)}
    try:
        if translate.pin_dir_for(instance, root).is_dir():
            doc.update(translate.dump_pinned(instance, root))
            doc["loaded"] = True
        else:
            doc.update(loaded=False, mappings=[], drops={})
        doc["attachments"] = translate.Translator(instance, pin_root=root, netns=node.netns).attachments(
            translator.DEVICES
        )
    except translate.TranslatorError as e:
        raise LabError(f"reading the translator of {node.key}: {e}") from e
    return doc


def render_bpf(doc: dict[str, Any]) -> str:
    lines = [f"translator of {doc['node']} ({doc['pin_root']}/{doc['instance']})"]
    if not doc.get("loaded"):
        lines.append("  not loaded (the node's cluster has no globalCIDRs, or its agent has not applied them)")
    for m in doc.get("mappings", []):
        lines.append(
            f"  {m['local']:<20} <-> {m['global']:<20} in {m['in_packets']} pkts/{m['in_bytes']} B"
            f"  out {m['out_packets']} pkts/{m['out_bytes']} B"
        )
    drops = {k: v for k, v in doc.get("drops", {}).items() if v}
    if drops:
        lines.append("  drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    for a in doc.get("attachments", []):
        lines.append(f"  {a['device']} {a['direction']}: {a['program']}")
    return "\n".join(lines)
