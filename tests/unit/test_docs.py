"""The documentation's examples are real: README's topology block and every examples/*.yaml
file pass the same validation `lab up` and the reflector apply."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fabric import topology

REPO = Path(__file__).resolve().parents[2]


def test_readme_topology_block_is_valid() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "clusters:" in b]
    assert blocks, "README has no topology example"
    for b in blocks:
        topology.parse(yaml.safe_load(b), "README.md")


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_topologies_are_valid(path: Path) -> None:
    t = topology.load(path)
    assert t.clusters
