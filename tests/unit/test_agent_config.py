"""fabric-agent configuration: precedence and errors that name value and source."""

from __future__ import annotations

import pytest

from fabric.agent import config

BASE = ["--reflector", "10.0.0.1:4880", "--cluster", "east", "--node", "e1", "--underlay-ip", "198.18.0.11",
        "--pod-cidr", "10.10.1.0/24"]


def test_flags_parse_with_defaults() -> None:
    cfg = config.load(BASE, environ={})
    assert cfg.pod_cidrs == ("10.10.1.0/24",)
    assert cfg.resync_period_s == 30.0 and cfg.table == 254  # main: no ip rule (BENCHMARKS.md, datapath)
    assert config.load([*BASE, "--table", "main"], environ={}).table == 254
    assert config.load([*BASE, "--table", "200"], environ={}).table == 200


def test_environment_fills_missing_flags_and_flags_win() -> None:
    env = {"FABRIC_RESYNC_PERIOD": "5", "FABRIC_NODE": "other", "FABRIC_POD_CIDR": "10.10.2.0/24, 10.10.3.0/24"}
    cfg = config.load([a for a in BASE if a not in ("--pod-cidr", "10.10.1.0/24")], environ=env)
    assert cfg.resync_period_s == 5.0
    assert cfg.node == "e1"  # the flag wins over the environment
    assert cfg.pod_cidrs == ("10.10.2.0/24", "10.10.3.0/24")


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--table", "255", "local"),
        ("--pod-cidr", "10.10.1.5/24", "10.10.1.5/24"),
        ("--underlay-ip", "nope", "nope"),
        ("--resync-period", "-1", "positive"),
        ("--reflector", "no-port", "HOST:PORT"),
    ],
)
def test_bad_flag_values_name_flag_value_and_source(flag: str, value: str, words: str) -> None:
    argv = [*BASE, flag, value] if flag != "--pod-cidr" else [*BASE[:-2], flag, value]
    with pytest.raises(config.ConfigError) as e:
        config.load(argv, environ={})
    msg = str(e.value)
    assert flag in msg and value in msg and "flag" in msg and words in msg


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(config.ConfigError, match="FABRIC_TABLE"):
        config.load(BASE, environ={"FABRIC_TABLE": "x"})


def test_missing_required_is_named() -> None:
    with pytest.raises(config.ConfigError, match="--cluster"):
        config.load(["--reflector", "a:1"], environ={})


def test_cleanup_needs_no_identity() -> None:
    assert config.load(["--cleanup"], environ={}).cleanup
