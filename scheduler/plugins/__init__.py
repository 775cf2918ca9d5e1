"""The scheduler's plugins by name: what a profile's plugin list refers to (upstream's in-tree
plugins and Kosmos' ``LeafNode*``).

Every class is built as ``cls(handle, args)`` (``args``: the profile's pluginConfig args for that
name, upstream defaults for what is absent) and implements the protocols of
:mod:`scheduler.framework` it needs plus ``events_to_register()``.
"""

from __future__ import annotations

from scheduler.plugins.interpodaffinity import InterPodAffinity
from scheduler.plugins.kosmos_distribution import LeafNodeDistribution
from scheduler.plugins.kosmos_fragmentation import LeafNodeFragmentation
from scheduler.plugins.kosmos_leaffit import LeafNodeFit
from scheduler.plugins.kosmos_netaffinity import NetworkAffinity
from scheduler.plugins.kosmos_tainttoleration import LeafNodeTaintToleration
from scheduler.plugins.kosmos_volumebinding import LeafNodeVolumeBinding
from scheduler.plugins.kosmos_workloadpolicy import LeafNodeWorkloadPolicy
from scheduler.plugins.nodeaffinity import NodeAffinity
from scheduler.plugins.nodebasic import NodeName, NodePorts, NodeUnschedulable
from scheduler.plugins.noderesources import NodeResourcesBalancedAllocation, NodeResourcesFit
from scheduler.plugins.podtopologyspread import PodTopologySpread
from scheduler.plugins.tainttoleration import TaintToleration
from scheduler.plugins.volumebinding import VolumeBinding, VolumeZone

REGISTRY: dict[str, type] = {}

# Upstream's in-tree plugins (pkg/scheduler/framework/plugins/registry.go names).
REGISTRY.update({
    NodeName.name: NodeName,
    NodeUnschedulable.name: NodeUnschedulable,
    NodePorts.name: NodePorts,
    NodeResourcesFit.name: NodeResourcesFit,
    NodeResourcesBalancedAllocation.name: NodeResourcesBalancedAllocation,
    TaintToleration.name: TaintToleration,
    NodeAffinity.name: NodeAffinity,
    InterPodAffinity.name: InterPodAffinity,
    PodTopologySpread.name: PodTopologySpread,
    VolumeBinding.name: VolumeBinding,
    VolumeZone.name: VolumeZone,
})

# Kosmos' plugins (scheduler/plugins/kosmos_*.py).
REGISTRY.update({
    LeafNodeTaintToleration.name: LeafNodeTaintToleration,
    LeafNodeDistribution.name: LeafNodeDistribution,
    LeafNodeVolumeBinding.name: LeafNodeVolumeBinding,
    LeafNodeWorkloadPolicy.name: LeafNodeWorkloadPolicy,
    LeafNodeFit.name: LeafNodeFit,
    NetworkAffinity.name: NetworkAffinity,
    LeafNodeFragmentation.name: LeafNodeFragmentation,
})
