"""Scheduling profiles: which plugins run at which extension point with which weights, after
upstream's KubeSchedulerConfiguration (``kubescheduler.config.k8s.io/v1``) and
``pkg/scheduler/framework/runtime`` (the per-profile framework).

In order:

1. Two built-in profiles: ``default-scheduler`` (upstream's default plugin set and score
   weights, minus the plugins this scheduler does not implement: SchedulingGates (done by the
   queue's admission: gated pods are not queued), PrioritySort (the queue sorts by priority
   itself), VolumeRestrictions, NodeVolumeLimits, DefaultPreemption (no preemption),
   ImageLocality, DefaultBinder (the bind is built in)), and ``kosmos-scheduler``: the same with
   TaintToleration replaced by LeafNodeTaintToleration (which tolerates the leaf taint, so it
   cannot run beside TaintToleration), plus LeafNodeDistribution, LeafNodeVolumeBinding (beside
   VolumeBinding), LeafNodeWorkloadPolicy, NetworkAffinity (score weight 2), LeafNodeFit (filter
   and reserve; it passes every node when ``kosmos-scheduler`` runs without ``--reflector``: no
   leaf views) and LeafNodeFragmentation (score, weight 1; 0 for every node without leaf views).
2. :func:`load_config` reads a KubeSchedulerConfiguration-like YAML (``--config``): global and
   per-profile ``percentageOfNodesToScore``, ``profiles[].plugins.<point>.enabled/disabled`` (with
   ``multiPoint``, ``*`` disabling all defaults of a point, ``weight`` for score plugins),
   ``profiles[].pluginConfig[].args``, ``leaderElection``. Every mistake is a
   :class:`ConfigError` naming the field and the bad value.
3. :func:`build_profiles` instantiates the plugins from :data:`scheduler.plugins.REGISTRY`
   (``cls(handle, args)``); an unknown name is a ConfigError listing the known ones. A built-in
   default whose plugin is not registered is skipped with a warning (the registry is filled by
   the plugin modules).
4. :class:`Profile` runs the extension points for one pod (the scheduling loop in
   ``scheduler.scheduler`` calls them in upstream's order). Plugins a PreFilter/PreScore SKIPped
   are not called at Filter/Score; :meth:`Profile.pod_filters` compiles the Filters once per pod
   (``FilterFactoryPlugin.filter_fn``, dropping those that would pass every node) and
   ``run_score`` takes a plugin's ``score_nodes`` (BatchScorePlugin) over all feasible nodes at
   once where it has one: the hot path at hundreds of nodes per pod, same results.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from scheduler.election import timing_problem
from scheduler.framework import (
    MAX_NODE_SCORE,
    MIN_NODE_SCORE,
    SUCCESS,
    ClusterEvent,
    Code,
    CycleState,
    Handle,
    NodeInfo,
    PodInfo,
    PreFilterResult,
    Status,
    error,
)

_log = logging.getLogger(__name__)

DEFAULT_SCHEDULER = "default-scheduler"
KOSMOS_SCHEDULER = "kosmos-scheduler"

#: Extension points in the order they run, with the method a plugin must have to serve it.
POINTS: dict[str, tuple[str, ...]] = {
    "preFilter": ("pre_filter",),
    "filter": ("filter",),
    "preScore": ("pre_score",),
    "score": ("score",),
    "reserve": ("reserve", "unreserve"),
    "preBind": ("pre_bind",),
}

#: upstream getDefaultPlugins (multiPoint), the ones implemented here, in upstream's order.
DEFAULT_PLUGINS: tuple[tuple[str, int], ...] = (
    ("NodeUnschedulable", 0),
    ("NodeName", 0),
    ("TaintToleration", 3),
    ("NodeAffinity", 2),
    ("NodePorts", 0),
    ("NodeResourcesFit", 1),
    ("VolumeBinding", 0),
    ("VolumeZone", 0),
    ("PodTopologySpread", 2),
    ("InterPodAffinity", 2),
    ("NodeResourcesBalancedAllocation", 1),
)

#: The Kosmos profile: upstream's set with the leaf-aware taint plugin, plus Kosmos' policies.
KOSMOS_REPLACE = {"TaintToleration": "LeafNodeTaintToleration"}
KOSMOS_EXTRA: tuple[tuple[str, int], ...] = (
    ("LeafNodeDistribution", 1),
    ("LeafNodeVolumeBinding", 0),
    ("LeafNodeWorkloadPolicy", 1),
    ("NetworkAffinity", 2),  # scheduler/netaffinity.py; InterPodAffinity's weight
    ("LeafNodeFit", 0),  # scheduler/leafview.py; filter and reserve, no score
    ("LeafNodeFragmentation", 1),  # scheduler/fragmentation.py; scores 0 without leaf views
)

API_VERSIONS = ("kubescheduler.config.k8s.io/v1", "kubescheduler.config.k8s.io/v1beta3")


def kosmos_plugins() -> tuple[tuple[str, int], ...]:
    return tuple((KOSMOS_REPLACE.get(n, n), w) for n, w in DEFAULT_PLUGINS) + KOSMOS_EXTRA


def builtin_plugins(scheduler_name: str) -> tuple[tuple[str, int], ...]:
    return kosmos_plugins() if scheduler_name == KOSMOS_SCHEDULER else DEFAULT_PLUGINS


class ConfigError(ValueError):
    """A bad scheduler configuration; the message names the field and the value."""


@dataclass
class PluginSet:
    """``plugins.<point>``: enabled (name, weight or None) and disabled names."""

    enabled: list[tuple[str, int | None]] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)


@dataclass
class ProfileConfig:
    scheduler_name: str
    percentage_of_nodes_to_score: int | None = None
    plugins: dict[str, PluginSet] = field(default_factory=dict)  # point (or multiPoint) -> set
    plugin_config: dict[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class LeaderElectionConfig:
    """upstream LeaderElectionConfiguration defaults: 15 s lease, 10 s renew deadline, 2 s retry."""

    leader_elect: bool = True
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    resource_namespace: str = "kube-system"
    resource_name: str = "kosmos-scheduler"


@dataclass
class SchedulerConfig:
    percentage_of_nodes_to_score: int | None = None
    profiles: list[ProfileConfig] = field(default_factory=list)
    leader_election: LeaderElectionConfig = field(default_factory=LeaderElectionConfig)


def default_config() -> SchedulerConfig:
    return SchedulerConfig(profiles=[ProfileConfig(DEFAULT_SCHEDULER), ProfileConfig(KOSMOS_SCHEDULER)])


def _duration(v: Any, where: str) -> float:
    """A metav1.Duration (``15s``, ``1m30s``, ``500ms``) or a number of seconds."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    import re

    s = str(v).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", s)
    if not parts or "".join(a + b for a, b in parts) != s:
        raise ConfigError(f"{where}: {v!r} is not a duration (like 15s, 1m30s, 500ms)")
    mult = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(a) * mult[b] for a, b in parts)


def _percentage(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100:
        raise ConfigError(f"{where}: {v!r} is not a percentage between 0 and 100")
    return v


def _plugin_set(doc: Any, where: str) -> PluginSet:
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: expected a mapping with enabled/disabled, got {doc!r}")
    unknown = set(doc) - {"enabled", "disabled"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)} (expected enabled, disabled)")
    ps = PluginSet()
    for i, e in enumerate(doc.get("enabled") or []):
        if not isinstance(e, Mapping) or not isinstance(e.get("name"), str) or not e["name"]:
            raise ConfigError(f"{where}.enabled[{i}]: expected {{name: ..., weight: ...}}, got {e!r}")
        w = e.get("weight")
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ConfigError(f"{where}.enabled[{i}] ({e['name']}): weight {w!r} is not a non-negative integer")
        ps.enabled.append((e["name"], w))
    for i, e in enumerate(doc.get("disabled") or []):
        if not isinstance(e, Mapping) or not isinstance(e.get("name"), str) or not e["name"]:
            raise ConfigError(f"{where}.disabled[{i}]: expected {{name: ...}}, got {e!r}")
        ps.disabled.append(e["name"])
    return ps


def parse_config(doc: Any, source: str = "config") -> SchedulerConfig:
    """A KubeSchedulerConfiguration document (already YAML-decoded) -> :class:`SchedulerConfig`."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a KubeSchedulerConfiguration mapping, got {type(doc).__name__}")
    if doc.get("kind", "KubeSchedulerConfiguration") != "KubeSchedulerConfiguration":
        raise ConfigError(f"{source}: kind {doc.get('kind')!r} is not KubeSchedulerConfiguration")
    av = doc.get("apiVersion", API_VERSIONS[0])
    if av not in API_VERSIONS:
        raise ConfigError(f"{source}: apiVersion {av!r} is not one of {', '.join(API_VERSIONS)}")
    cfg = SchedulerConfig(percentage_of_nodes_to_score=_percentage(doc.get("percentageOfNodesToScore"),
                                                                   f"{source}: percentageOfNodesToScore"))
    le = doc.get("leaderElection") or {}
    if le:
        d = LeaderElectionConfig()
        cfg.leader_election = LeaderElectionConfig(
            leader_elect=bool(le.get("leaderElect", d.leader_elect)),
            lease_duration=_duration(le.get("leaseDuration", d.lease_duration),
                                     f"{source}: leaderElection.leaseDuration"),
            renew_deadline=_duration(le.get("renewDeadline", d.renew_deadline),
                                     f"{source}: leaderElection.renewDeadline"),
            retry_period=_duration(le.get("retryPeriod", d.retry_period), f"{source}: leaderElection.retryPeriod"),
            resource_namespace=str(le.get("resourceNamespace", d.resource_namespace)),
            resource_name=str(le.get("resourceName", d.resource_name)))
        e = cfg.leader_election
        problem = timing_problem(e.lease_duration, e.renew_deadline, e.retry_period)
        if problem:
            raise ConfigError(f"{source}: leaderElection: {problem}")
    profiles = doc.get("profiles")
    if profiles is None:
        cfg.profiles = default_config().profiles
        return cfg
    if not isinstance(profiles, list) or not profiles:
        raise ConfigError(f"{source}: profiles must be a non-empty list")
    seen: set[str] = set()
    for i, p in enumerate(profiles):
        where = f"{source}: profiles[{i}]"
        if not isinstance(p, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {p!r}")
        name = p.get("schedulerName", DEFAULT_SCHEDULER)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: schedulerName {name!r} is not a non-empty string")
        if name in seen:
            raise ConfigError(f"{where}: duplicate schedulerName {name!r}")
        seen.add(name)
        pc = ProfileConfig(name, _percentage(p.get("percentageOfNodesToScore"),
                                             f"{where} ({name}): percentageOfNodesToScore"))
        plugins = p.get("plugins") or {}
        if not isinstance(plugins, Mapping):
            raise ConfigError(f"{where} ({name}): plugins must be a mapping of extension points")
        for point, ps in plugins.items():
            if point != "multiPoint" and point not in POINTS:
                known = ", ".join(["multiPoint", *POINTS])
                raise ConfigError(f"{where} ({name}): extension point {point!r} is not supported (known: {known})")
            pc.plugins[point] = _plugin_set(ps, f"{where} ({name}).plugins.{point}")
        for j, entry in enumerate(p.get("pluginConfig") or []):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
                raise ConfigError(f"{where} ({name}).pluginConfig[{j}]: expected {{name: ..., args: ...}}")
            if entry["name"] in pc.plugin_config:
                raise ConfigError(f"{where} ({name}).pluginConfig[{j}]: duplicate config for plugin {entry['name']!r}")
            args = entry.get("args") or {}
            if not isinstance(args, Mapping):
                raise ConfigError(f"{where} ({name}).pluginConfig[{j}] ({entry['name']}): args must be a mapping")
            pc.plugin_config[entry["name"]] = {k: v for k, v in args.items() if k not in ("apiVersion", "kind")}
        cfg.profiles.append(pc)
    return cfg


def load_config(path: str) -> SchedulerConfig:
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not YAML: {e}") from e
    return parse_config(doc, f"--config {path}")


# --- building and running ---------------------------------------------------------------------


@dataclass
class Profile:
    """One profile's plugins per extension point (upstream frameworkImpl)."""

    name: str
    percentage_of_nodes_to_score: int | None
    pre_filter: list[Any] = field(default_factory=list)
    filter: list[Any] = field(default_factory=list)
    pre_score: list[Any] = field(default_factory=list)
    score: list[Any] = field(default_factory=list)
    reserve: list[Any] = field(default_factory=list)
    pre_bind: list[Any] = field(default_factory=list)
    weights: dict[str, int] = field(default_factory=dict)
    plugins: dict[str, Any] = field(default_factory=dict)

    def events_for(self, plugin: str) -> Iterable[ClusterEvent]:
        """The events a rejecting plugin registered; a plugin without EnqueueExtensions is moved
        by any event (upstream treats it as registering all events)."""
        p = self.plugins.get(plugin)
        reg = getattr(p, "events_to_register", None)
        if p is None or reg is None:
            return (ClusterEvent("*", "All"),)
        return tuple(reg())

    def run_pre_filter(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]
                       ) -> tuple[PreFilterResult | None, Status, set[str]]:
        """upstream RunPreFilterPlugins: the merged node set, the first failure, and the plugins
        that narrowed or rejected (for the absent-nodes reason and the queue's event matching)."""
        result: PreFilterResult | None = None
        narrowed: list[str] = []
        for pl in self.pre_filter:
            try:
                r, st = pl.pre_filter(state, pod, nodes)
            except Exception as e:  # a plugin bug is the pod's error, not the loop's
                _log.exception("PreFilter plugin %s failed on pod %s", pl.name, pod.key)
                return None, error(str(e)).with_plugin(pl.name), set()
            if st.code == Code.SKIP:
                state.skip_filter.add(pl.name)
                continue
            if not st.ok:
                st = st.with_plugin(pl.name)
                return None, st, {pl.name} if st.rejected else set()
            if r is not None and r.node_names is not None:
                narrowed.append(pl.name)
                result = r if result is None or result.node_names is None else \
                    PreFilterResult(result.node_names & r.node_names)
                if not result.node_names:
                    msg = (f"node(s) didn't satisfy plugin(s) [{' '.join(narrowed)}] simultaneously"
                           if len(narrowed) > 1 else f"node(s) didn't satisfy plugin {narrowed[0]}")
                    return None, Status(Code.UNSCHEDULABLE, (msg,)), set(narrowed)
        return result, Status(), set(narrowed)

    def run_filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        """upstream RunFilterPlugins: the first non-success, tagged with its plugin. (The hot
        path: plugins should return the shared ``framework.SUCCESS``.)"""
        skip = state.skip_filter
        for pl in self.filter:
            if skip and pl.name in skip:
                continue
            try:
                st = pl.filter(state, pod, node)
            except Exception as e:  # a plugin bug is the pod's error, not the loop's
                _log.exception("Filter plugin %s failed on pod %s node %s", pl.name, pod.key, node.name)
                return error(str(e)).with_plugin(pl.name)
            if st is not SUCCESS and st.code != Code.SUCCESS:
                out: Status = st.with_plugin(pl.name)
                return out
        return SUCCESS

    @staticmethod
    def _run_each(point: str, plugins: list[Any], call: Any, pod: PodInfo,
                  skipped: set[str] | None = None) -> Status:
        """Run one extension point's plugins in order: the first non-success (tagged with its
        plugin) ends it; a plugin that raises is that error; SKIP (where ``skipped`` is given,
        PreScore) records the plugin as skipped for the next point."""
        for pl in plugins:
            try:
                st = call(pl)
            except Exception as e:  # a plugin bug (or a failed write) is the pod's error, not the loop's
                _log.exception("%s plugin %s failed on pod %s", point, pl.name, pod.key)
                return error(str(e)).with_plugin(pl.name)
            if skipped is not None and st.code == Code.SKIP:
                skipped.add(pl.name)
                continue
            if not st.ok:
                out: Status = st.with_plugin(pl.name)
                return out
        return Status()

    def pod_filters(self, state: CycleState, pod: PodInfo) -> list[tuple[str, Callable[[NodeInfo], Status]]]:
        """The Filter plugins to run for ``pod``, each as a function of the node: those PreFilter
        did not SKIP, compiled by ``filter_fn`` where the plugin has it (left out when it answers
        None: it would pass every node), else ``filter`` with state and pod bound."""
        skip = state.skip_filter
        out: list[tuple[str, Callable[[NodeInfo], Status]]] = []
        for pl in self.filter:
            if skip and pl.name in skip:
                continue
            compile_ = getattr(pl, "filter_fn", None)
            if compile_ is None:
                out.append((pl.name, functools.partial(pl.filter, state, pod)))
                continue
            fn = compile_(state, pod)
            if fn is not None:
                out.append((pl.name, fn))
        return out

    def run_pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status:
        return self._run_each("PreScore", self.pre_score, lambda pl: pl.pre_score(state, pod, nodes), pod,
                              state.skip_score)

    def run_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> tuple[dict[str, int], Status]:
        """upstream RunScorePlugins: per plugin score, NormalizeScore, range check, weight; the
        weighted sum per node. Scores travel as lists in the nodes' order; a name -> score dict
        is built only for a plugin that normalizes (its interface) and for the result."""
        names = [n.name for n in nodes]
        totals: list[int] | None = None
        skip = state.skip_score
        for pl in self.score:
            if skip and pl.name in skip:
                continue
            vals: list[int]
            try:
                batch = getattr(pl, "score_nodes", None)
                if batch is not None:
                    vals = batch(state, pod, nodes)
                    if len(vals) != len(nodes):
                        raise ValueError(f"score_nodes gave {len(vals)} scores for {len(nodes)} nodes")
                else:
                    vals = []
                    score = pl.score
                    for n in nodes:
                        s, st = score(state, pod, n)
                        if st is not SUCCESS and st.code != Code.SUCCESS:
                            return {}, st.with_plugin(pl.name)
                        vals.append(s)
                norm = getattr(pl, "normalize_score", None)
                if norm is not None:
                    scores = dict(zip(names, vals, strict=True))
                    st = norm(state, pod, scores)
                    if not st.ok:
                        return {}, st.with_plugin(pl.name)
                    vals = [scores[name] for name in names]
            except Exception as e:  # a plugin bug is the pod's error, not the loop's
                _log.exception("Score plugin %s failed on pod %s", pl.name, pod.key)
                return {}, error(str(e)).with_plugin(pl.name)
            if vals and (min(vals) < MIN_NODE_SCORE or max(vals) > MAX_NODE_SCORE):
                bad = next(s for s in vals if not MIN_NODE_SCORE <= s <= MAX_NODE_SCORE)
                return {}, error(f"plugin {pl.name!r} returns an invalid score {bad}, it should in the range "
                                 f"of [{MIN_NODE_SCORE}, {MAX_NODE_SCORE}] after normalizing").with_plugin(pl.name)
            w = self.weights.get(pl.name, 1)
            if totals is None:
                totals = vals if w == 1 else [s * w for s in vals]
            elif w == 1:
                totals = list(map(operator.add, totals, vals))
            else:
                totals = [t + s * w for t, s in zip(totals, vals, strict=True)]
        return dict(zip(names, totals if totals is not None else [0] * len(nodes), strict=True)), Status()

    def run_reserve(self, state: CycleState, pod: PodInfo, node: str) -> Status:
        return self._run_each("Reserve", self.reserve, lambda pl: pl.reserve(state, pod, node), pod)

    def run_unreserve(self, state: CycleState, pod: PodInfo, node: str) -> None:
        for pl in reversed(self.reserve):
            try:
                pl.unreserve(state, pod, node)
            except Exception:  # every plugin gets its Unreserve
                _log.exception("Unreserve of plugin %s failed for pod %s", pl.name, pod.key)

    def run_pre_bind(self, state: CycleState, pod: PodInfo, node: str) -> Status:
        return self._run_each("PreBind", self.pre_bind, lambda pl: pl.pre_bind(state, pod, node), pod)


def resolve_plugins(pc: ProfileConfig, registry: Mapping[str, type]) -> dict[str, list[tuple[str, int | None]]]:
    """Per extension point, the plugin names (and weights) this profile enables, after upstream's
    merge: the built-in multiPoint set, then the user's multiPoint additions, minus what is
    disabled (``*``: all the defaults) at multiPoint or at the point, then the point's own
    enabled list (which may re-weigh a plugin in place)."""
    defaults = list(builtin_plugins(pc.scheduler_name))
    mp = pc.plugins.get("multiPoint", PluginSet())
    if "*" in mp.disabled:
        defaults = []
    defaults = [(n, w) for n, w in defaults if n not in mp.disabled]
    user_mp = list(mp.enabled)
    out: dict[str, list[tuple[str, int | None]]] = {}
    for point in POINTS:
        ps = pc.plugins.get(point, PluginSet())
        chosen: list[tuple[str, int | None]] = []
        for is_default, (n, w) in [*((True, d) for d in defaults), *((False, u) for u in user_mp)]:
            if is_default and ("*" in ps.disabled or n in ps.disabled):
                continue
            if not is_default and n in ps.disabled:
                continue
            cls = registry.get(n)
            if cls is None:
                if is_default:
                    continue  # reported once by build_profiles
                raise ConfigError(f"profile {pc.scheduler_name!r}: plugin {n!r} (multiPoint) is not registered; "
                                  f"known plugins: {', '.join(sorted(registry)) or '(none)'}")
            if all(m in vars_of(cls) for m in POINTS[point]):
                chosen = [c for c in chosen if c[0] != n]
                chosen.append((n, w))
        for n, w in ps.enabled:
            cls = registry.get(n)
            if cls is None:
                raise ConfigError(f"profile {pc.scheduler_name!r}: plugin {n!r} ({point}) is not registered; "
                                  f"known plugins: {', '.join(sorted(registry)) or '(none)'}")
            if not all(m in vars_of(cls) for m in POINTS[point]):
                raise ConfigError(f"profile {pc.scheduler_name!r}: plugin {n!r} does not implement {point} "
                                  f"(it has no {'/'.join(POINTS[point])} method)")
            idx = next((i for i, c in enumerate(chosen) if c[0] == n), None)
            if idx is None:
                chosen.append((n, w))
            else:
                chosen[idx] = (n, w if w is not None else chosen[idx][1])
        out[point] = chosen
    return out


def vars_of(cls: type) -> set[str]:
    """The callable attributes of a plugin class (inherited ones included)."""
    return {k for k in dir(cls) if not k.startswith("__") and callable(getattr(cls, k, None))}


def build_profiles(cfg: SchedulerConfig, handle: Handle, registry: Mapping[str, type] | None = None
                   ) -> dict[str, Profile]:
    """Instantiate every profile's plugins (one instance per plugin per profile)."""
    if registry is None:
        from scheduler.plugins import REGISTRY

        registry = REGISTRY
    out: dict[str, Profile] = {}
    for pc in cfg.profiles:
        missing = [n for n, _ in builtin_plugins(pc.scheduler_name) if n not in registry]
        if missing:
            _log.warning("profile %s: built-in plugin(s) %s not registered; running without them",
                         pc.scheduler_name, ", ".join(missing))
        per_point = resolve_plugins(pc, registry)
        pct = pc.percentage_of_nodes_to_score
        prof = Profile(pc.scheduler_name, pct if pct is not None else cfg.percentage_of_nodes_to_score)
        enabled = {n for lst in per_point.values() for n, _ in lst}
        for name in pc.plugin_config:
            if name not in enabled:
                _log.warning("profile %s: pluginConfig for %s, which is not enabled", pc.scheduler_name, name)
        for name in sorted(enabled):
            cls = registry[name]
            try:
                inst = cls(handle, dict(pc.plugin_config.get(name, {})))
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(f"profile {pc.scheduler_name!r}: plugin {name!r} rejected its args "
                                  f"{dict(pc.plugin_config.get(name, {}))!r}: {e}") from e
            prof.plugins[name] = inst
        for point, lst in per_point.items():
            attr = {"preFilter": "pre_filter", "preScore": "pre_score", "preBind": "pre_bind"}.get(point, point)
            setattr(prof, attr, [prof.plugins[n] for n, _ in lst])
            if point == "score":
                for n, w in lst:
                    prof.weights[n] = w if w else 1
        out[pc.scheduler_name] = prof
    return out
