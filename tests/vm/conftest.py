"""The VM tier's fixture: three Debian 12 VMs from vagrant/settings.yaml, brought up once per
session with ``fabric-tool vm up`` and always taken down (``vm down``), then checked to leave
no qemu process, namespace or overlay behind.

The tier runs only on request (``FABRIC_VM_TIER=1``: it costs minutes, see vagrant/README.md)
and is skipped with the reason where it cannot run: not root, no qemu, no image and no
mmdebstrap to build one, no /dev/net/tun.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.vm import image as imagemod
from tools.vm import runner

REPO = Path(__file__).resolve().parents[2]
NAME = "kfvmtest"


def why_not() -> str | None:
    if os.environ.get("FABRIC_VM_TIER") != "1":
        return "the VM tier runs on request: FABRIC_VM_TIER=1 (it boots 3 qemu VMs: minutes, see vagrant/README.md)"
    if os.geteuid() != 0:
        return "the VM tier needs root (network namespaces, tap devices, the image build)"
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        return "qemu is not installed (Debian packages qemu-system-x86, qemu-utils)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun: qemu cannot make the VMs' tap devices"
    if imagemod.cached() is None and imagemod.missing_tools():
        return "no cached VM image and cannot build one: needs " + ", ".join(imagemod.missing_tools())
    return None


@pytest.fixture(scope="session")
def vmenv() -> Iterator[runner.VMState]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    # An environment of this name left by a run that was killed (or by a worker the watchdog
    # ended, whose replacement comes here again) is ours: removed before a fresh one is made.
    runner.down(NAME)
    t0 = time.monotonic()
    started: list[runner.VMRecord] = []
    try:
        st = runner.up(REPO / "vagrant" / "settings.yaml", NAME, grace_period_s=30.0)
        started = list(st.vms)
        print(f"\nvm up: {time.monotonic() - t0:.0f} s", file=sys.stderr)
        yield st
    finally:
        loaded = runner.load_state(NAME)
        started = started or (list(loaded.vms) if loaded else [])
        t1 = time.monotonic()
        runner.down(NAME)
        assert not [v.name for v in started if v.running()], "vm down left qemu processes"
        print(f"\nvm down: {time.monotonic() - t1:.1f} s", file=sys.stderr)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        assert f"kfvm-{NAME}" not in left, "vm down left its namespace"
        assert not (runner.STATE_ROOT / NAME).exists(), "vm down left its state directory (overlays)"
