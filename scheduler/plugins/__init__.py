"""The scheduler's plugins by the name a profile uses for them (KubeSchedulerConfiguration's
``plugins.<point>.enabled[].name``). Each class is constructed as ``cls(handle, args)`` and
implements the protocols of :mod:`scheduler.framework` it needs."""

from __future__ import annotations

from scheduler.plugins.kosmos_distribution import LeafNodeDistribution
from scheduler.plugins.kosmos_tainttoleration import LeafNodeTaintToleration
from scheduler.plugins.kosmos_volumebinding import LeafNodeVolumeBinding
from scheduler.plugins.kosmos_workloadpolicy import LeafNodeWorkloadPolicy

REGISTRY: dict[str, type] = {
    LeafNodeTaintToleration.name: LeafNodeTaintToleration,
    LeafNodeDistribution.name: LeafNodeDistribution,
    LeafNodeVolumeBinding.name: LeafNodeVolumeBinding,
    LeafNodeWorkloadPolicy.name: LeafNodeWorkloadPolicy,
}
