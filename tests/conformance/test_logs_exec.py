"""``kubectl logs`` and ``kubectl exec`` through kubeemu's API server to the kubelet API.

The real kubectl talks to the emulated API server, which proxies ``pods/log`` and ``pods/exec``
to a kubelet app (:func:`kubeemu.kubeletapi.make_app`) found through the Node's
``status.daemonEndpoints.kubeletEndpoint.Port``. The kubelet's containers are a fake
:class:`ContainerAccess`: CRI-format log files this test writes, and commands run directly on the
host (``sh -c ...``), so that every byte kubectl prints is checked against what the test wrote.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from tests.kubelet_doubles import (
    FakeAccess,
    exec_ends_with_kubectl,
    logs_follow_until_stopped,
    serve_kubelet,
    stop_kubelet,
)


@pytest.fixture(scope="module")
def kubelet(emu: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeAccess, int]]:
    """A kubelet app on the emulator's loop (ephemeral port) and a Node that points at it."""
    access = FakeAccess(tmp_path_factory.mktemp("kubelet"))
    port, runner = serve_kubelet(access, emu.loop)
    yield access, port
    stop_kubelet(runner, emu.loop)


@pytest.fixture
def node(kubelet: tuple[FakeAccess, int], raw: Any) -> str:
    name = f"n-{uuid.uuid4().hex[:6]}"
    code, body = raw.request("POST", "/api/v1/nodes", {"metadata": {"name": name}})
    assert code == 201, body
    code, body = raw.request(
        "PATCH",
        f"/api/v1/nodes/{name}/status",
        {"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet[1]}}}},
        "application/merge-patch+json",
    )
    assert code == 200, body
    return name


def _pod(raw: Any, ns: str, name: str, node: str | None, *containers: str) -> None:
    spec: dict[str, Any] = {"containers": [{"name": c, "image": "busybox"} for c in containers]}
    if node:
        spec["nodeName"] = node
    code, body = raw.request("POST", f"/api/v1/namespaces/{ns}/pods", {"metadata": {"name": name}, "spec": spec})
    assert code == 201, body


def test_logs_tail_timestamps_limit_and_container(kubelet: Any, node: str, raw: Any, ns: str, kubectl: Any) -> None:
    access, _ = kubelet
    _pod(raw, ns, "p", node, "app", "side")
    for c in ("app", "side"):
        access.state[(ns, "p", c)] = "running"
    access.write(ns, "p", "app", "stdout F one", "stderr F two", "stdout P thr", "stdout F ee", "stdout F four")
    access.write(ns, "p", "side", "stdout F from the side")
    out = kubectl("logs", "p", "-n", ns, "-c", "app", ok=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "one\ntwo\nthree\nfour\n"  # partial lines joined, both streams
    assert kubectl("logs", "p", "-n", ns, "-c", "app", "--tail=2").stdout == "ee\nfour\n"
    stamped = kubectl("logs", "p", "-n", ns, "-c", "app", "--timestamps", "--tail=3").stdout
    assert stamped == "2024-01-02T03:04:07.12Z thr" + "ee\n" + "2024-01-02T03:04:09.12Z four\n"
    assert kubectl("logs", "p", "-n", ns, "-c", "app", "--limit-bytes=6").stdout == "one\ntw"
    assert kubectl("logs", "p", "-n", ns, "-c", "side").stdout == "from the side\n"
    # no container named, two in the pod: upstream's 400
    err = kubectl("logs", "p", "-n", ns, "--all-containers=false", "-c", "nope", ok=False)
    assert err.returncode == 1 and "container nope is not valid for pod p" in err.stderr


def test_logs_previous_and_waiting(kubelet: Any, node: str, raw: Any, ns: str, kubectl: Any) -> None:
    access, _ = kubelet
    _pod(raw, ns, "crash", node, "c")
    key = (ns, "crash", "c")
    access.state[key] = "waiting"
    err = kubectl("logs", "crash", "-n", ns, ok=False)
    assert err.returncode == 1
    assert 'container "c" in pod "crash" is waiting to start: ContainerCreating' in err.stderr
    access.state[key] = "running"
    err = kubectl("logs", "crash", "-n", ns, "--previous", ok=False)
    assert err.returncode == 1 and 'previous terminated container "c" in pod "crash" not found' in err.stderr
    access.write(ns, "crash", "c", "stderr F boom", attempt=0)
    access.attempt[key] = 1
    access.write(ns, "crash", "c", "stdout F second life")
    assert kubectl("logs", "crash", "-n", ns, "--previous").stdout == "boom\n"
    assert kubectl("logs", "crash", "-n", ns).stdout == "second life\n"


def test_logs_of_unscheduled_pod_are_empty(raw: Any, ns: str, kubectl: Any) -> None:
    _pod(raw, ns, "pending", None, "c")
    out = kubectl("logs", "pending", "-n", ns, ok=False)
    assert out.returncode == 0 and out.stdout == ""


def test_logs_follow_streams_until_the_container_stops(
    kubelet: Any, node: str, raw: Any, ns: str, kubectl: Any, tmp_path: Path
) -> None:
    access, _ = kubelet
    _pod(raw, ns, "f", node, "c")
    access.state[(ns, "f", "c")] = "running"
    access.write(ns, "f", "c", "stdout F first")
    logs_follow_until_stopped(kubectl.argv("logs", "-f", "f", "-n", ns), access, ns, "f", "c", tmp_path / "follow.out")


def test_exec_output_exit_codes_and_stdin(kubelet: Any, node: str, raw: Any, ns: str, kubectl: Any) -> None:
    access, _ = kubelet
    _pod(raw, ns, "e", node, "c")
    access.state[(ns, "e", "c")] = "running"
    out = kubectl("exec", "e", "-n", ns, "--", "echo", "hello", "world", ok=False)
    assert (out.returncode, out.stdout) == (0, "hello world\n"), out.stderr
    out = kubectl("exec", "e", "-n", ns, "--", "sh", "-c", "echo out; echo err >&2; exit 3", ok=False)
    assert out.returncode == 3
    assert out.stdout == "out\n"
    assert "err\n" in out.stderr and "command terminated with exit code 3" in out.stderr
    out = kubectl("exec", "-i", "e", "-n", ns, "--", "cat", stdin="hi\nthere\n", ok=False)
    assert (out.returncode, out.stdout) == (0, "hi\nthere\n"), out.stderr
    big = "x" * 200_000 + "\n"
    out = kubectl("exec", "-i", "e", "-n", ns, "--", "wc", "-c", stdin=big, ok=False)
    assert out.stdout.strip() == str(len(big))


def test_exec_errors(kubelet: Any, node: str, raw: Any, ns: str, kubectl: Any) -> None:
    access, _ = kubelet
    _pod(raw, ns, "stopped", node, "c")
    access.state[(ns, "stopped", "c")] = "waiting"
    out = kubectl("exec", "stopped", "-n", ns, "--", "true", ok=False)
    assert out.returncode == 1 and 'container not found ("c")' in out.stderr
    _pod(raw, ns, "nowhere", None, "c")
    out = kubectl("exec", "nowhere", "-n", ns, "--", "true", ok=False)
    assert out.returncode == 1 and "pod nowhere does not have a host assigned" in out.stderr
    _pod(raw, ns, "two", node, "a", "b")
    access.state[(ns, "two", "a")] = "running"
    out = kubectl("exec", "two", "-n", ns, "-c", "zz", "--", "true", ok=False)
    assert out.returncode == 1 and "container zz is not valid for pod two" in out.stderr
    out = kubectl("exec", "missing", "-n", ns, "--", "true", ok=False)
    assert out.returncode == 1 and 'pods "missing" not found' in out.stderr


def test_log_options_are_validated_and_discovered(raw: Any, ns: str, node: str) -> None:
    _pod(raw, ns, "v", node, "c")
    code, body = raw.request("GET", f"/api/v1/namespaces/{ns}/pods/v/log?tailLines=-1&limitBytes=0")
    assert code == 422 and body["reason"] == "Invalid"
    assert body["message"] == (
        'PodLogOptions "v" is invalid: [tailLines: Invalid value: -1: must be greater than or '
        "equal to 0, limitBytes: Invalid value: 0: must be greater than 0]"
    )
    _, resources = raw.request("GET", "/api/v1")
    subs = {r["name"]: r for r in resources["resources"] if r["name"].startswith("pods/")}
    assert subs["pods/log"]["verbs"] == ["get"] and subs["pods/exec"]["kind"] == "PodExecOptions"


def test_exec_large_output_and_client_going_away_ends_the_command(
    kubelet: Any, node: str, raw: Any, ns: str, kubectl: Any, tmp_path: Path
) -> None:
    access, _ = kubelet
    _pod(raw, ns, "big", node, "c")
    access.state[(ns, "big", "c")] = "running"
    out = kubectl("exec", "big", "-n", ns, "--", "sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; echo")
    assert len(out.stdout) == 3_000_001 and set(out.stdout) == {"x", "\n"}
    pid_file = tmp_path / "pid"
    exec_ends_with_kubectl(
        kubectl.argv("exec", "big", "-n", ns, "--", "sh", "-c", f"echo $$ > {pid_file}; exec sleep 600"),
        pid_file,
        "the exec'd command",
    )


def test_kubectl_cp_rides_on_exec(kubelet: Any, node: str, raw: Any, ns: str, kubectl: Any, tmp_path: Path) -> None:
    """``kubectl cp`` is ``tar`` over exec, both ways (stdin for the upload)."""
    access, _ = kubelet
    _pod(raw, ns, "cp", node, "c")
    access.state[(ns, "cp", "c")] = "running"
    src = tmp_path / "in.txt"
    src.write_text("payload\n")
    remote = tmp_path / "remote"
    remote.mkdir()
    out = kubectl("cp", str(src), f"{ns}/cp:{remote}/up.txt", ok=False)
    assert out.returncode == 0, out.stderr
    assert (remote / "up.txt").read_text() == "payload\n"
    out = kubectl("cp", f"{ns}/cp:{remote}/up.txt", str(tmp_path / "down.txt"), ok=False)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "down.txt").read_text() == "payload\n"
