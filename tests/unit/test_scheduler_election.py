"""The scheduler's leader election against kubeemu (no root), step by step on a fake clock where
timing matters: client-go's timing checks (also on the command line, which knows only the Lease
lock); a candidate waits a full ``lease_duration`` of its own
clock without seeing the record change before it takes a lease over, and a renewal it sees starts
that wait again; a released lease (client-go's release record) is taken at the next try; a lease
another replica holds is not cleared by our release; the acquire loop's jitter is client-go's;
and, with real processes, ``kosmos-scheduler`` releases its lease on SIGTERM (so a second
process takes over long before the lease would lapse) and not on SIGKILL.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from scheduler.election import LeaderElector, timing_problem
from scheduler.kube import Api, ApiError
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def emu() -> Iterator[ServerThread]:
    with ServerThread(name="sched-election", bookmark_interval=0.3) as s:
        yield s


@pytest.fixture
def api(emu: ServerThread) -> Api:
    return Api(emu.url)


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _elector(api: Api, identity: str, clock: Clock, name: str, **kw: Any) -> LeaderElector:
    return LeaderElector(api, identity, name=name, clock=clock, **kw)


def _spec(api: Api, name: str) -> dict[str, Any]:
    lease: dict[str, Any] = api.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{name}")
    spec: dict[str, Any] = lease["spec"]
    return spec


def test_timings_are_checked_as_client_go_does() -> None:
    assert timing_problem(15, 10, 2) is None  # kube-scheduler's defaults
    assert "renew deadline (2.4 s) must be greater than retry period * 1.2 (2.4 s)" in str(timing_problem(15, 2.4, 2))
    assert "lease duration (10 s) must be greater than renew deadline (10 s)" in str(timing_problem(10, 10, 2))
    assert "retry period must be greater than zero" in str(timing_problem(15, 10, 0))
    with pytest.raises(ValueError, match="kube-system/x: lease duration"):
        LeaderElector(Api("http://127.0.0.1:1"), "a", name="x", lease_duration=5, renew_deadline=5, retry_period=1)


def test_the_command_line_refuses_bad_timings_and_other_locks() -> None:
    """``kosmos-scheduler`` checks the merged timings (flags over the config) before connecting."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scheduler.main", "--master", "http://127.0.0.1:1", *args],
                              capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)

    r = cli("--leader-elect-renew-deadline", "2", "--leader-elect-retry-period", "2")
    assert r.returncode == 2
    assert "leader election (--leader-elect-* flags or the config's leaderElection): renew deadline (2 s) must be " \
           "greater than retry period * 1.2 (2.4 s)" in r.stderr
    r = cli("--leader-elect-resource-lock", "endpoints")
    assert r.returncode == 2 and "invalid choice: 'endpoints'" in r.stderr


def test_a_candidate_waits_a_full_lease_duration_without_a_change(api: Api) -> None:
    clock, name = Clock(), f"l-{uuid.uuid4().hex[:6]}"
    a = _elector(api, "a", clock, name)
    b = _elector(api, "b", clock, name)
    assert a.try_acquire_or_renew()  # no lease yet: created, held by a
    assert _spec(api, name)["holderIdentity"] == "a" and _spec(api, name)["leaseDurationSeconds"] == 15
    assert not b.try_acquire_or_renew() and b.holder() == "a"  # b first sees the record now
    clock.t += 10
    assert a.try_acquire_or_renew()  # a renews: the record changed
    clock.t += 10
    assert not b.try_acquire_or_renew()  # b sees the renewal: its 15 s start again from here
    clock.t += 14.9
    assert not b.try_acquire_or_renew()
    clock.t += 0.2  # 15.1 s without a change (a died): b takes over
    assert b.try_acquire_or_renew()
    spec = _spec(api, name)
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    # a, back from a pause, cannot renew a lease b holds (b's record is new to it)
    assert not a.try_acquire_or_renew()


def test_a_released_lease_is_taken_at_the_next_try(api: Api) -> None:
    clock, name = Clock(), f"l-{uuid.uuid4().hex[:6]}"
    a = _elector(api, "a", clock, name)
    b = _elector(api, "b", clock, name)
    assert a.try_acquire_or_renew()
    a._leading = True  # as run() sets it once acquired
    assert not b.try_acquire_or_renew()
    a.release()
    spec = _spec(api, name)
    assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1 and spec["leaseTransitions"] == 0
    assert spec["acquireTime"] == spec["renewTime"]
    assert not a.is_leader()
    assert b.try_acquire_or_renew()  # no time passed: nobody holds it
    assert _spec(api, name)["holderIdentity"] == "b" and _spec(api, name)["leaseDurationSeconds"] == 15
    # a's late release (it no longer holds the lease) leaves b's lease alone
    a.release()
    assert _spec(api, name)["holderIdentity"] == "b"


def test_acquire_retries_with_client_go_jitter(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between tries an acquiring candidate waits ``retry_period * (1 + rand * 1.2)`` (2 to 4.4 s
    by default), a leader renews every ``retry_period``."""
    waits: list[float] = []
    e = LeaderElector(api, "a", name=f"l-{uuid.uuid4().hex[:6]}", retry_period=2.0)

    def wait(timeout: float | None = None) -> bool:
        waits.append(float(timeout or 0))
        return len(waits) >= 3

    monkeypatch.setattr(e._stop, "wait", wait)
    monkeypatch.setattr(random, "random", lambda: 1.0)
    monkeypatch.setattr(e, "try_acquire_or_renew", lambda: False)
    e.run()
    assert waits == [pytest.approx(4.4)] * 3
    waits.clear()
    calls = iter([True, True, True])
    monkeypatch.setattr(e, "try_acquire_or_renew", lambda: next(calls))
    e.run()
    assert waits == [2.0, 2.0, 2.0]


def _start(url: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "scheduler.main", "--master", url, "--listen", "127.0.0.1:0"],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                   "PYTHONUNBUFFERED": "1"})


def _holder(api: Api) -> str | None:
    try:
        return str(_spec(api, "kosmos-scheduler").get("holderIdentity") or "")
    except ApiError:
        return None


def _identity(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if "kosmos-scheduler " in line and ": profiles " in line:
            return line.split("kosmos-scheduler ", 1)[1].split(":", 1)[0]
    return None


def test_sigterm_releases_the_lease_sigkill_does_not(api: Api, tmp_path: Path) -> None:
    """The command line with its defaults (leader election on, 15 s lease): the first process
    takes the lease; on SIGTERM it exits 0 and releases it, so a second process takes it at its
    next try, far sooner than the 15 s a lapse takes; SIGKILLed, the second leaves the lease
    held by the dead process."""
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [_start(api.host, logs[0])]
    try:
        first = wait_until(lambda: _identity(logs[0]), 30, "the first scheduler's identity in its log")
        assert first.rsplit("_", 1)[0] == os.uname().nodename  # <hostname>_<uuid>, as upstream
        assert uuid.UUID(first.rsplit("_", 1)[1])
        wait_until(lambda: _holder(api) == first, 30, "the first scheduler holding the lease")
        procs.append(_start(api.host, logs[1]))
        second = wait_until(lambda: _identity(logs[1]), 30, "the second scheduler's identity in its log")
        assert second != first
        wait_until(lambda: "lease kube-system/kosmos-scheduler held by" in logs[1].read_text(), 30,
                   "the second scheduler standing by")
        procs[0].send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert procs[0].wait(30) == 0, logs[0].read_text()
        assert f"{first} released lease kube-system/kosmos-scheduler" in logs[0].read_text()
        wait_until(lambda: _holder(api) == second, 15, "the second scheduler taking the released lease")
        # 2 to 4.4 s between its tries (plus start-up noise), never the 15 s of a lapsed lease
        took = time.monotonic() - stopped
        assert took < 10, f"took {took:.1f} s"
        procs[1].kill()
        procs[1].wait(10)
        spec = _spec(api, "kosmos-scheduler")
        assert spec["holderIdentity"] == second and spec["leaseDurationSeconds"] == 15
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_a_leader_whose_api_server_stops_answering_steps_down_at_the_renew_deadline(api: Api) -> None:
    """A renewal the API server never answers ends with the renew deadline (client-go's renew
    context), not with the client's 30 s timeout: the leader runs ``on_stopped`` about
    ``renew_deadline`` after its last renewal, before another candidate could take over."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nobody ever reads or answers
        stopped = threading.Event()
        el = LeaderElector(api, "a", name=f"silent-{uuid.uuid4().hex[:8]}", lease_duration=3.0, renew_deadline=2.0,
                           retry_period=0.5, on_stopped=stopped.set)  # fmt: skip
        el.start()
        try:
            wait_until(el.is_leader, 10, "a to lead")
            el.api = Api(f"http://127.0.0.1:{silent.getsockname()[1]}")
            assert stopped.wait(10), "the leader still believed it led 10 s after the API server went silent"
            assert not el.is_leader()
        finally:
            el.stop(release=False)
