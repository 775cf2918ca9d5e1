"""Test tiers and shared fixtures.

Tiers are markers: ``unit`` (no root), ``privileged`` (real kernel in throwaway network
namespaces) and ``lab`` (end to end through ``fabric-tool lab``). Tests under
``tests/privileged`` and ``tests/lab`` get their marker automatically; both tiers are skipped,
with the reason, when not running as root.

Hangs fail one test, never the run. pytest-timeout's ``signal`` method (``timeout`` in
pyproject.toml) fails a test that overruns while its main thread runs Python. A thread blocked in
C (a deadlock inside ``fork()``, a stuck syscall) never sees that signal, so a C-level watchdog
(:mod:`faulthandler`) armed for the same test writes every thread's stack to a file and ends the
process ``WATCHDOG_GRACE_S`` later. The suite runs in one pytest-xdist worker (``-n 1`` in
``addopts``): the controller reports that test as crashed with the stacks attached, starts a
fresh worker and goes on. (``-n 0`` runs in-process, for a debugger; the stacks are then left
in the folder the report header names.)

Leaked component threads fail too. Our components run daemon threads (the Kubernetes source's
``kube-clusters`` watcher, kubeemu's server loop, the tree's and the scheduler's loops); one a
test forgets to stop goes on logging after the test, and a daemon thread that writes to stderr
while the interpreter finalizes aborts the whole run ("Fatal Python error:
_enter_buffered_busy", exit 134) after every test passed. So after each test, and once more at
the end of the session (for module- and session-scoped fixtures), a thread of
``COMPONENT_THREADS`` started since is given ``LEAK_GRACE_S`` to end and is then reported as an
error of that test (or of the last one) naming the threads.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.privileged import kernelns

IS_ROOT = os.geteuid() == 0
WATCHDOG_GRACE_S = 30.0
_STACKS_ENV = "KFT_TEST_STACKS_DIR"
_stacks: IO[str] | None = None
#: Names of the threads our components start and must end when they stop (module docstring).
COMPONENT_THREADS = re.compile(
    r"kube-clusters|kubeemu|tree-manager|tree-fabric-link|leaf-.+|informer-.+|leader-election|queue-flush"
    r"|schedule-one|netlink-events"
)
#: How long a component thread started by a test may take to end after the test (a stopping
#: component that does not join its thread): only waited for when one is still alive.
LEAK_GRACE_S = 3.0


def pytest_configure(config: pytest.Config) -> None:
    if _STACKS_ENV not in os.environ:  # the controller (or an in-process run); workers inherit it
        made = tempfile.mkdtemp(prefix="kft-test-stacks-")
        os.environ[_STACKS_ENV] = made
        config.add_cleanup(lambda: shutil.rmtree(made, ignore_errors=True))


def _stacks_path(worker: str) -> Path:
    return Path(os.environ[_STACKS_ENV]) / f"{worker}.txt"


def pytest_report_header(config: pytest.Config) -> str:
    return f"hung tests: every thread's stack is dumped under {os.environ[_STACKS_ENV]} (and into the report)"


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """Arm the C-level watchdog next to pytest-timeout's own timer (None: theirs runs too)."""
    global _stacks
    if settings.timeout and settings.timeout > 0:
        if _stacks is None:
            _stacks = _stacks_path(os.environ.get("PYTEST_XDIST_WORKER", "main")).open("w")
        _stacks.seek(0)
        _stacks.truncate()
        _stacks.write(f"watchdog: {item.nodeid} ran over {settings.timeout} s + {WATCHDOG_GRACE_S:.0f} s\n")
        _stacks.flush()
        faulthandler.dump_traceback_later(settings.timeout + WATCHDOG_GRACE_S, exit=True, file=_stacks)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched: Any) -> None:
    """pytest-xdist: a worker died under ``crashitem``; attach the watchdog's stacks, if any."""
    node = getattr(report, "node", None)
    worker = getattr(getattr(node, "gateway", None), "id", None)
    if worker is None:
        return
    path = _stacks_path(worker)
    try:
        text = path.read_text()
    except OSError:
        return
    if text.startswith(f"watchdog: {crashitem} "):
        report.longrepr = f"{report.longrepr}\n\n{text}"


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
    # The VM tier last, whatever the paths on the command line: its three TCG VMs keep both cores
    # of a CI machine busy from their boot to its session fixture's teardown, which would make
    # the lab tier's timing-sensitive tests (failover, restarts) flaky if they ran meanwhile.
    # With one xdist worker (-n 1) the tests run one after another in this order, so nothing
    # overlaps the VMs; the sort is stable, every other test keeps its place.
    items.sort(key=lambda item: item.get_closest_marker("vm") is not None)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace (loopback up), deleted afterwards with all it holds."""
    with kernelns.fresh_netns() as name:
        yield name


def _leaked_threads(before: set[threading.Thread]) -> list[str]:
    """Component threads not in ``before`` still alive after ``LEAK_GRACE_S``, described."""
    deadline = time.monotonic() + LEAK_GRACE_S
    left = []
    for t in threading.enumerate():
        if t not in before and COMPONENT_THREADS.fullmatch(t.name):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                left.append(f"{t.name} ({'daemon' if t.daemon else 'non-daemon'}, target {_target(t)})")
    return left


def _target(t: threading.Thread) -> str:
    fn = getattr(t, "_target", None)
    return getattr(fn, "__qualname__", None) or repr(fn)


def _check_no_leak(before: set[threading.Thread], what: str) -> None:
    left = _leaked_threads(before)
    if left:
        named = ", ".join(f"{n} x {desc}" if n > 1 else desc for desc, n in collections.Counter(left).items())
        pytest.fail(f"{what} left component threads running (stop what you start; a daemon thread that "
                    f"logs at interpreter shutdown aborts the run): {named}", pytrace=False)  # fmt: skip


@pytest.fixture(autouse=True, scope="session")
def _no_component_threads_leaked_by_the_session() -> Iterator[None]:
    """Set up first, torn down last: what module- and session-scoped fixtures left running."""
    before = set(threading.enumerate())
    yield
    _check_no_leak(before, "the session (a test reported above, or a module- or session-scoped fixture)")


@pytest.fixture(autouse=True)
def _no_component_threads_leaked_by_the_test() -> Iterator[None]:
    """Torn down after the test's own fixtures (autouse ones are set up first): what the test left."""
    before = set(threading.enumerate())
    yield
    _check_no_leak(before, "this test")
