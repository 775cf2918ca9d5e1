"""``python -m tools.bench.control.accept`` runs end to end at a tiny size: every stream is
answered, once per (servers, busy) pair, and bad arguments are refused naming the flag."""

from __future__ import annotations

import json

import pytest

from tools.bench.control import accept


def test_every_stream_is_answered_for_each_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert accept.main(["--servers", "1,2", "--n", "20", "--busy-ms", "0,1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["busy_ms"], r["servers"]) for r in rows] == [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]
    for r in rows:
        assert r["grpc_defaults"] is False
        assert r["n"] == 20 and r["answered"] == 20 and r["failed"] == {} and r["seconds"] > 0


def test_grpc_defaults_are_reported_and_answer_a_few_streams(capsys: pytest.CaptureFixture[str]) -> None:
    assert accept.main(["--servers", "1", "--n", "20", "--busy-ms", "0", "--grpc-defaults"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["grpc_defaults"] is True and row["answered"] == 20 and row["failed"] == {}


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--servers", "0"], "--servers"), (["--busy-ms", "x"], "--busy-ms"), (["--n", "0"], "--n")],
)
def test_bad_arguments_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(SystemExit) as exc:
        accept.main(argv)
    assert flag in str(exc.value)
