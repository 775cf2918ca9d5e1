"""The lab's certificates: the same steps as a Kubernetes install, on files in the lab's state
directory (``<state dir>/pki``), so the lab is secure by default (issue 20).

What is made, when, and by whom (in this order):

1. **Install** (the lab's reflector starts: :func:`reflector_dirs`): the fabric CA in ``pki/ca``
   (``ca.crt``, ``ca.key``), made once and never overwritten (a lab that is up keeps its CA, as
   ``fabric-tool install`` keeps the CA Secret), and the reflector's server certificate in
   ``pki/reflector`` (re-issued when missing or not acceptable). The reflector signs node
   certificates with the CA (``--ca-dir``).
2. **Join** (``lab up`` for its clusters, ``fabric-tool join --lab``: :func:`bootstrap_dir`): the cluster's short-lived
   bootstrap credential ``bootstrap/<cluster>`` in ``pki/bootstrap-<cluster>`` (made again once
   it expired: joining again). ``unjoin`` removes it (:func:`remove_bootstrap`); an agent started
   later finds none and, without a certificate of its own, gets nothing.
3. **Agents** make their own key and get their ``node/<cluster>/<node>`` certificate from the
   reflector with it (``--bootstrap-dir``), into ``pki/node-<cluster>-<node>`` (:func:`node_dir`),
   and renew it themselves. Nothing here issues a node certificate.
4. The lab's own clients: ``reader/lab`` for its status calls (:func:`reader_dir`),
   ``admin/lab`` for ``fabric-tool records --lab`` (:func:`admin_tls`; WatchRecords), and
   ``tree/<root id>`` for the lab's ``kosmos-tree`` (:func:`tree_dir`), ``scheduler/lab`` for the
   host cluster's ``kosmos-scheduler`` (:func:`scheduler_dir`), ``mcs/lab`` for its
   ``kosmos-mcs`` (:func:`tools.lab.mcs.ensure_certificate`), issued from the CA as
   an operator would with ``fabric-tool cert issue``.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from fabric.control import identity, pki, tls
from tools.lab.state import LabState

#: Lifetime of a cluster's bootstrap credential (``fabric-tool join --bootstrap-ttl``'s default).
BOOTSTRAP_LIFETIME = datetime.timedelta(hours=1)
READER = identity.role(identity.READER, "lab")
#: ``fabric-tool records --lab``: listing records needs WatchRecords, which ``reader`` may not call
#: (it sees status only); in the lab its user is the fabric's administrator.
ADMIN = identity.role(identity.ADMIN, "lab")


def pki_root(state: LabState) -> Path:
    return state.state_dir / "pki"


def ca_dir(state: LabState) -> Path:
    return pki_root(state) / "ca"


def ensure_ca(state: LabState) -> pki.CA:
    """The lab's fabric CA: loaded, or made the first time (never overwritten)."""
    d = ca_dir(state)
    if (d / pki.CA_KEY_FILE).exists():
        return pki.CA.load(d)
    ca = pki.make_ca(f"kosmos-fabric lab {state.name} CA")
    ca.save(d)
    return ca


def _usable(d: Path, usage: pki.Usage, ca: pki.CA, who: identity.Identity | None = None) -> bool:
    try:
        cert, _key, ca_pem = tls.TLSDir(d).read()
    except tls.TLSError:
        return False
    if ca_pem != ca.pem or pki.explain(cert, ca_pem, usage) is not None:
        return False
    return who is None or pki.certificate_identity(pki.load_cert(cert)) == who


def _server_dir(state: LabState, name: str) -> Path:
    """``pki/<name>``: a server certificate for the lab's gateway address (where the reflector
    and the relays listen), re-issued when unusable."""
    ca = ensure_ca(state)
    d = pki_root(state) / name
    if not _usable(d, "server", ca):
        key = pki.new_key()
        pki.write_tls_dir(d, key, ca.sign_server(key.public_key(), ips=[state.gateway]), ca.cert)
    return d


def reflector_dirs(state: LabState) -> tuple[Path, Path]:
    """(server TLS dir, CA dir) of the lab's reflector; made as needed (install)."""
    return _server_dir(state, "reflector"), ca_dir(state)


def relay_dirs(state: LabState, index: int) -> tuple[Path, Path]:
    """(server TLS dir served to agents, client TLS dir of identity ``relay/relay-<index>`` shown
    to the reflector) of the lab's relay ``index``; made as needed."""
    who = identity.role(identity.RELAY, f"relay-{index}")
    return _server_dir(state, "relay-server"), client_dir(state, f"relay-{index}", who, datetime.timedelta(days=365))


def client_dir(state: LabState, name: str, who: identity.Identity, lifetime: datetime.timedelta) -> Path:
    """``pki/<name>``: a client certificate of ``who`` from the lab's CA (re-issued when unusable),
    as an operator issues one with ``fabric-tool cert issue`` (``kosmos-mcs``'s ``mcs/lab``)."""
    ca = ensure_ca(state)
    d = pki_root(state) / name
    if not _usable(d, "client", ca, who):
        key = pki.new_key()
        pki.write_tls_dir(d, key, ca.sign_client(who, key.public_key(), lifetime=lifetime), ca.cert)
    return d


def bootstrap_path(state: LabState, cluster: str) -> Path:
    """Where the bootstrap credential of ``cluster`` is (agents are pointed there; it exists
    between the cluster's join and its unjoin)."""
    return pki_root(state) / f"bootstrap-{cluster}"


def bootstrap_dir(state: LabState, cluster: str, lifetime: datetime.timedelta = BOOTSTRAP_LIFETIME) -> Path:
    """Join: the bootstrap credential of ``cluster``, made when missing or expired."""
    return client_dir(state, f"bootstrap-{cluster}", identity.role(identity.BOOTSTRAP, cluster), lifetime)


def remove_bootstrap(state: LabState, cluster: str) -> None:
    """``unjoin``: the cluster's bootstrap credential is gone."""
    shutil.rmtree(bootstrap_path(state, cluster), ignore_errors=True)


def node_dir(state: LabState, cluster: str, node: str) -> Path:
    """Where the agent of ``cluster/node`` keeps the certificate it gets and renews itself."""
    return pki_root(state) / f"node-{cluster}-{node}"


def reader_dir(state: LabState) -> Path:
    """``reader/lab``: the lab's status calls."""
    return client_dir(state, "reader", READER, datetime.timedelta(days=365))


def reader_tls(state: LabState) -> tls.TLSDir | None:
    """The lab's status identity once the lab has a CA (None before: nothing to ask yet)."""
    if not (ca_dir(state) / pki.CA_KEY_FILE).exists():
        return None
    return tls.TLSDir(reader_dir(state))


def admin_tls(state: LabState) -> tls.TLSDir | None:
    """``admin/lab``, for the lab's record listings (:data:`ADMIN`), once the lab has a CA."""
    if not (ca_dir(state) / pki.CA_KEY_FILE).exists():
        return None
    return tls.TLSDir(client_dir(state, "admin", ADMIN, datetime.timedelta(days=365)))


def tree_dir(state: LabState, root_id: str) -> Path:
    """``tree/<root id>``: the lab's ``kosmos-tree`` publishes its records as it."""
    return client_dir(state, "tree", identity.role(identity.TREE, root_id), datetime.timedelta(days=365))


def scheduler_path(state: LabState) -> Path:
    """Where the ``scheduler/lab`` certificate of the lab's host scheduler is (:func:`scheduler_dir`)."""
    return pki_root(state) / "scheduler"


def scheduler_dir(state: LabState) -> Path:
    """``scheduler/lab``: the host cluster's ``kosmos-scheduler`` reads the tree manager's and the
    fabric's records as it (issue 19), issued as :func:`tree_dir` is."""
    return client_dir(state, "scheduler", identity.role(identity.SCHEDULER, "lab"), datetime.timedelta(days=365))
