"""The controller-manager's wiring (kubeemu.ctrl.manager) and the volume controllers' shared
event handlers (kubeemu.ctrl.volume.VolumeControllerBase), without a server: controllers are
built on a client that is never opened, and only their constructors and handlers run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kubeemu.client import Client, Obj
from kubeemu.ctrl import manager, provisioner, rootca, volume
from kubeemu.ctrl.base import Informers, WorkQueue

pytestmark = pytest.mark.unit

#: Never connected to: the tests only build controllers and call their handlers.
URL = "http://127.0.0.1:9"


def _drain(q: WorkQueue) -> set[str]:
    async def go() -> set[str]:
        out = set()
        while len(q):
            key = await q.get()
            q.done(key)
            out.add(key)
        return out

    return asyncio.run(go())


def test_registry_is_a_fresh_table_each_call() -> None:
    first = manager.registry()
    first.pop("deployment")
    first["bogus"] = volume.PVProtection
    again = manager.registry()
    assert "deployment" in again and "bogus" not in again


def test_options_reach_the_controllers_that_take_them(tmp_path: Path) -> None:
    client = Client(URL)
    a = manager.registry(manager.Options(storage_root=tmp_path / "a", root_ca="PEM A"))
    b = manager.registry(manager.Options(storage_root=tmp_path / "b", root_ca="PEM B"))
    prov_a = a["lab-local-provisioner"](client, Informers(client))
    prov_b = b["lab-local-provisioner"](client, Informers(client))
    assert isinstance(prov_a, provisioner.LocalProvisioner) and isinstance(prov_b, provisioner.LocalProvisioner)
    assert (prov_a.root, prov_b.root) == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())
    pub_a = a["root-ca-cert-publisher"](client, Informers(client))
    pub_b = b["root-ca-cert-publisher"](client, Informers(client))
    assert isinstance(pub_a, rootca.RootCACertPublisher) and isinstance(pub_b, rootca.RootCACertPublisher)
    assert (pub_a.ca, pub_b.ca) == ("PEM A", "PEM B")


def test_without_options_the_controllers_use_their_defaults() -> None:
    client = Client(URL)
    known = manager.registry()
    prov = known["lab-local-provisioner"](client, Informers(client))
    assert isinstance(prov, provisioner.LocalProvisioner)
    assert prov.root == provisioner.default_storage_root().resolve()
    pub = known["root-ca-cert-publisher"](client, Informers(client))
    assert isinstance(pub, rootca.RootCACertPublisher) and pub.ca.startswith("-----BEGIN CERTIFICATE-----")


def test_an_unreadable_root_ca_file_is_a_usage_error_naming_it(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(SystemExit) as e:
        manager.main(["--server", URL, "--root-ca-file", str(missing)])
    assert e.value.code == 2
    assert f"--root-ca-file {missing}" in capsys.readouterr().err


CLAIM: Obj = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
              "metadata": {"name": "data", "namespace": "ns", "resourceVersion": "5"},
              "spec": {"volumeName": "pv-1"}}
VOLUME: Obj = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-1", "resourceVersion": "6"},
               "spec": {"claimRef": {"namespace": "ns", "name": "data", "uid": "u1"}}}


@pytest.mark.parametrize("cls", [volume.PersistentVolumeBinder, provisioner.LocalProvisioner,
                                 volume.PVCProtection, volume.PVProtection, volume.ExpandController])
def test_every_volume_controller_syncs_changes_and_forgets_its_writes_of_deleted_objects(
        cls: type[volume.VolumeControllerBase]) -> None:
    client = Client(URL)
    ctrl = cls(client, Informers(client))
    ctrl.on_claim_event("MODIFIED", CLAIM, CLAIM)
    ctrl.on_volume_event("ADDED", None, VOLUME)
    assert _drain(ctrl.queue) == {"claim:ns/data", "volume:pv-1"}
    ctrl._assume("claim", CLAIM, created=True)
    ctrl._assume("volume", VOLUME, created=True)
    assert ctrl.claim("ns/data") is not None and ctrl.volume("pv-1") is not None  # assumed, not yet in the cache
    ctrl.on_claim_event("DELETED", CLAIM, CLAIM)
    ctrl.on_volume_event("DELETED", VOLUME, VOLUME)
    assert ctrl.claim("ns/data") is None and ctrl.volume("pv-1") is None
    woken = _drain(ctrl.queue)
    if cls is volume.PersistentVolumeBinder:
        # upstream deleteClaim/deleteVolume: the other side is synced at once (Released, Lost)
        assert woken == {"volume:pv-1", "claim:ns/data"}
    else:
        assert woken == set()
