"""Authorization at the reflector: what a client's proven identity lets it do.

The identity is the one a client certificate proves (:mod:`fabric.control.identity`, read with
:func:`~fabric.control.identity.of_context`); these rules are pure functions of it and of what the
client asks, so the reflector's handlers call them and act on the answer (refuse, count, log),
and the unit tests check them without a channel. A plaintext session (``--insecure``) has no
identity (None): it keeps the rules that need none (admission, the record limits) and nothing
here refuses it, because without a certificate a rule would only be a speed bump.

The rules, per RPC (:data:`CALLERS` is the table):

=================  ==================================  =======================================
RPC                roles that may call it              and then
=================  ==================================  =======================================
``SyncNode``       ``node``                            the announcement is the certificate's
                                                       node: same cluster, same node name
                                                       (:func:`announcement_refusals`); the
                                                       rest is admission's (the cluster is a
                                                       member, pod CIDRs inside it and held by
                                                       no other node: first holder wins)
``PublishRecords`` ``tree``, ``scheduler``, ``admin``  the publisher is the certificate's
                                                       identity (:func:`publisher_refusal`)
                                                       and publishes only its role's kinds
                                                       (:func:`kind_refusal`, :data:`KINDS`),
                                                       never :data:`RESERVED_KINDS` (the
                                                       reflector's own, ``fabric.kosmos.io/``)
``WatchRecords``   ``node``, ``tree``, ``scheduler``,  -
                   ``admin``, ``mcs``
``WatchTopology``  as WatchRecords but ``mcs``         -
``GetStatus``      every role but ``bootstrap``        ``reader`` sees status only, ``mcs``
                                                       status and records (publishes nothing)
``IssueCert...``  ``bootstrap``, ``node``            :func:`issue_refusal`: ``bootstrap/<c>``
                                                       gets ``node/<c>/<any node>``,
                                                       ``node/<c>/<n>`` renews only itself;
                                                       ``<c>`` a member of the configuration
``RelayNodes``     ``relay``                           each agent session it carries is
                                                       authorized as ``SyncNode`` above, with
                                                       the node identity the relay verified
=================  ==================================  =======================================

``bootstrap`` may call nothing but IssueCertificate: its only use is asking for a node
certificate (:mod:`fabric.control.bootstrap`). A cluster removed by ``unjoin`` gets no
certificate any more (with SyncNode refusing its agents at their next connect, that is the
revocation: certificates are short-lived, there is no revocation list). Every refusal is counted by reason and
identity (``fabric_reflector_rejections_total{reason,identity}``, :func:`metric_label`) and
logged once per identity and reason (:class:`~fabric.control.bounds.OnceLog`).

The ``identity`` label's cardinality is bounded (:class:`IdentityLabels`): every identity is one
the fabric CA signed, but a bootstrap credential gets a certificate of *any* node name of its
cluster, so a leaked one mints identities without end, each a new series if refused. The first
:data:`MAX_IDENTITY_LABELS` (1,000) distinct identities refused keep their label for the
reflector's life; refusals of later ones are counted under ``identity="other"``
(:data:`OTHER_LABEL`; never an identity, which always holds a ``/``). ``insecure`` and
``unidentified`` are always their own.
"""

from __future__ import annotations

from collections.abc import Collection

from fabric import types
from fabric.control import admission, api, identity
from fabric.control.identity import Identity

SYNC_NODE = "SyncNode"
GET_STATUS = "GetStatus"
WATCH_TOPOLOGY = "WatchTopology"
WATCH_RECORDS = "WatchRecords"
PUBLISH_RECORDS = "PublishRecords"
ISSUE_CERTIFICATE = "IssueCertificate"
RELAY_NODES = "RelayNodes"

_READERS = frozenset({identity.NODE, identity.TREE, identity.SCHEDULER, identity.ADMIN})

#: Which roles may call each RPC (see the module docstring).
CALLERS: dict[str, frozenset[str]] = {
    SYNC_NODE: frozenset({identity.NODE}),
    GET_STATUS: _READERS | {identity.READER, identity.MCS},
    WATCH_TOPOLOGY: _READERS,
    WATCH_RECORDS: _READERS | {identity.MCS},
    PUBLISH_RECORDS: frozenset({identity.TREE, identity.SCHEDULER, identity.ADMIN}),
    ISSUE_CERTIFICATE: frozenset({identity.BOOTSTRAP, identity.NODE}),
    # A relay's sessions are then each authorized as SyncNode, with the node identity the relay
    # verified (fabric.control.relay_hub): the relay vouches, the reflector still decides.
    RELAY_NODES: frozenset({identity.RELAY}),
}

#: Which record kinds each publishing role owns: a kind is ``<group>/<name>`` and a role owns
#: the kinds of its group (``tree.kosmos.io/leaf-resources`` is the tree's); ``"*"``: every
#: kind (the operator's own tools). Why groups and not a list of kinds: a role's new kind needs
#: no change here, and no role can publish into another's group.
KINDS: dict[str, tuple[str, ...]] = {
    identity.TREE: ("tree.kosmos.io/",),
    identity.SCHEDULER: ("scheduler.kosmos.io/",),
    identity.ADMIN: ("*",),
}

#: Kind groups no certificate may publish, whatever its role (``admin``'s ``"*"`` included):
#: the reflector derives these records itself (fabric.control.record_store, rule 7), so a
#: subscriber can trust them.
RESERVED_KINDS: tuple[str, ...] = ("fabric.kosmos.io/",)

#: The ``identity`` label of a refusal on a plaintext session, and of a TLS peer whose
#: certificate names no identity (a certificate of the fabric CA not made for a fabric client).
INSECURE_LABEL = "insecure"
UNIDENTIFIED_LABEL = "unidentified"
#: The ``identity`` label of refusals of identities past the first :data:`MAX_IDENTITY_LABELS`.
OTHER_LABEL = "other"
MAX_IDENTITY_LABELS = 1000

_R = api.RejectionReason


def metric_label(ident: Identity | None) -> str:
    """The identity of a refusal: ``<role>/<name>``, or :data:`INSECURE_LABEL` (for the log and
    the status; the metric counts it under :class:`IdentityLabels`' bounded label)."""
    return INSECURE_LABEL if ident is None else str(ident)


class IdentityLabels:
    """The ``identity`` label a refusal is counted under: its own for the first ``limit``
    distinct identities (kept for the process's life: a counter's series does not vanish),
    :data:`OTHER_LABEL` for any later one (module docstring). Bounds both the metric's series
    and the reflector's table of counts."""

    FIXED = frozenset({INSECURE_LABEL, UNIDENTIFIED_LABEL})

    def __init__(self, limit: int = MAX_IDENTITY_LABELS) -> None:
        self.limit = limit
        self._kept: set[str] = set()

    def __call__(self, label: str) -> str:
        if label in self.FIXED or label in self._kept:
            return label
        if len(self._kept) < self.limit:
            self._kept.add(label)
            return label
        return OTHER_LABEL


def rpc_refusal(ident: Identity | None, rpc: str) -> str | None:
    """Why ``ident`` may not call ``rpc`` at all (None: it may; a plaintext session may)."""
    if ident is None:
        return None
    allowed = CALLERS[rpc]
    if ident.role in allowed:
        return None
    if ident.role == identity.READER:
        return f"{ident} may read the status only (GetStatus), not call {rpc}"
    return f"{ident} may not call {rpc} (role {ident.role!r}; allowed: {', '.join(sorted(allowed))})"


def announcement_refusals(ident: Identity | None, ann: types.NodeAnnouncement) -> list[admission.Refusal]:
    """Why ``ident`` may not announce ``ann`` (empty: it may, as far as identity goes; admission
    then checks the announcement itself). A certificate of ``node/A/n2`` may announce only
    node n2 of cluster A: not A's n1 (another agent's node), not a node of cluster B."""
    refused = rpc_refusal(ident, SYNC_NODE)
    if refused is not None:
        return [admission.Refusal(_R.UNAUTHORIZED, refused)]
    if ident is None or (ident.cluster, ident.node) == (ann.cluster, ann.name):
        return []
    return [admission.Refusal(
        _R.UNAUTHORIZED, f"announcement of node {ann.cluster}/{ann.name} by {ident}: a certificate may announce "
        f"only its own node ({ident.cluster}/{ident.node})",
    )]  # fmt: skip


def issue_refusal(ident: Identity | None, node: str, members: Collection[str]) -> str | None:
    """Why ``ident`` may not get a certificate of node ``node`` of its cluster (None: it may).
    ``bootstrap/<c>`` may get ``node/<c>/<any node>``; ``node/<c>/<n>`` only ``node/<c>/<n>``
    (a renewal); either only while ``<c>`` is one of ``members`` (the clusters of the current
    configuration). A plaintext session never gets one: nothing proves who asks."""
    if ident is None:
        return f"{ISSUE_CERTIFICATE} needs mutual TLS: certificates go only to a proven bootstrap or node identity"
    refused = rpc_refusal(ident, ISSUE_CERTIFICATE)
    if refused is not None:
        return refused
    cluster = ident.cluster or ""
    try:
        wanted = identity.node(cluster, node)
    except ValueError as e:
        return f"{ident} asks for a certificate of node {node!r}: {e}"
    if ident.role == identity.NODE and wanted != ident:
        return f"{ident} may renew only its own certificate, not ask for {wanted}"
    if cluster not in members:
        return f"{ident} asks for {wanted}: cluster {cluster!r} is not a member of the fabric (unjoined?)"
    return None


def publisher_refusal(ident: Identity | None, declared: str) -> str | None:
    """Why a PublishRecords session of ``ident`` that declares ``declared`` is refused (None:
    it publishes as ``ident``, or, on a plaintext session, as ``declared``)."""
    refused = rpc_refusal(ident, PUBLISH_RECORDS)
    if refused is not None:
        return refused
    if ident is not None and declared and declared != str(ident):
        return f"PublishRecords of {ident} declares identity {declared!r}: a publisher publishes as its certificate"
    return None


def kind_refusal(publisher: str, kind: str) -> str | None:
    """Why the proven ``publisher`` (``<role>/<name>``) may not publish ``kind`` (None: it may),
    by :data:`KINDS`. Applied to sessions of a certificate only (the record store knows which)."""
    role = publisher.partition("/")[0]
    if any(kind.startswith(prefix) for prefix in RESERVED_KINDS):
        return f"kinds {', '.join(p + '*' for p in RESERVED_KINDS)} are the reflector's own; no client publishes them"
    owned = KINDS.get(role, ())
    if "*" in owned or any(kind.startswith(prefix) for prefix in owned):
        return None
    if not owned:
        return f"role {role!r} publishes no kinds"
    return f"role {role!r} publishes only kinds {', '.join(p + '*' for p in owned)}"


class Unauthorized(Exception):
    """A request refused by these rules: ``text`` says why, ``label`` is the identity label of
    the refusal (:func:`metric_label`, or :data:`UNIDENTIFIED_LABEL`)."""

    def __init__(self, text: str, label: str) -> None:
        self.text = text
        self.label = label
        super().__init__(text)


def identify(context: object) -> Identity | None:
    """The peer's identity (:func:`fabric.control.identity.of_context`: None on a plaintext
    channel); a TLS peer whose certificate names no identity (or several) raises
    :class:`Unauthorized` saying so."""
    try:
        return identity.of_context(context)
    except ValueError as e:
        raise Unauthorized(str(e), UNIDENTIFIED_LABEL) from None
