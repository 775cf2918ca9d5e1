"""Helpers the unit tests of the lab tooling (``tools.lab``) share: a lab root of the test's own
(:func:`lab_root`) and topology files written from text (:func:`load_topology`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric import topology
from tools import lab


@pytest.fixture
def lab_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tools.lab.state.LAB_ROOT`` under ``tmp_path``: a test's labs never meet the machine's."""
    root = tmp_path / "labs"
    monkeypatch.setattr(lab.state, "LAB_ROOT", root)
    return root


def load_topology(tmp_path: Path, text: str, name: str = "t.yaml") -> topology.TopologyFile:
    """``text`` written to ``tmp_path/name`` and loaded as a topology file (as ``lab up`` does)."""
    p = tmp_path / name
    p.write_text(text)
    return topology.load(p)
