"""The root CA publisher (``--controllers root-ca-cert-publisher``), after upstream's
``pkg/controller/certificates/rootcacertpublisher``: every namespace gets a ConfigMap
``kube-root-ca.crt`` holding the cluster's CA bundle under ``ca.crt``.

Why it matters: the ServiceAccount admission plugin gives every pod a projected
``kube-api-access-*`` volume whose sources include that ConfigMap, not optional; a kubelet
mounting the volume waits until it exists (``FailedMount``), as upstream's does. So without this
controller no pod with a token volume would start.

The bundle is the file given as ``--root-ca-file`` (the lab writes one per lab, see
``tools.lab.kube.root_ca_file``); without it a self-signed CA certificate is made at start
(:func:`self_signed_ca`). kubeemu serves plain HTTP, so nothing verifies a server against this
CA yet; it is published because workloads read the file, and the security issue (mTLS) will give
the API server a certificate from it.

Per namespace key, in order: skip a namespace being deleted (upstream does); create the
ConfigMap if missing; otherwise put back ``ca.crt`` and the description annotation when someone
changed them (other data keys are kept, as upstream).
"""

from __future__ import annotations

import datetime
import logging

from kubeemu.client import ApiStatusError, Client, Obj, resource_path
from kubeemu.ctrl.base import Controller, Informers

_log = logging.getLogger(__name__)

CONFIGMAP = "kube-root-ca.crt"
DESCRIPTION_ANNOTATION = "kubernetes.io/description"
DESCRIPTION = (
    "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the "
    "internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes "
    "clusters."
)

def self_signed_ca(common_name: str = "kubeemu-ca") -> str:
    """A fresh self-signed CA certificate (PEM), RSA 2048, ten years: what ``kubeadm init``
    makes for a new cluster. Needs ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class RootCACertPublisher(Controller):
    """Keeps ``kube-root-ca.crt`` in every namespace; keys are namespace names."""

    name = "root-ca-cert-publisher"

    def __init__(self, client: Client, informers: Informers, root_ca: str | None = None) -> None:
        """``root_ca``: the PEM bundle to publish (the controller-manager's ``--root-ca-file``);
        None: a self-signed CA made now, as a fresh ``kubeadm init`` would."""
        super().__init__(client, informers)
        if root_ca is None:
            root_ca = self_signed_ca()
            _log.info("no --root-ca-file: publishing a self-signed CA made at start")
        self.ca = root_ca
        self.namespaces = informers.get("v1", "namespaces")
        self.configmaps = informers.get("v1", "configmaps")
        self.namespaces.add_handler(lambda _t, _old, new: self.enqueue(new) if _t != "DELETED" else None)
        self.configmaps.add_handler(self._on_configmap)

    def _on_configmap(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        if obj is not None and obj["metadata"].get("name") == CONFIGMAP:
            self.queue.add(str(obj["metadata"]["namespace"]))

    async def reconcile(self, key: str) -> None:
        ns = self.namespaces.get(key)
        terminating = (ns or {}).get("status", {}).get("phase") == "Terminating"
        if ns is None or ns["metadata"].get("deletionTimestamp") or terminating:
            return
        cur = self.configmaps.get(f"{key}/{CONFIGMAP}")
        path = resource_path("v1", "configmaps", key)
        if cur is None:
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": CONFIGMAP, "annotations": {DESCRIPTION_ANNOTATION: DESCRIPTION}},
                    "data": {"ca.crt": self.ca}}
            try:
                await self.client.create(path, body)
            except ApiStatusError as e:
                if not e.conflict:  # AlreadyExists: the cache is behind; the watch brings it
                    raise
            return
        data = cur.get("data") or {}
        ann = cur["metadata"].get("annotations") or {}
        if data.get("ca.crt") == self.ca and ann.get(DESCRIPTION_ANNOTATION) == DESCRIPTION:
            return
        updated = dict(cur)
        updated["data"] = {**data, "ca.crt": self.ca}
        updated["metadata"] = {**cur["metadata"], "annotations": {**ann, DESCRIPTION_ANNOTATION: DESCRIPTION}}
        await self.client.replace(resource_path("v1", "configmaps", key, CONFIGMAP), updated)
