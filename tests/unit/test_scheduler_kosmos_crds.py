"""The scheduler's policy CRDs (deploy/scheduler/crds: Kosmos' DistributionPolicy,
ClusterDistributionPolicy and release-k8s1.21 WorkloadPolicy, unchanged) load into the
emulator with kubectl, Kosmos' own sample manifests apply against them, and the schema refuses
what a real API server refuses (an unknown nodeType, a missing required field, a wrong type).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubeemu.runner import ServerThread
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "deploy" / "scheduler" / "crds"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

# Kosmos' docs/proposals/distributionpolicy samples and examples/workloadpolicy-example.yaml
# (release-k8s1.21), as published.
KOSMOS_SAMPLES = """\
apiVersion: kosmos.io/v1alpha1
kind: DistributionPolicy
metadata:
  name: kosmos-node-distribution-policy
  namespace: test-name-scope
spec:
  resourceSelectors:
    - name: busybox
      policyName: leaf
    - namePrefix: busybox-prefix
      policyName: host
    - labelSelector:
        matchLabels:
          example-distribution-policy: busybox
      policyName: mix
  policyTerms:
  - name: host
    nodeType: host
  - name: leaf
    nodeType: leaf
  - name: mix
    nodeType: mix
  - name: adv
    nodeType: adv
    advancedTerm:
      nodeSelector:
        advNode: "true"
---
apiVersion: kosmos.io/v1alpha1
kind: ClusterDistributionPolicy
metadata:
  name: kosmos-node-cluster-distribution-policy
spec:
  resourceSelectors:
    - name: cluster-busybox
      policyName: leaf
    - namePrefix: cluster-busybox-prefix
      policyName: host
    - labelSelector:
        matchLabels:
          example-distribution-policy: cluster-busybox
      policyName: mix
  policyTerms:
  - name: host
    nodeType: host
  - name: leaf
    nodeType: leaf
  - name: mix
    nodeType: mix
  - name: adv
    nodeType: adv
    advancedTerm:
      nodeName: kosmos-member2-cluster-1
---
apiVersion: kosmos.io/v1alpha1
kind: WorkloadPolicy
metadata:
  name: workload-policy-test
  namespace: workload-test
spec:
  allocationPolicy:
    - name: member
      replicas: 1
    - name: host
      replicas: 3
  labelSelector:
    matchLabels:
      app: clusterlink-floater-mix
  allocationType: "Required"
  allocationMethod: "Fill"
  topologyKey: workload-test
"""


def kubectl(server: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "--server", server, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def emu() -> Iterator[ServerThread]:
    if not Path(KUBECTL).exists():
        pytest.skip("kubectl not installed")
    with ServerThread(name="kosmos-crds", service_cidrs=("10.96.0.0/24",), bookmark_interval=0.3) as s:
        p = kubectl(s.url, "apply", "-f", str(CRDS))
        assert p.returncode == 0, p.stderr
        for ns in ("test-name-scope", "workload-test"):
            assert kubectl(s.url, "create", "namespace", ns).returncode == 0

        def served() -> bool:
            out = kubectl(s.url, "api-resources", "--api-group=kosmos.io", "-o", "name").stdout.split()
            return {"distributionpolicies.kosmos.io", "clusterdistributionpolicies.kosmos.io",
                    "workloadpolicies.kosmos.io"} <= set(out)

        wait_until(served, 30, "the three kosmos.io policy resources to be served")
        yield s


def test_crds_are_kosmos_own_and_name_the_three_kinds() -> None:
    docs = {d["spec"]["names"]["kind"]: d
            for f in sorted(CRDS.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())}
    assert sorted(docs) == ["ClusterDistributionPolicy", "DistributionPolicy", "WorkloadPolicy"]
    assert docs["DistributionPolicy"]["spec"]["scope"] == "Namespaced"
    assert docs["ClusterDistributionPolicy"]["spec"]["scope"] == "Cluster"
    assert docs["WorkloadPolicy"]["spec"]["scope"] == "Namespaced"
    for d in docs.values():
        assert d["spec"]["group"] == "kosmos.io"
        assert [v["name"] for v in d["spec"]["versions"]] == ["v1alpha1"]


def test_kosmos_sample_manifests_apply_unchanged(emu: ServerThread) -> None:
    p = kubectl(emu.url, "apply", "-f", "-", stdin=KOSMOS_SAMPLES)
    assert p.returncode == 0, p.stderr
    assert "distributionpolicy.kosmos.io/kosmos-node-distribution-policy created" in p.stdout
    got = kubectl(emu.url, "get", "dp", "-n", "test-name-scope", "kosmos-node-distribution-policy", "-o",
                  "jsonpath={.spec.policyTerms[3].advancedTerm.nodeSelector.advNode}")
    assert got.returncode == 0 and got.stdout == "true", got.stderr
    got = kubectl(emu.url, "get", "cdp", "kosmos-node-cluster-distribution-policy", "-o",
                  "jsonpath={.spec.resourceSelectors[1].namePrefix}")
    assert got.stdout == "cluster-busybox-prefix", got.stderr
    got = kubectl(emu.url, "get", "wlp", "-n", "workload-test", "workload-policy-test", "-o",
                  "jsonpath={.spec.allocationPolicy[1].replicas}")
    assert got.stdout == "3", got.stderr


@pytest.mark.parametrize(("doc", "expect"), [
    ("""apiVersion: kosmos.io/v1alpha1
kind: DistributionPolicy
metadata: {name: bad-node-type, namespace: test-name-scope}
spec:
  resourceSelectors: [{name: x, policyName: p}]
  policyTerms: [{name: p, nodeType: cloud}]
""", 'Unsupported value: "cloud"'),
    ("""apiVersion: kosmos.io/v1alpha1
kind: ClusterDistributionPolicy
metadata: {name: no-terms}
spec:
  resourceSelectors: [{name: x, policyName: p}]
""", "spec.policyTerms: Required value"),
    ("""apiVersion: kosmos.io/v1alpha1
kind: DistributionPolicy
metadata: {name: selector-without-policy, namespace: test-name-scope}
spec:
  resourceSelectors: [{name: x}]
  policyTerms: [{name: p}]
""", "policyName: Required value"),
    ("""apiVersion: kosmos.io/v1alpha1
kind: WorkloadPolicy
metadata: {name: bad-type, namespace: workload-test}
spec:
  topologyKey: kosmos.io/cluster
  labelSelector: {matchLabels: {app: a}}
  allocationPolicy: [{name: a, replicas: 1}]
  allocationType: Sometimes
""", 'Unsupported value: "Sometimes"'),
    ("""apiVersion: kosmos.io/v1alpha1
kind: WorkloadPolicy
metadata: {name: string-replicas, namespace: workload-test}
spec:
  topologyKey: kosmos.io/cluster
  labelSelector: {}
  allocationPolicy: [{name: a, replicas: "three"}]
""", "replicas: Invalid value"),
], ids=["unknown-nodeType", "missing-policyTerms", "missing-policyName", "unknown-allocationType",
        "replicas-not-integer"])
def test_schema_refuses_bad_policies(emu: ServerThread, doc: str, expect: str) -> None:
    p = kubectl(emu.url, "create", "-f", "-", stdin=doc)
    assert p.returncode != 0, p.stdout
    assert expect in p.stderr, p.stderr
