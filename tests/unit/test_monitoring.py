"""deploy/monitoring: the Grafana dashboard and the Prometheus scrape config load, and every
metric the dashboard queries is one the agent or the reflector really exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import prometheus_client
import yaml
from prometheus_client.core import Metric

from fabric import health, types
from fabric.agent import xlate_metrics
from fabric.control import reflector

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
_PROMQL_WORDS = {"sum", "by", "rate", "increase", "max", "min", "histogram_quantile", "le", "without", "avg"}


def _base(name: str) -> str:
    for s in _SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _families(metrics: Iterable[Metric]) -> set[str]:
    return {_base(m.name) for m in metrics}


def exported_metric_names() -> set[str]:
    """Every metric family the agent and the reflector can export, samples or not."""
    assert health.AgentMetrics.reconcile_duration is not None  # the agent's metrics are registered
    names = _families(prometheus_client.REGISTRY.collect())
    # Collectors whose families appear only at scrape time, with data.
    names |= _families(xlate_metrics.TranslationCollector("none", Path("/nonexistent")).describe())
    config = types.FabricConfig(clusters=(types.ClusterConfig("east", types.ClusterMode.P2P, ("10.10.0.0/16",)),))
    names |= _families(reflector.Reflector(config).collector().collect())
    return names


def dashboard_metrics() -> set[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    found = set()
    for e in exprs:
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r"\[[^\]]*\]|\"[^\"]*\"", "", e)):
            if word.startswith("fabric_"):
                found.add(_base(word))
            else:
                assert word in _PROMQL_WORDS or word in {"table", "errno", "cluster", "role", "direction", "global",
                                                          "reason", "kind"}, f"unexpected word {word!r} in {e!r}"
    return found


def test_every_dashboard_metric_is_exported() -> None:
    missing = dashboard_metrics() - exported_metric_names()
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"


def test_dashboard_covers_both_components() -> None:
    used = dashboard_metrics()
    assert any(m.startswith("fabric_agent_") for m in used)
    assert any(m.startswith("fabric_reflector_") for m in used)


def test_scrape_config_targets_both_components() -> None:
    doc = yaml.safe_load((MONITORING / "prometheus-scrape.yaml").read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert set(jobs) == {"kosmos-fabric-agent", "kosmos-fabric-reflector", "kosmos-mcs", "kosmos-tree",
                         "kosmos-scheduler"}
    for job in jobs.values():
        assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
        actions = [r.get("action", "replace") for r in job["relabel_configs"]]
        assert actions.count("keep") == 2


def test_scrape_config_selects_the_pods_the_manifests_run() -> None:
    """The keep rules name the app labels of the agent DaemonSet and the reflector Deployment."""
    apps = set()
    for f in (REPO / "deploy" / "base").rglob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in ("DaemonSet", "Deployment"):
                apps.add(doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"])
    doc = yaml.safe_load((MONITORING / "prometheus-scrape.yaml").read_text())
    for job in doc["scrape_configs"]:
        label_rule = next(r for r in job["relabel_configs"]
                          if r["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"])
        assert label_rule["regex"] in apps, (job["job_name"], label_rule["regex"], apps)
