"""TranslatorSync's error contract: kernel failures are counted in the pass report and retried,
bugs (a mapping set the validators should have refused, a TypeError) propagate."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from fabric import types
from fabric.agent import render, translator
from fabric.bpf import translate
from fabric.netlink.report import TableStats

PLAN = render.TranslatorPlan(
    mappings=(("10.10.0.0/16", "172.20.0.0/16"),),
    attachments=frozenset({(types.VX_BRIDGE, types.PROGRAM_TUNNEL)}),
)


class _FakeTranslator:
    """translate.Translator without bcc or tc; ``attachments`` raises ``attachments_error``."""

    attachments_error: BaseException | None = None

    def __init__(self, instance: str, *, pin_root: Path, netns: str | None = None) -> None:
        self.mappings: list[translate.Mapping] = []

    def load(self) -> None:
        pass

    def set_mappings(self, mappings: Any, *, source: str = "") -> translate.MappingDelta:
        wanted = translate.validate_mappings(mappings, source)
        delta = translate.MappingDelta(added=[m for m in wanted if m not in self.mappings])
        self.mappings = wanted
        return delta

    def attachments(self, ifnames: Any) -> list[dict[str, str]]:
        if self.attachments_error is not None:
            raise self.attachments_error
        return []

    def attach(self, dev: str, point: translate.AttachPoint) -> None:
        pass

    def detach(self, dev: str, point: translate.AttachPoint) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[_FakeTranslator]:
    monkeypatch.setattr(translate, "Translator", _FakeTranslator)
    monkeypatch.setattr(_FakeTranslator, "attachments_error", None)
    return _FakeTranslator


def test_refused_mapping_set_is_a_bug_and_propagates(tmp_path: Path, fake: type[_FakeTranslator]) -> None:
    # Two local CIDRs that overlap: the topology file and Cluster validators refuse this, so
    # reaching the translator means one of our checks failed.
    bad = render.TranslatorPlan(mappings=(("10.10.0.0/16", "172.20.0.0/16"), ("10.10.1.0/24", "172.21.0.0/24")))
    stats = TableStats()
    with pytest.raises(translate.MappingError, match="overlap"):
        translator.TranslatorSync("east-e1", tmp_path).apply(bad, stats)
    assert stats.failures == 0


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        pytest.param(NetlinkError(errno.EPERM, "Operation not permitted"), errno.EPERM, id="NetlinkError"),
        pytest.param(OSError(errno.ENOENT, "No such file or directory"), errno.ENOENT, id="OSError"),
    ],
)
def test_kernel_failure_reading_filters_is_counted(
    tmp_path: Path, fake: type[_FakeTranslator], exc: BaseException, code: int
) -> None:
    fake.attachments_error = exc
    stats = TableStats()
    translator.TranslatorSync("east-e1", tmp_path).apply(PLAN, stats)
    assert (stats.adds, stats.failures, stats.errnos) == (1, 1, {code: 1})  # the mapping still went in
    assert stats.first_error is not None and "reading tc filters" in stats.first_error


def test_bug_reading_filters_propagates(tmp_path: Path, fake: type[_FakeTranslator]) -> None:
    fake.attachments_error = TypeError("'NoneType' object is not subscriptable")
    stats = TableStats()
    with pytest.raises(TypeError, match="not subscriptable"):
        translator.TranslatorSync("east-e1", tmp_path).apply(PLAN, stats)
    assert stats.failures == 0
