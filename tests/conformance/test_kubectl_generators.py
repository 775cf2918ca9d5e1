"""kubectl's generator commands against kubeemu: their typed clients send protobuf bodies.

Each command runs twice: ``--dry-run=client -o json`` prints the object kubectl builds (no
server involved), then for real; the stored object must carry everything kubectl built (the
server adds metadata and defaults). That proves the protobuf decoding field by field through
the real client rather than against our own encoder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubeemu.lab import write_kubeconfig
from kubeemu.runner import ServerThread

KUBECTL = shutil.which("kubectl")


@pytest.fixture
def kubectl(emu: ServerThread, tmp_path: Path) -> Any:
    if KUBECTL is None:
        pytest.skip("no kubectl binary on PATH")
    cfg = write_kubeconfig(tmp_path / "kubeconfig", {"emu": emu.url})

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([KUBECTL, "--kubeconfig", str(cfg), *args], capture_output=True, text=True, timeout=60)
        if ok:
            assert p.returncode == 0, f"kubectl {' '.join(args)}: {p.stderr}"
        return p

    return run


def _contains(stored: Any, built: Any, where: str = "") -> None:
    """Every field kubectl built is in the stored object with the same value."""
    if isinstance(built, dict):
        assert isinstance(stored, dict), f"{where}: stored {stored!r}, kubectl built {built!r}"
        for k, v in built.items():
            if (k == "creationTimestamp" and v is None) or (where == "" and k == "status"):
                continue  # kubectl sends null, the server sets it; status is reset on create
            assert k in stored, f"{where}.{k} missing from the stored object {stored!r}"
            _contains(stored[k], v, f"{where}.{k}")
    elif isinstance(built, list):
        assert isinstance(stored, list) and len(stored) == len(built), f"{where}: {stored!r} vs {built!r}"
        for i, (s, b) in enumerate(zip(stored, built, strict=True)):
            _contains(s, b, f"{where}[{i}]")
    else:
        assert stored == built, f"{where}: stored {stored!r}, kubectl built {built!r}"


@pytest.mark.parametrize(
    "args, resource",
    [
        (["create", "configmap", "cm1", "--from-literal=a=b", "--from-literal=c=d"], "configmap/cm1"),
        (["create", "secret", "generic", "s1", "--from-literal=pw=s3cr3t", "--type=Opaque"], "secret/s1"),
        (
            [
                "create",
                "deployment",
                "web",
                "--image=busybox",
                "--replicas=2",
                "--port=8080",
                "--",
                "python3",
                "-m",
                "http.server",
                "8080",
            ],
            "deployment/web",
        ),
        (["create", "service", "clusterip", "svc1", "--tcp=80:8080", "--tcp=443:web"], "service/svc1"),
        (
            ["run", "p1", "--image=busybox", "--labels=app=p1", "--env=A=1", "--port=80", "--", "sleep", "3600"],
            "pod/p1",
        ),
    ],
)
def test_generator_commands(kubectl: Any, ns: str, args: list[str], resource: str) -> None:
    built = json.loads(kubectl("-n", ns, "--dry-run=client", "-o", "json", *args).stdout)
    out = kubectl("-n", ns, *args)
    assert "created" in out.stdout
    stored = json.loads(kubectl("get", resource, "-n", ns, "-o", "json").stdout)
    built["metadata"]["namespace"] = ns
    _contains(stored, built)


def test_create_namespace_expose_and_delete(kubectl: Any, ns: str) -> None:
    name = ns + "-x"
    assert kubectl("create", "namespace", name).stdout.strip() == f"namespace/{name} created"
    assert json.loads(kubectl("get", "ns", name, "-o", "json").stdout)["status"]["phase"] == "Active"
    kubectl("delete", "namespace", name)
    kubectl("create", "deployment", "d", "--image=busybox", "-n", ns)
    assert "exposed" in kubectl("expose", "deployment", "d", "--port=81", "--target-port=8081", "-n", ns).stdout
    svc = json.loads(kubectl("get", "svc", "d", "-n", ns, "-o", "json").stdout)
    assert svc["spec"]["selector"] == {"app": "d"}
    assert svc["spec"]["ports"][0]["port"] == 81 and svc["spec"]["ports"][0]["targetPort"] == 8081
