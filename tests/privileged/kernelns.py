"""``ip`` in a privileged test's own namespace, for the netlink tests (tests/privileged/conftest.py
has their ``dp`` fixture)."""

from __future__ import annotations

import json
import subprocess
from typing import Any


def sh(netns: str, *args: str) -> None:
    """``ip -n NETNS ARGS``; a failure raises with ip's own message."""
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


def ipj(netns: str, *args: str, tool: str = "ip") -> Any:
    """``TOOL -n NETNS -j ARGS`` decoded ([] when the kernel has nothing to list)."""
    out = subprocess.run([tool, "-n", netns, "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []
