"""The two distributions: the production wheel (agent, reflector, add-ons) never ships the lab,
fabric-tool or the Kubernetes emulator; kosmos-fabric-lab ships exactly those (issue 14)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _wheel(project: Path, out: Path) -> zipfile.ZipFile:
    """Build ``project``'s wheel into ``out``; setuptools' own build/ folder is removed again
    unless it was there before (the source tree stays as it was)."""
    build = project / "build"
    existed = build.exists()
    try:
        return _build(project, out)
    finally:
        if not existed:
            shutil.rmtree(build, ignore_errors=True)


def _build(project: Path, out: Path) -> zipfile.ZipFile:
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "--wheel-dir", str(out)]
    p = subprocess.run([*argv, str(project)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and "No module named pip" in p.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _top_packages(z: zipfile.ZipFile) -> set[str]:
    return {n.split("/", 1)[0] for n in z.namelist() if "/" in n and ".dist-info/" not in n}


def _metadata(z: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
    return z.read(path).decode()


def test_production_wheel_holds_only_the_fabric_and_its_add_ons(tmp_path: Path) -> None:
    z = _wheel(REPO, tmp_path)
    assert _top_packages(z) == {"fabric", "tree", "scheduler", "mcs"}
    scripts = _metadata(z, "entry_points.txt")
    assert "fabric-agent" in scripts and "fabric-reflector" in scripts
    assert "fabric-tool" not in scripts
    requires = [line for line in _metadata(z, "METADATA").splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert not [r for r in runtime if "aiohttp" in r or "scapy" in r], runtime  # the lab's, not ours


def test_lab_wheel_holds_the_lab_the_tool_and_the_emulator(tmp_path: Path) -> None:
    z = _wheel(REPO / "packaging" / "lab", tmp_path)
    assert _top_packages(z) == {"tools", "kubeemu"}
    assert "fabric-tool = tools.cli:main" in _metadata(z, "entry_points.txt")
    assert "Requires-Dist: kosmos-fabric==" in _metadata(z, "METADATA")
