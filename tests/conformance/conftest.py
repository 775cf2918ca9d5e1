"""Conformance suite for kubeemu: real clients against emulated clusters on 127.0.0.1.

Every test here is marked ``conformance`` (registered below, so ``--strict-markers`` holds) and
needs no root: servers are ``ServerThread`` instances on ephemeral loopback ports, started by
the fixtures and stopped at the end of the session.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeemu.lab import write_kubeconfig
from kubeemu.runner import ServerThread
from tests.kubelet_doubles import KUBECTL, Kubectl

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "conformance: kubeemu against real Kubernetes clients; no root")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "conformance" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.conformance)


@pytest.fixture(scope="session")
def emu() -> Iterator[ServerThread]:
    """One emulated cluster for the session (bookmarks every 0.3 s so the test is quick)."""
    with ServerThread(name="conformance", service_cidrs=("10.96.0.0/24",), bookmark_interval=0.3) as s:
        yield s


@pytest.fixture(scope="session")
def api(emu: ServerThread) -> Iterator[Any]:
    cfg = client.Configuration()
    cfg.host = emu.url
    with client.ApiClient(cfg) as c:
        yield c


@pytest.fixture
def v1(api: Any) -> Any:
    return client.CoreV1Api(api)


@pytest.fixture
def ns(v1: Any) -> Iterator[str]:
    """A fresh namespace per test (deleted afterwards; the cascade removes its content)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    v1.create_namespace({"metadata": {"name": name}})
    yield name
    try:
        v1.delete_namespace(name)
    except client.ApiException as e:
        if e.status != 404:
            raise


class Raw:
    """Plain HTTP against the emulator, for what the typed clients hide (status codes, streams)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def request(self, method: str, path: str, body: Any = None, ctype: str = "application/json",
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": ctype, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw.strip().startswith(b"{") else raw
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stream(self, path: str, timeout: float = 10) -> list[dict[str, Any]]:
        """Read a watch until the server closes it; returns the events."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return [json.loads(line) for line in r.read().splitlines() if line.strip()]


@pytest.fixture
def raw(emu: ServerThread) -> Raw:
    return Raw(emu.url)


@pytest.fixture
def kubectl(emu: ServerThread, tmp_path: Path) -> Kubectl:
    """:class:`Kubectl` for this test; the test is skipped where there is no kubectl binary."""
    if KUBECTL is None:
        pytest.skip("no kubectl binary on PATH (install one from Debian to run this test)")
    return Kubectl(KUBECTL, write_kubeconfig(tmp_path / "kubeconfig", {"emu": emu.url}), tmp_path / "cache")



@pytest.fixture
def mkpod() -> Any:
    """Build a minimal valid Pod body: ``mkpod("name", app="x")``."""

    def build(name: str, **labels: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}

    return build
