"""Test tiers and shared fixtures.

Tiers are markers: ``unit`` (no root), ``privileged`` (real kernel in throwaway network
namespaces) and ``lab`` (end to end through ``fabric-tool lab``). Tests under
``tests/privileged`` and ``tests/lab`` get their marker automatically; both tiers are skipped,
with the reason, when not running as root.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "privileged" in parts:
            item.add_marker(pytest.mark.privileged)
        elif "lab" in parts:
            item.add_marker(pytest.mark.lab)
        elif "unit" in parts:
            item.add_marker(pytest.mark.unit)
        if not IS_ROOT and (item.get_closest_marker("privileged") or item.get_closest_marker("lab")):
            item.add_marker(pytest.mark.skip(reason="needs root: creates network namespaces"))


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace (loopback up), deleted afterwards with all it holds."""
    name = f"kft-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
