"""root-ca-cert-publisher: every namespace gets kube-root-ca.crt (the token volume of every pod
needs it); a deleted or edited one is put back; a namespace being deleted gets none."""

from __future__ import annotations

import asyncio

from kubeemu.client import ApiStatusError, Client, resource_path
from kubeemu.ctrl import manager, rootca
from kubeemu.runner import ServerThread
from tests.kubeemu_cluster import ControllerManager


def test_self_signed_ca_is_a_ca_certificate() -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(rootca.self_signed_ca("t").encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject == cert.issuer


def test_publisher_keeps_the_configmap_in_every_namespace() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n"
    with ServerThread(name="rootca", service_cidrs=("10.96.0.0/24",)) as emu:

        async def go() -> None:
            async with Client(emu.url) as c:
                cm = ControllerManager(emu.url, "root-ca-cert-publisher", manager.Options(root_ca=pem))
                cm.start()
                await c.create("/api/v1/namespaces", {"metadata": {"name": "team"}})
                cur: dict[str, object] = {}

                async def published(ns: str) -> bool:
                    try:
                        cur.update(await c.get(resource_path("v1", "configmaps", ns, rootca.CONFIGMAP)))
                    except ApiStatusError as e:
                        if e.not_found:
                            return False
                        raise
                    return True

                for ns in ("default", "kube-system", "team"):
                    deadline = asyncio.get_running_loop().time() + 10
                    while not await published(ns):
                        assert asyncio.get_running_loop().time() < deadline, f"no kube-root-ca.crt in {ns}"
                        await asyncio.sleep(0.05)
                    assert cur["data"] == {"ca.crt": pem}
                path = resource_path("v1", "configmaps", "team", rootca.CONFIGMAP)
                edited = await c.get(path)
                edited["data"] = {"ca.crt": "tampered", "extra": "kept"}
                await c.replace(path, edited)
                restored: dict[str, object] = {}

                async def fixed() -> bool:
                    restored.update(await c.get(path))
                    return restored["data"] == {"ca.crt": pem, "extra": "kept"}

                deadline = asyncio.get_running_loop().time() + 10
                while not await fixed():
                    assert asyncio.get_running_loop().time() < deadline, f"not restored: {restored}"
                    await asyncio.sleep(0.05)
                await c.delete(path)
                deadline = asyncio.get_running_loop().time() + 10
                while not await published("team"):
                    assert asyncio.get_running_loop().time() < deadline, "a deleted kube-root-ca.crt is not re-created"
                    await asyncio.sleep(0.05)
                await cm.stop()

        asyncio.run(go())
