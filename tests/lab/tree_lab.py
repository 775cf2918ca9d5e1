"""What the ClusterTree lab tests share (``test_tree_e2e.py``, ``test_tree_state_e2e.py``,
``test_tree_apps_e2e.py``): the host part of their topologies, :class:`TreeLab` (a Kubernetes lab
with ``kosmos-tree``), :func:`tree_lab_running` (their module fixtures' body) and the reads of a
virtual node's readiness and of the tree manager's Lease.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from tests.lab.conftest import KubeLab, lab_running, new_lab_name

#: The host cluster every tree lab has: ``root`` with one node r1 that runs no pods.
ROOT_TOPOLOGY = textwrap.dedent("""\
    underlay: 198.18.0.0/16
    kubernetes: true
    clusters:
      - name: root
        role: host
        podCIDRs: [10.40.0.0/16]
        serviceCIDRs: [10.140.0.0/20]
        nodes: [{name: r1, pods: 0}]
    """)


def topology(leaves: str) -> str:
    """A tree lab's topology: :data:`ROOT_TOPOLOGY` and ``leaves`` (items of its ``clusters``
    list, as YAML at any indentation)."""
    return ROOT_TOPOLOGY + textwrap.indent(textwrap.dedent(leaves), "  ")


class TreeLab(KubeLab):
    """A Kubernetes lab whose root runs ``kosmos-tree`` (``lab status`` reports it)."""

    root_id: str

    def tree(self) -> dict[str, Any]:
        t: dict[str, Any] = self.status()["tree"]
        return t

    def tree_pids(self) -> set[int]:
        t = self.tree()
        return {int(p) for p in (t["pid"], t["supervisor_pid"]) if p}

    def host_nodes(self) -> dict[str, dict[str, Any]]:
        return {n["metadata"]["name"]: n for n in self.get("root", "nodes")["items"]}


TreeLabT = TypeVar("TreeLabT", bound=TreeLab)


@contextlib.contextmanager
def tree_lab_running(lab_cls: type[TreeLabT], topology: str, tmp_dir: Path) -> Iterator[TreeLabT]:
    """Up a lab of ``lab_cls`` (its own name) from ``topology`` (written into ``tmp_dir``) with
    ``lab.kubeconfig`` set; down and checked by :func:`lab_running`, the tree manager's
    processes among those that must be gone."""
    topo = tmp_dir / "tree.yaml"
    topo.write_text(topology)
    lab = lab_cls(new_lab_name(), topo)
    with lab_running(lab, "--timeout", "300", extra_pids=lambda lb: lb.kube_pids() | lb.tree_pids()) as running:
        running.kubeconfig = Path(running.lab("kubeconfig").stdout.strip())
        yield running


def node_ready(node: dict[str, Any]) -> str | None:
    """The status of ``node``'s Ready condition (None without one)."""
    return next((c["status"] for c in (node.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"),
                None)


def lease_holder(tlab: TreeLab) -> str | None:
    """The holder of the tree manager's Lease in the root (None without one)."""
    lease = tlab.get("root", "lease", "kosmos-tree", "-n", "kube-system", check=False)
    return ((lease or {}).get("spec") or {}).get("holderIdentity")
