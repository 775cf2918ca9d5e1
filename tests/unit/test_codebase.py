"""The codebase's own rules, enforced: layering (import-linter), ruff and mypy."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: Every package of ours (production, the tools and the emulator), as pyproject.toml lists them.
PACKAGES: tuple[str, ...] = tuple(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"])


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{tool} not installed in {BIN} (./dev.sh setup installs it)")
    return subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_layering_contracts_hold() -> None:
    """fabric.netlink/fabric.bpf never import the control plane, and the reverse (pyproject.toml)."""
    p = _run("lint-imports")
    assert p.returncode == 0, p.stdout + p.stderr


def test_ruff_clean() -> None:
    p = _run("ruff", "check", "--output-format", "concise", ".")
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy_clean() -> None:
    p = _run("mypy")  # [tool.mypy] files: every package
    assert p.returncode == 0, p.stdout + p.stderr


def _python_files() -> list[Path]:
    dirs = (*PACKAGES, "tests", "deploy", "benchmarks")
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py") if "generated" not in p.parts)


def _fork_hazards(source: str) -> list[tuple[int, str]]:
    """Every place in ``source`` that forks and runs code before exec (see tools/nsutil.py)."""
    import ast

    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
            kwargs = {k.arg for k in node.keywords}
            if "preexec_fn" in kwargs:
                found.append((node.lineno, "preexec_fn= (a fork that runs Python before exec)"))
            if (owner, name) in {("os", "fork"), ("os", "forkpty"), ("pty", "fork")}:
                found.append((node.lineno, f"{owner}.{name}()"))
            if name in {"IPRoute", "NetNS", "IPDB", "NDB"} and "netns" in kwargs:
                found.append((node.lineno, f"{name}(netns=...) (pyroute2 forks a helper; use fabric.netns.iproute)"))
            if name == "NetNS":
                found.append((node.lineno, "pyroute2 NetNS (forks a helper)"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] == "multiprocessing" for m in mods):
                found.append((node.lineno, "multiprocessing (forks and runs Python)"))
    return found


def test_fork_hazard_scan_finds_each_kind() -> None:
    """The scan below is only worth something if it recognises what it forbids."""
    bad = (
        "import subprocess, os, multiprocessing\n"
        "from pyroute2 import IPRoute, NetNS\n"
        "subprocess.Popen(['true'], preexec_fn=lambda: None)\n"
        "os.fork()\n"
        "IPRoute(netns='x')\n"
        "NetNS('x')\n"
    )
    assert [line for line, _ in _fork_hazards(bad)] == [1, 3, 4, 5, 6]
    assert _fork_hazards("import subprocess\nsubprocess.Popen(['nsenter', '--net=/run/netns/x', 'true'])\n") == []


#: Programs that fork by design, each a process of its own that never imports gRPC (DESIGN.md,
#: "Processes": such a process may fork): file -> the module run as ``python -S -m``. The test
#: below checks that claim by importing each in a fresh interpreter.
FORKING_PROGRAMS = {"kubeemu/runtime/zygote.py": "kubeemu.runtime.zygote"}


def test_nothing_forks_and_runs_python_before_exec() -> None:
    """A process that may have used gRPC must start children by exec only: gRPC's fork handlers
    can deadlock inside fork() where no timeout reaches (issue 13). Hence no preexec_fn, no
    os.fork, no multiprocessing and no pyroute2 netns= helpers anywhere in the tree, except in
    ``FORKING_PROGRAMS``' ``os.fork``."""
    hazards = [
        f"{p.relative_to(REPO)}:{line}: {what}"
        for p in _python_files()
        if p.name != "test_codebase.py"
        for line, what in _fork_hazards(p.read_text())
        if not (str(p.relative_to(REPO)) in FORKING_PROGRAMS and what == "os.fork()")
    ]
    assert hazards == []


@pytest.mark.parametrize("module", sorted(FORKING_PROGRAMS.values()))
def test_forking_programs_never_load_grpc_or_threads(module: str) -> None:
    """What a forking program loads as it starts: no gRPC (whose fork handlers may deadlock), no
    threading (a forked process must be single-threaded, and threading's fork handlers would run
    in every child)."""
    code = (f"import sys; import {module}; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'threading'))))")
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [], f"{module} loads {p.stdout.strip()}"


def test_no_asyncio_wait_for_outside_the_tests() -> None:
    """On Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that arrives as the awaited
    thing completes (CPython gh-86296): a loop around it then never ends on cancel (the Cluster
    source hung that way). ``async with asyncio.timeout(...)`` has no such race."""
    import ast

    found = []
    for d in PACKAGES:
        for p in sorted((REPO / d).rglob("*.py")):
            if "generated" in p.parts:
                continue
            for node in ast.walk(ast.parse(p.read_text())):
                fn = node.func if isinstance(node, ast.Call) else None
                if isinstance(fn, ast.Attribute) and fn.attr == "wait_for" and isinstance(fn.value, ast.Name) \
                        and fn.value.id == "asyncio":  # fmt: skip
                    found.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert found == []
