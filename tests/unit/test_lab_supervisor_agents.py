"""The lab's supervisor keeps the fabric's own processes running (issue 21 section 5): a crashed
agent or reflector is restarted with back-off and counted, one stopped on purpose (``lab
stop-agent``: its record forgotten) is not, and ``lab status`` shows the counts. No root: the
starters are replaced, the state lives under a temporary LAB_ROOT."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric import topology
from tools.lab import planning, supervisor
from tools.lab import state as labstate
from tools.lab.report import render_status
from tools.lab.state import LabState, ProcRecord, save_state

TOPOLOGY = """
clusters:
  - name: east
    mode: p2p
    podCIDRs: [10.10.0.0/16]
    nodes: [{name: e1}, {name: e2}]
"""
ALIVE = 1
DEAD = ProcRecord(pid=2**22 + 7, start=1, netns="", log="", argv=["x"])


def _lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[LabState, list[str]]:
    monkeypatch.setattr(labstate, "LAB_ROOT", tmp_path / "labs")
    p = tmp_path / "t.yaml"
    p.write_text(TOPOLOGY)
    st = planning.plan("t", topology.load(p))
    st.reflector = ProcRecord(pid=ALIVE, start=None, netns="", log="", argv=["r"])
    for n in st.nodes():
        n.agent = ProcRecord(pid=ALIVE, start=None, netns="", log="", argv=["a"])
    save_state(st)
    labstate.lock_path("t").parent.mkdir(parents=True, exist_ok=True)
    labstate.lock_path("t").touch()
    starts: list[str] = []

    def fake_agent(state: LabState, node: object) -> ProcRecord:
        starts.append(f"agent/{node.key}")  # type: ignore[attr-defined]
        rec = ProcRecord(pid=ALIVE, start=None, netns="", log="", argv=["a"])
        node.agent = rec  # type: ignore[attr-defined]
        save_state(state)
        return rec

    def fake_reflector(state: LabState) -> ProcRecord:
        starts.append("reflector")
        state.reflector = ProcRecord(pid=ALIVE, start=None, netns="", log="", argv=["r"])
        save_state(state)
        return state.reflector

    monkeypatch.setattr(supervisor, "start_agent", fake_agent)
    monkeypatch.setattr(supervisor, "start_reflector", fake_reflector)
    monkeypatch.setattr(ProcRecord, "running", lambda self: self.pid == ALIVE)
    return st, starts


def _set(update: object) -> None:
    got = labstate.load_state("t")
    assert got is not None
    update(got)  # type: ignore[operator]
    save_state(got)


def test_a_crashed_agent_is_restarted_with_backoff_and_counted(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, starts = _lab(tmp_path, monkeypatch)
    now = [100.0]
    sup = supervisor.Supervisor("t", clock=lambda: now[0])
    assert sup.round() == []  # everything runs

    def crash_e1(st: LabState) -> None:
        next(iter(st.nodes())).agent = DEAD

    _set(crash_e1)
    assert sup.round() == ["agent/east/e1"]  # at once
    # It crashes again right away: the next restart waits the back-off (10 s).
    _set(crash_e1)
    now[0] = 105.0
    assert sup.round() == []
    now[0] = 116.0
    assert sup.round() == ["agent/east/e1"]
    assert starts == ["agent/east/e1", "agent/east/e1"]
    got = labstate.load_state("t")
    assert got is not None and got.restarts == {"agent/east/e1": 2}
    # The other node's agent was never touched.
    assert list(got.nodes())[1].agent is not None and list(got.nodes())[1].agent.pid == ALIVE


def test_a_crashed_reflector_is_restarted_and_a_stopped_agent_is_not(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, starts = _lab(tmp_path, monkeypatch)
    now = [0.0]
    sup = supervisor.Supervisor("t", clock=lambda: now[0])

    def crash_reflector_stop_e2(st: LabState) -> None:
        st.reflector = DEAD
        list(st.nodes())[1].agent = None  # lab stop-agent forgets the record: stopped on purpose

    _set(crash_reflector_stop_e2)
    assert sup.round() == ["reflector"]
    now[0] = 60.0
    assert sup.round() == []
    assert starts == ["reflector"]
    got = labstate.load_state("t")
    assert got is not None and got.restarts == {"reflector": 1} and list(got.nodes())[1].agent is None


def test_lab_status_shows_agent_and_reflector_restarts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.lab.report import status_doc

    st, _ = _lab(tmp_path, monkeypatch)
    st.restarts = {"agent/east/e2": 3, "reflector": 1}
    doc = status_doc(st, None, "not asked")
    nodes = {n["name"]: n for n in doc["clusters"][0]["nodes"]}
    assert (nodes["e1"]["agent_restarts"], nodes["e2"]["agent_restarts"]) == (0, 3)
    assert doc["reflector"]["restarts"] == 1
    out = render_status(doc)
    assert "restarts of agent/east/e2: 3" in out and "restarts of reflector: 1" in out
    assert "4 restarts so far" in out
