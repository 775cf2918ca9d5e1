"""The codebase's own rules, enforced: layering (import-linter), ruff and mypy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{tool} not installed in {BIN} (./dev.sh setup installs it)")
    return subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_layering_contracts_hold() -> None:
    """fabric.netlink/fabric.bpf never import the control plane, and the reverse (pyproject.toml)."""
    p = _run("lint-imports")
    assert p.returncode == 0, p.stdout + p.stderr


def test_ruff_clean() -> None:
    p = _run("ruff", "check", "--output-format", "concise", ".")
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy_clean() -> None:
    p = _run("mypy", "fabric", "tools", "tree", "scheduler", "kubeemu")
    assert p.returncode == 0, p.stdout + p.stderr
