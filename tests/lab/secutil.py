"""Helpers of the lab tests of the control channel's security (issue 20): connect to a lab's
reflector with a given certificate and see what it answers, and read what the agents logged.

Used by tests/lab/test_security_e2e.py (a plain lab) and tests/lab/test_install_e2e.py (a
``kubernetes: true`` lab, where the real ``fabric-tool unjoin`` revokes a cluster).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path

from fabric import types
from fabric.control import api, client, tls
from tools.lab.state import LabState


def reflector_target(state: LabState) -> str:
    """The lab reflector's unix socket, as a gRPC target (the lab's own tools use it too)."""
    return f"unix:{state.reflector_socket}"


@dataclasses.dataclass(frozen=True)
class Rejection:
    """One ``Rejected`` a session heard: its text and the class of each refusal in it."""

    text: str
    classes: tuple[api.RejectionReason, ...]


class _Handler:
    """What a test client's session hears (it never applies anything)."""

    def __init__(self) -> None:
        self.session: client.AgentSession | None = None
        self.rejected: list[Rejection] = []
        self.snapshots = 0

    async def on_snapshot(self, state: types.NodeState, version: int) -> None:
        self.snapshots += 1

    async def on_delta(self, delta: types.StateDelta, version: int) -> None:
        pass

    async def on_connection(self, connected: bool, reason: str) -> None:
        pass

    async def on_rejected(self, reason: str) -> None:
        assert self.session is not None
        self.rejected.append(Rejection(reason, self.session.rejected_for))


def announce_once(target: str, tls_dir: tls.TLSDir, ann: types.NodeAnnouncement) -> list[Rejection]:
    """Run a SyncNode session announcing ``ann`` with the certificate in ``tls_dir`` until its
    first rejection (20 s at most); the rejections heard. Fails the test if the reflector
    admitted it instead (sent a snapshot)."""
    handler = _Handler()

    async def body() -> None:
        session = client.AgentSession(target, ann, handler, keepalive_interval=1.0, backoff=(0.2, 0.5),
                                      tls_dir=tls_dir)  # fmt: skip
        handler.session = session
        task = asyncio.create_task(session.run())
        try:
            async with asyncio.timeout(20):
                while not handler.rejected and handler.snapshots == 0:
                    await asyncio.sleep(0.05)
        finally:
            await session.close()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(body())
    assert handler.snapshots == 0, f"{ann.key} was admitted"
    return handler.rejected


def sessions_established(log: str | Path) -> int:
    """How many sessions to the reflector an agent's log says it established."""
    return len(re.findall(r"session to reflector \S+ established", Path(log).read_text(errors="replace")))
