"""fabric-reflector's command line and the stub generator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fabric.control import api, client, protogen, reflector_cli, reflector_service
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


def test_invalid_config_exits_2_with_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters:\n  - name: East_1\n    podCIDRs: [10.10.0.0/16]\n")
    assert reflector_cli.main(["--config", str(bad), "--listen", "127.0.0.1:0", "--insecure"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: clusters[0].name: 'East_1' is not a DNS-1123 label" in err


def test_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert reflector_cli.main(["--config", str(tmp_path / "nope.yaml"), "--insecure"]) == 2
    assert "cannot read file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("4880", "expected HOST:PORT"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:70000", "port '70000'"),
        ("nosuchhost:4880", "'nosuchhost' is not an IP address"),
        ("unix:relative.sock", "must be absolute"),
    ],
)
def test_bad_listen_values_are_refused(value: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        reflector_service.parse_listen(value)


def test_good_listen_values() -> None:
    for v in ("0.0.0.0:4880", "[::]:4880", "198.18.0.1:4880", "unix:/run/kosmos-fabric/lab/reflector.sock"):
        assert reflector_service.parse_listen(v) == v


def test_bad_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        reflector_cli.main(["--config", "x.yaml", "--keepalive-interval", "0"])
    assert exc.value.code == 2
    assert "--keepalive-interval 0: must be positive" in capsys.readouterr().err


#: How long the reflector process may take to answer, and to exit on SIGTERM: these are waits for
#: an event (a bound that only a hung process reaches), generous because a loaded machine (load
#: average 30) took more than 5 s to start a Python process with gRPC.
PROCESS_WAIT_S = 60.0


def test_reflector_process_serves_status_and_stops_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "reflector.sock"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "fabric.control.reflector_cli",
            "--config", str(REPO / "examples" / "lab.yaml"),
            "--listen", f"unix:{sock}",
            # The startup hold is the grace period: longer than the test, so still on when asked.
            "--grace-period", "3600",
            "--insecure",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        def answered() -> api.FabricStatus | None:
            if proc.poll() is not None:
                raise AssertionError(f"fabric-reflector exited with {proc.returncode} before answering")
            try:
                return client.get_status_sync(f"unix:{sock}", timeout=5)
            except client.ReflectorUnavailable:
                return None

        status = wait_until(answered, PROCESS_WAIT_S, "fabric-reflector to answer on its socket")
        assert [c.name for c in status.clusters] == ["east", "west"]
        assert status.holding  # 4 expected nodes, none announced, hold = grace period
        assert status.generation == 0 and status.nodes() == ()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=PROCESS_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # not left behind; the test fails with the timeout
            proc.communicate()
            raise
    assert proc.returncode == 0, err
    assert "holding END_OF_SNAPSHOT for up to 3600s until 4 expected nodes announce" in err


def test_get_status_sync_names_the_target_when_down(tmp_path: Path) -> None:
    target = f"unix:{tmp_path / 'none.sock'}"
    with pytest.raises(client.ReflectorUnavailable, match=f"reflector at {target} is unavailable: UNAVAILABLE"):
        client.get_status_sync(target, timeout=0.5)


def test_protogen_is_idempotent_and_fixes_the_import(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    assert protogen.generate(out) is True
    assert protogen.generate(out) is False
    assert "never edit" in (out / "__init__.py").read_text()
    grpc_text = (out / "fabric_pb2_grpc.py").read_text()
    assert "from . import fabric_pb2 as fabric__pb2" in grpc_text
    assert "\nimport fabric_pb2" not in grpc_text
    # Touching the .proto's output older than the source forces a regeneration.
    old = protogen.PROTO_FILE.stat().st_mtime - 10
    os.utime(out / "fabric_pb2.py", (old, old))
    assert protogen.generate(out) is True


def test_codec_without_stubs_says_how_to_generate_them() -> None:
    code = (
        "import sys; sys.modules['fabric.control.generated.fabric_pb2'] = None\n"
        "import fabric.control.codec\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert "run `python -m fabric.control.protogen`" in proc.stderr
