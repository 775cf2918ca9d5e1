"""mcs.controller with failing members: a member whose API server stops, or never answered,
stops nobody else's imports nor the export status writes; its failures are logged once per
streak, counted and retried; a bug in our own code ends the controller (``crashed``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest

from kubeemu.runner import ServerThread
from mcs import kube as mk
from mcs.controller import Controller, Member
from scheduler.kube import Api
from tests.unit.test_mcs_controller import _conditions, _endpoints, _path, _serve
from tests.unit.test_mcs_kube import install_mcs_crds
from tests.waiting import wait_until

RUNNING = ("east", "west")


def _member_api() -> tuple[ServerThread, Api]:
    s = ServerThread(name="mcs-iso", bookmark_interval=0.3).start()
    api = Api(s.url)
    install_mcs_crds(api)
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    return s, api


@pytest.fixture
def clusters() -> Iterator[tuple[dict[str, Api], ServerThread]]:
    """east and west (kept running), south (the test stops it: returned apart)."""
    with contextlib.ExitStack() as stack:
        apis = {}
        for c in RUNNING:
            s, apis[c] = _member_api()
            stack.callback(s.stop)
        south, apis["south"] = _member_api()
        try:
            yield apis, south
        finally:
            if south.server is not None and not south.loop.is_closed():
                south.stop()


def test_a_dead_member_stops_nobody_else(clusters: tuple[dict[str, Api], ServerThread],
                                         caplog: pytest.LogCaptureFixture) -> None:
    apis, south_server = clusters
    # north's API server never answers (nothing listens there): passes go on without it after
    # the startup wait, and its informers keep retrying.
    with socket_closed_port() as port:
        north = Member("north", Api(f"http://127.0.0.1:{port}"))
    errors: list[tuple[str, str]] = []
    ctl = Controller([Member(c, apis[c]) for c in ("east", "west", "south")] + [north], resync_s=1.0, retry_s=0.2,
                     startup_wait_s=0.5, on_member_error=lambda c, stage: errors.append((c, stage)))
    caplog.set_level(logging.INFO, logger="mcs.controller")
    ctl.start()
    try:
        _serve(apis["east"], 1)
        for c in ("west", "south"):
            wait_until(lambda c=c: _endpoints(apis[c]) == {"east": [("10.1.0.1", True)]},  # type: ignore[misc]
                       15, f"east's endpoint in {c} while north never answers")
        assert not north.synced()

        south_server.stop()  # south's API server goes away for good
        _serve(apis["west"], 2)  # a change every member must write: south cannot
        wait_until(lambda: sorted(_endpoints(apis["east"])) == ["east", "west"], 15, "west's endpoint in east")
        wait_until(lambda: _conditions(apis["west"]).get("Valid") == ("True", "Valid"), 10,
                   "west's export status written")
        wait_until(lambda: ctl.failing().get("south"), 10, "south failing")
        wait_until(lambda: errors.count(("south", "import")) >= 3, 10, "south's writes retried and counted")
        assert {c for c, _ in errors} == {"south"}, errors
        streak = [r for r in caplog.records if r.getMessage().startswith("cluster south:")
                  and "retried every" in r.getMessage()]
        assert len(streak) == 1, [r.getMessage() for r in streak]
        assert "API server unavailable" in streak[0].getMessage()
        # Still alive: a new export of east reaches west after south died.
        apis["east"].create(_path("ServiceExport"),
                            {"apiVersion": mk.GROUP_VERSION, "kind": "ServiceExport", "metadata": {"name": "api"}})
        wait_until(lambda: _conditions_of(apis["east"], "api").get("Valid") == ("False", "ServiceNotFound"), 10,
                   "east's new export judged")
        assert not ctl.crashed.is_set()
    finally:
        ctl.stop()


def _conditions_of(api: Api, name: str) -> dict[str, tuple[str, str]]:
    ex = api.get(_path("ServiceExport", name))
    return {c["type"]: (c["status"], c["reason"]) for c in (ex.get("status") or {}).get("conditions") or []}


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A port of 127.0.0.1 nobody listens on (bound, then closed)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield port


def test_a_bug_ends_the_controller(clusters: tuple[dict[str, Api], ServerThread]) -> None:
    apis, _ = clusters

    def broken(cluster: str) -> list[str]:
        raise KeyError(f"bug for {cluster}")

    ctl = Controller([Member(c, apis[c]) for c in ("east", "west", "south")], unreachable=broken, resync_s=0.2)
    ctl.start()
    try:
        wait_until(ctl.crashed.is_set, 10, "the controller ended by the bug")
        assert isinstance(ctl.error, KeyError)
    finally:
        ctl.stop()
