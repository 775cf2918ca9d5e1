"""One positive-number type for the agent's configuration, fabric-tool and fabric-tool bench."""

from __future__ import annotations

import argparse

import pytest

from fabric import cli_types
from fabric.agent import config
from tools import cli

BASE = ["--reflector", "10.0.0.1:4880", "--cluster", "east", "--node", "e1", "--underlay-ip", "198.18.0.11",
        "--pod-cidr", "10.10.1.0/24"]


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "-inf", "soon", ""])
def test_refused_everywhere_with_the_value_named(text: str) -> None:
    for parse in (cli_types.positive_float, cli_types.positive_seconds):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
            parse(text)
    # The agent's table reports it with the flag and the source (and refused inf before as well).
    with pytest.raises(config.ConfigError) as e:
        config.load([*BASE, f"--resync-period={text}"], environ={})
    assert "--resync-period" in str(e.value) and repr(text) in str(e.value) and "flag" in str(e.value)


def test_accepted_values_and_the_texts_the_tools_print() -> None:
    assert cli_types.positive_float("0.5") == 0.5 and cli_types.positive_seconds("1e3") == 1000.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'x' is not a number of seconds$"):
        cli_types.positive_seconds("x")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'-2' must be a positive number$"):
        cli_types.positive_float("-2")


def test_fabric_tool_uses_it() -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["lab", "up", "x.yaml", "--timeout", "inf"])
    ns = cli.build_parser().parse_args(["lab", "up", "x.yaml", "--timeout", "2.5"])
    assert ns.timeout == 2.5
