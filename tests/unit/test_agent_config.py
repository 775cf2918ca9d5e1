"""fabric-agent configuration: precedence and errors that name value and source."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.agent import config
from tests.unit.test_agent_loop import NoProber

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


def test_certificates_from_defaults_to_the_reflector_and_can_point_past_a_relay(tmp_path: Path) -> None:
    """Behind a fabric-relay (SyncNode only), IssueCertificate must still reach the reflector: the
    agent's certificate keeper dials --certificates-from, and --reflector when it is not given."""
    from fabric.agent import agent as agent_mod
    from fabric.netlink import fake

    tls = ["--tls-dir", str(tmp_path)]
    assert config.load(BASE, environ={}).certificates_from == ""
    cfg = config.load([*BASE, *tls, "--certificates-from", "kosmos-fabric-reflector:4880"], environ={})
    assert cfg.certificates_from == "kosmos-fabric-reflector:4880"
    from_env = config.load([*BASE, *tls], environ={"FABRIC_CERTIFICATES_FROM": "10.0.0.5:4880"})
    assert from_env.certificates_from == "10.0.0.5:4880" and from_env.certificate_target == "10.0.0.5:4880"
    with pytest.raises(config.ConfigError, match="--certificates-from"):
        config.load([*BASE, "--certificates-from", "not a target"], environ={})
    plain = config.load([*BASE, *tls], environ={})
    for c, expected in ((cfg, "kosmos-fabric-reflector:4880"), (plain, "10.0.0.1:4880")):
        dp = fake.FakeDataplane()
        dp.add_plain_link("eth0", ip="198.18.0.11")
        agent = agent_mod.Agent(c, dp, handle_signals=False, prober_factory=NoProber)
        assert agent.certificates is not None and agent.certificates.target == expected
        assert agent.session.target == "10.0.0.1:4880"  # SyncNode still goes to --reflector (the relay)
