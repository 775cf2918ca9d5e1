"""The kubelet's shim spawner on a real kernel, driven directly (no kubelet, no API server).

Each test makes a throwaway network namespace for its "pod" and a :class:`Spawner` rooted in a
temp dir; the spawner is closed, every process a test started is killed by PID + start time, and
the namespace is deleted afterwards. The kubelet's use of the spawner (restart after it died,
adoption across kubelet restarts) is tested with the runtime in ``test_kubeemu_runtime.py``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kubeemu.runtime import procs
from kubeemu.runtime.spawner import Spawner, SpawnError
from tests.waiting import wait_until


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ksp{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def started() -> Iterator[list[tuple[int, int | None]]]:
    """Processes a test started (shims, containers): killed afterwards if still running."""
    recs: list[tuple[int, int | None]] = []
    yield recs
    for pid, start in recs:
        procs.signal_process(pid, start, signal.SIGKILL)
        procs.wait_gone(pid, start, 5.0)


def _spec(d: pathlib.Path, argv: list[str]) -> pathlib.Path:
    """An attempt's ``spec.json``, as the runtime writes it (no volumes)."""
    d.mkdir(parents=True)
    spec = {"hostname": "pod-a", "rootDir": str(d), "mounts": [], "argv": argv,
            "env": {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, "workingDir": "/", "log": str(d / "c.log")}
    (d / "spec.json").write_text(json.dumps(spec))
    return d / "spec.json"


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state first, then ppid)."""
    raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def _zombie_children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat(int(entry))
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _record(p: pathlib.Path) -> dict[str, Any] | None:
    """A shim's record (``container.json``, ``exit.json``) once it is written."""
    return dict(json.loads(p.read_text())) if p.exists() else None


def _ns(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def test_a_shim_runs_in_the_pods_namespaces_forwards_sigterm_and_is_reaped_by_init(
        tmp_path: pathlib.Path, netns: str, started: list[tuple[int, int | None]]) -> None:
    sp = Spawner(tmp_path / "spawner.sock")
    try:
        att = tmp_path / "c" / "0"
        spid, sstart = sp.spawn(_spec(att, ["sh", "-c", "hostname; echo out; echo err >&2; exec sleep 300"]),
                                netns, att / "shim.log")
        started.append((spid, sstart))
        assert sstart == procs.start_time(spid)
        zygote = sp._proc.pid if sp._proc else 0
        rec = json.loads((tmp_path / "spawner.json").read_text())
        assert rec == {"pid": zygote, "start": procs.start_time(zygote)}
        cont = wait_until(lambda: _record(att / "container.json"), 10, "the container's record")
        started.append((cont["pid"], cont["start"]))
        # The pod's network namespace; a mount and UTS namespace of the container's own.
        assert _ns(cont["pid"], "net") == os.stat(netns).st_ino
        assert _ns(spid, "net") == os.stat(netns).st_ino
        assert _ns(spid, "mnt") != _ns("self", "mnt") and _ns(spid, "uts") != _ns("self", "uts")
        # Neither ours nor the spawner's child: an orphan from the start.
        assert int(_stat(spid)[1]) not in (os.getpid(), zygote)
        log = wait_until(lambda: (t := (att / "c.log").read_text()).count("\n") >= 3 and t, 10, "three log lines")
        assert " stdout F pod-a\n" in log and " stdout F out\n" in log and " stderr F err\n" in log
        os.kill(spid, signal.SIGTERM)  # forwarded to the container
        ex = wait_until(lambda: _record(att / "exit.json"), 10, "exit.json")
        assert ex["exitCode"] == 143 and ex["signal"] == signal.SIGTERM
        wait_until(lambda: not os.path.exists(f"/proc/{spid}"), 10, f"shim {spid} exited and reaped")
        assert not _zombie_children(zygote) and not _zombie_children(os.getpid())
    finally:
        sp.close()
    assert not (tmp_path / "spawner.json").exists()


def test_spawns_overlap_and_no_shim_holds_a_spawner_descriptor(
        tmp_path: pathlib.Path, netns: str, started: list[tuple[int, int | None]]) -> None:
    """Many kubelet threads spawning at once (a Deployment's pods start side by side): every
    request gets its own shim, and no shim keeps the spawner's listener, another request's
    connection or reply pipe (a kept connection would leak one descriptor per pod forever)."""
    sp = Spawner(tmp_path / "spawner.sock")
    n = 24
    try:
        atts = [tmp_path / f"c{i}" / "0" for i in range(n)]
        specs = [_spec(a, ["sleep", "300"]) for a in atts]
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            shims = list(pool.map(lambda i: sp.spawn(specs[i], netns, atts[i] / "shim.log"), range(n)))
        started.extend(shims)
        assert len({pid for pid, _ in shims}) == n
        zygote = sp._proc.pid if sp._proc else 0
        sock = str(tmp_path / "spawner.sock")
        for (pid, _), att in zip(shims, atts, strict=True):
            cont = wait_until(functools.partial(_record, att / "container.json"), 10, f"shim {pid}'s container")
            started.append((cont["pid"], cont["start"]))
            fds = os.listdir(f"/proc/{pid}/fd")
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
            sockets = [t for t in targets if t.startswith("socket:")]
            assert not sockets, f"shim {pid} holds sockets {sockets} (of the spawner: {sock})"
            # stdin, stdout+stderr (shim.log), the container's log, its pidfd and pipes: nothing else
            assert len(fds) <= 8, f"shim {pid} holds {targets}"
        wait_until(lambda: not _zombie_children(zygote), 5, "no zombie child of the spawner")
    finally:
        sp.close()


def test_a_spawn_failure_names_its_cause_and_the_spawner_serves_on(
        tmp_path: pathlib.Path, netns: str, started: list[tuple[int, int | None]]) -> None:
    sp = Spawner(tmp_path / "spawner.sock")
    try:
        bad = tmp_path / "bad" / "0"
        with pytest.raises(SpawnError, match="opening the pod's network namespace /run/netns/no-such-kubeemu-ns"):
            sp.spawn(_spec(bad, ["true"]), "/run/netns/no-such-kubeemu-ns", bad / "shim.log")
        zygote = sp._proc.pid if sp._proc else 0
        zstart = procs.start_time(zygote)
        good = tmp_path / "good" / "0"
        started.append(sp.spawn(_spec(good, ["true"]), netns, good / "shim.log"))
        ex = wait_until(lambda: _record(good / "exit.json"), 10, "exit.json of the good spawn")
        assert ex["exitCode"] == 0
        assert sp._proc is not None and sp._proc.pid == zygote  # the same spawner, not a new one
        wait_until(lambda: not _zombie_children(zygote), 5, "no zombie child of the spawner")
    finally:
        sp.close()
    assert not procs.same(zygote, zstart)
    with pytest.raises(SpawnError, match="is closed"):  # and none is started again
        sp.spawn(_spec(tmp_path / "late" / "0", ["true"]), netns, tmp_path / "late" / "0" / "shim.log")
    assert sp._proc is None


def test_the_spawner_ends_with_its_kubelet_and_its_shims_live_on(
        tmp_path: pathlib.Path, netns: str, started: list[tuple[int, int | None]]) -> None:
    att = tmp_path / "c" / "0"
    spec = _spec(att, ["sleep", "300"])
    # A stand-in kubelet: starts its spawner, has one shim spawned, prints both PIDs, then waits.
    script = ("import json, sys, time\n"
              "from kubeemu.runtime.spawner import Spawner\n"
              f"sp = Spawner({str(tmp_path / 'spawner.sock')!r})\n"
              f"pid, start = sp.spawn({str(spec)!r}, {netns!r}, {str(att / 'shim.log')!r})\n"
              "print(json.dumps([sp._proc.pid, pid, start]), flush=True)\n"
              "time.sleep(300)\n")
    kubelet = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        assert kubelet.stdout is not None
        zygote, spid, sstart = json.loads(kubelet.stdout.readline())
        started.append((spid, sstart))
        zstart = procs.start_time(zygote)
        cont = wait_until(lambda: _record(att / "container.json"), 10, "the container's record")
        started.append((cont["pid"], cont["start"]))
    finally:
        kubelet.kill()
        kubelet.wait()
    assert procs.wait_gone(zygote, zstart, 10.0), "the spawner outlived its kubelet"
    assert procs.same(spid, sstart) and procs.same(cont["pid"], cont["start"])  # the container lives on


def test_containers_see_the_hosts_mounts_as_of_their_start_and_the_spawner_keeps_no_unmounted_one(
        tmp_path: pathlib.Path, netns: str, started: list[tuple[int, int | None]]) -> None:
    """The spawner's own mount namespace (a copy of the kubelet's without /run/netns) is copied
    again when the host's mounts change: a file system mounted after the spawner started is seen
    by the next container, and one the host unmounts is not held by the spawner."""
    sp = Spawner(tmp_path / "spawner.sock")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sp.start()
        assert sp._proc is not None
        zygote = sp._proc.pid

        def spawner_has_it() -> bool:
            return f" {mnt} " in pathlib.Path(f"/proc/{zygote}/mountinfo").read_text()

        assert "/run/netns/" not in pathlib.Path(f"/proc/{zygote}/mountinfo").read_text()
        subprocess.run(["mount", "-t", "tmpfs", "kubeemu-test", str(mnt)], check=True)
        (mnt / "marker").write_text("on the tmpfs\n")
        att = tmp_path / "c" / "0"
        spec = _spec(att, ["cat", "/data/marker"])
        doc = json.loads(spec.read_text())
        doc["mounts"] = [{"source": str(mnt), "target": "/data", "readOnly": True}]
        spec.write_text(json.dumps(doc))
        started.append(sp.spawn(spec, netns, att / "shim.log"))
        wait_until(lambda: _record(att / "exit.json"), 10, "the container's exit")
        assert "on the tmpfs" in (att / "c.log").read_text()
        assert spawner_has_it()
        subprocess.run(["umount", str(mnt)], check=True)
        wait_until(lambda: not spawner_has_it(), 5, "the spawner dropped its copy of the unmounted tmpfs")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        sp.close()
