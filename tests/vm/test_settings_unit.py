"""The VM tier's pure parts (no root, no qemu): settings, the generated topology, what each VM
is given to run, the image's cache key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tools.lab.state import LabUsageError
from tools.vm import image as imagemod
from tools.vm import runner

pytestmark = pytest.mark.unit
SETTINGS = runner.DEFAULT_SETTINGS


def _write(tmp_path: Path, doc: dict[str, object]) -> Path:
    p = tmp_path / "settings.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _doc() -> dict[str, object]:
    doc = yaml.safe_load(SETTINGS.read_text())
    assert isinstance(doc, dict)
    return doc


def test_every_node_is_pinned_to_its_vms_address_in_file_order() -> None:
    vm, topo = runner.load_settings(SETTINGS)
    nodes = [(c["name"], n["name"], n["underlay"]) for c in topo["clusters"] for n in c["nodes"]]
    assert nodes == [("east", "vm1", "192.168.77.11"), ("west", "vm2", "192.168.77.12"),
                     ("west", "vm3", "192.168.77.13")]  # fmt: skip
    assert "vm" not in topo and vm["memory"] == 512
    st = runner.new_state("t", SETTINGS, None)
    lab = runner.lab_of(st)
    assert lab.reflector_address == "192.168.77.11:4880"
    assert {n.key: n.underlay_ip for n in lab.nodes()} == {"east/vm1": "192.168.77.11", "west/vm2": "192.168.77.12",
                                                            "west/vm3": "192.168.77.13"}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["clusters"][0]["nodes"][0].update(underlay="192.168.77.99"), "'underlay' is the VM's address"),
        (lambda d: d["vm"].update(memory=100), "vm.memory 100"),
        (lambda d: d["vm"].update(disk=3), "unknown keys ['disk']"),
        (lambda d: d["vm"].update(reflector="vm9"), "vm.reflector 'vm9'"),
        (lambda d: d["clusters"][1]["nodes"][0].update(name="vm1"), "node names must be unique"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(tmp_path: Path, change: object, message: str) -> None:
    doc = _doc()
    change(doc)  # type: ignore[operator]
    with pytest.raises(LabUsageError) as e:
        runner.new_state("t", _write(tmp_path, doc), None)
    assert message in str(e.value) and "settings.yaml" in str(e.value)


def test_each_vm_gets_the_labs_cni_and_its_own_agent_flags() -> None:
    st = runner.new_state("t", SETTINGS, None)
    lab = runner.lab_of(st)
    node = lab.node("west/vm2")
    assert node is not None
    cni = runner.cni_script(lab, node)
    # host-gw to the other node of west over the private NIC, the lab service DNAT, the pod.
    assert "route replace 10.10.1.0/24 via 192.168.77.13 dev eth1" in cni
    assert "ip daddr 10.96.0.10 dnat to 10.10.0.2" in cni
    assert f"ip netns add {node.pods[0].netns}" in cni
    argv = runner.agent_argv(lab, node)
    assert argv[argv.index("--reflector") + 1] == "192.168.77.11:4880"
    assert argv[argv.index("--pod-cidr") + 1] == node.pod_cidr == "10.10.0.0/24"
    assert argv[argv.index("--underlay-ip") + 1] == "192.168.77.12"


def test_the_image_cache_key_follows_its_inputs() -> None:
    doc = {"suite": "bookworm", "mirror": "m", "packages": ["a"], "python": ["x==1"], "python_version": "3.11",
           "recipe": 1, "guest_files": "h"}  # fmt: skip
    key = imagemod.input_hash(doc)
    assert imagemod.input_hash(dict(doc)) == key
    for field, value in (("packages", ["a", "b"]), ("python", ["x==2"]), ("guest_files", "h2"), ("mirror", "n")):
        assert imagemod.input_hash({**doc, field: value}) != key, field


def test_only_a_finished_build_counts_and_dead_builds_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image directory without its manifest (a build that died between steps) is not an
    image; ``.build-*`` leftovers of builders that are gone are removed, a running one's kept."""
    monkeypatch.setattr(imagemod, "inputs", lambda: {"suite": "bookworm", "recipe": 1})
    h = imagemod.input_hash()
    (tmp_path / h).mkdir()
    (tmp_path / h / "disk.qcow2").write_bytes(b"half")
    assert imagemod.cached(tmp_path) is None
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f".build-{h}-{dead}" / "rootfs").mkdir(parents=True)
    alive = tmp_path / f".build-other-{os.getppid()}"
    alive.mkdir()
    assert imagemod.remove_dead_builds(tmp_path) == [tmp_path / f".build-{h}-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([h, alive.name])
    (tmp_path / h / "manifest.json").write_text("{}")
    image = imagemod.cached(tmp_path)
    assert image is not None and image.dir == tmp_path / h
