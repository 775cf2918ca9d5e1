"""fabric.control.identity: the identity strings, their checks, and reading one from an RPC's
auth context."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from fabric.control import identity


class _Ctx:
    def __init__(self, auth: Mapping[str, Sequence[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return self._auth


def test_node_identity_round_trips_through_its_uri() -> None:
    ident = identity.node("c1", "worker-0.zone-a")
    assert str(ident) == "node/c1/worker-0.zone-a"
    assert ident.uri == "kosmos-fabric:node/c1/worker-0.zone-a"
    assert identity.from_uri(ident.uri) == ident
    assert (ident.cluster, ident.node) == ("c1", "worker-0.zone-a")


def test_roles_have_no_cluster_except_bootstrap() -> None:
    assert identity.role("tree", "root-a").cluster is None
    assert identity.role("bootstrap", "c2").cluster == "c2"
    assert identity.role("reader", "ops").node is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("node/c1", "node/<cluster>/<node>"),
        ("tree/a/b", "tree/<name>"),
        ("root/x", "unknown role 'root'"),
        ("node/C1/n", "'C1' is not a name"),
        ("nodeonly", "is not <role>/<name>"),
        ("reader/-x", "'-x' is not a name"),
    ],
)
def test_a_bad_identity_is_refused_naming_the_value_and_its_source(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="--identity") as e:
        identity.parse(text, "--identity")
    assert words in str(e.value) and repr(text) in str(e.value)


def test_a_plaintext_peer_has_no_identity() -> None:
    assert identity.of_context(_Ctx({"transport_security_type": [b"insecure"]})) is None
    assert identity.of_context(_Ctx({})) is None


def test_the_identity_comes_from_the_one_fabric_uri_of_the_certificate() -> None:
    auth = {
        "transport_security_type": [b"ssl"],
        "x509_subject_alternative_name": [b"node-a.example", b"kosmos-fabric:node/c1/n1"],
        "peer_uri": [b"kosmos-fabric:node/c1/n1"],
    }
    assert identity.of_context(_Ctx(auth)) == identity.node("c1", "n1")


@pytest.mark.parametrize("uris", [[], [b"kosmos-fabric:node/c1/n1", b"kosmos-fabric:reader/x"]])
def test_a_certificate_without_exactly_one_identity_is_an_error(uris: list[bytes]) -> None:
    auth = {"transport_security_type": [b"ssl"], "x509_subject_alternative_name": uris,
            "x509_common_name": [b"stray"]}  # fmt: skip
    with pytest.raises(ValueError, match="stray: expected exactly one kosmos-fabric: URI"):
        identity.of_context(_Ctx(auth))
