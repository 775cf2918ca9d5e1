"""The fabric-wide multipath hash seed (fabric.agent.multipath) on the fake kernel: where the seed
comes from (the fabric CA, the override, a plaintext fabric), when the agent sets it (only while
the plan routes over several active gateways), and how it behaves when it cannot (no sysctl on
an older kernel, a refused write, a missing CA): logged, never a failed pass."""

from __future__ import annotations

import dataclasses
import errno
import logging
from pathlib import Path

import pytest

from fabric import types
from fabric.agent import agent as agent_mod
from fabric.agent import config
from fabric.agent import multipath as mp
from fabric.control import pki
from fabric.netlink import fake
from tests.unit.test_agent_loop import NoProber

SEED = mp.SEED_SYSCTL


@pytest.fixture(scope="module")
def cas() -> tuple[bytes, bytes]:
    """Two distinct fabric CAs' certificates (PEM)."""
    return pki.cert_pem(pki.make_ca("fabric A").cert), pki.cert_pem(pki.make_ca("fabric B").cert)


def _tls_dir(root: Path, name: str, ca_pem: bytes) -> Path:
    d = root / name
    d.mkdir()
    (d / pki.CA_FILE).write_bytes(ca_pem)
    return d


# --- the seed's value ---------------------------------------------------------------------------


def test_seed_from_ca_is_one_number_per_fabric_ca_and_independent_of_bundle_order(cas: tuple[bytes, bytes]) -> None:
    a, b = cas
    assert mp.seed_from_ca(a) == mp.seed_from_ca(b"junk before\n" + a + b"\ntrailing")
    assert mp.seed_from_ca(a) != mp.seed_from_ca(b), "two fabrics' CAs gave one seed"
    assert mp.seed_from_ca(a + b) == mp.seed_from_ca(b + a), "a bundle's seed depends on its file order"
    assert mp.seed_from_ca(a + b) not in (mp.seed_from_ca(a), mp.seed_from_ca(b))
    for pem in (a, b, a + b):
        assert 1 <= mp.seed_from_ca(pem) <= 0xFFFFFFFF
    assert 1 <= mp.insecure_seed() <= 0xFFFFFFFF


def test_seed_from_something_without_a_certificate_is_refused_naming_the_file() -> None:
    with pytest.raises(mp.SeedError, match=r"/etc/x/ca\.crt holds no PEM certificate"):
        mp.seed_from_ca(b"not a certificate", "/etc/x/ca.crt")
    broken = b"-----BEGIN CERTIFICATE-----\n!!!notbase64\n-----END CERTIFICATE-----\n"
    with pytest.raises(mp.SeedError, match=r"b\.crt: a certificate is not valid PEM"):
        mp.seed_from_ca(broken, "b.crt")


@pytest.mark.parametrize("text, want", [("auto", "auto"), ("OFF", "off"), ("1", "1"), ("0x10", "16"),
                                        ("4294967295", "4294967295")])  # fmt: skip
def test_setting_accepts_auto_off_and_seeds(text: str, want: str) -> None:
    assert mp.parse_setting(text) == want


@pytest.mark.parametrize("text", ["0", "-1", "4294967296", "random", ""])
def test_setting_refuses_zero_out_of_range_and_words(text: str) -> None:
    with pytest.raises(ValueError):
        mp.parse_setting(text)


def _load(*extra: str, environ: dict[str, str] | None = None) -> config.AgentConfig:
    return config.load(["--reflector", "127.0.0.1:1", "--cluster", "east", "--node", "e1", "--underlay-ip",
                        "198.18.0.11", "--pod-cidr", "10.10.1.0/24", "--insecure", *extra],
                       environ=environ or {})  # fmt: skip


def test_agent_flag_and_environment_set_the_seed_and_a_bad_one_names_its_source() -> None:
    assert _load().multipath_hash_seed == "auto"
    assert _load("--multipath-hash-seed", "77").multipath_hash_seed == "77"
    assert _load(environ={"FABRIC_MULTIPATH_HASH_SEED": "off"}).multipath_hash_seed == "off"
    with pytest.raises(config.ConfigError, match=r"--multipath-hash-seed.*'0'.*FABRIC_MULTIPATH_HASH_SEED"):
        _load(environ={"FABRIC_MULTIPATH_HASH_SEED": "0"})


def test_source_prefers_the_override_then_the_node_ca_then_the_bootstrap_ca(
    tmp_path: Path, cas: tuple[bytes, bytes]
) -> None:
    a, b = cas
    own, boot = _tls_dir(tmp_path, "own", a), _tls_dir(tmp_path, "boot", b)
    files = (own / pki.CA_FILE, boot / pki.CA_FILE)
    assert mp.SeedSource("12345", files).resolve() == (12345, "--multipath-hash-seed")
    assert mp.SeedSource(mp.OFF, files).resolve() is None
    seed, origin = mp.SeedSource(mp.AUTO, files).resolve() or (0, "")
    assert seed == mp.seed_from_ca(a) and str(own) in origin
    (own / pki.CA_FILE).unlink()  # a node still bootstrapping: only the cluster's credential is there
    assert mp.SeedSource(mp.AUTO, files).resolve() == (mp.seed_from_ca(b), f"the fabric CA ({boot / pki.CA_FILE})")
    (boot / pki.CA_FILE).unlink()
    with pytest.raises(mp.SeedError, match=r"no fabric CA.*own/ca\.crt.*boot/ca\.crt"):
        mp.SeedSource(mp.AUTO, files).resolve()
    plaintext = mp.SeedSource(mp.AUTO, (), insecure=True).resolve()
    assert plaintext is not None and plaintext[0] == mp.insecure_seed() and "plaintext" in plaintext[1]


def test_every_agent_of_a_fabric_derives_the_same_seed_from_its_own_files(
    tmp_path: Path, cas: tuple[bytes, bytes]
) -> None:
    """Two nodes (one with its own certificate directory, one still on the bootstrap
    credential) of fabric A agree; a node of fabric B does not."""
    a, b = cas
    n1 = _load("--tls-dir", str(_tls_dir(tmp_path, "n1", a)))
    n2 = _load("--bootstrap-dir", str(_tls_dir(tmp_path, "n2boot", a)), "--tls-dir", str(tmp_path / "n2"))
    other = _load("--tls-dir", str(_tls_dir(tmp_path, "o1", b)))
    secure = [_secure(c) for c in (n1, n2, other)]
    seeds = [agent_mod.seed_source(c).resolve() for c in secure]
    assert seeds[0] is not None and seeds[1] is not None and seeds[2] is not None
    assert seeds[0][0] == seeds[1][0] != seeds[2][0]


def _secure(cfg: config.AgentConfig) -> config.AgentConfig:
    return dataclasses.replace(cfg, insecure=False)


# --- when and how the agent sets it ----------------------------------------------------------------


def test_set_only_when_wanted_then_kept_and_repaired() -> None:
    dp = fake.FakeDataplane()
    keeper = mp.MultipathHash(mp.SeedSource("4242"))
    assert keeper.sync(dp, wanted=False) is None
    assert dp.sysctls[SEED] == "0" and not dp.ops, "set although no route is multipath"
    assert keeper.sync(dp, wanted=True) == 4242
    assert dp.sysctls[SEED] == "4242" and dp.ops == [("write_sysctl", f"{SEED}=4242")]
    assert keeper.sync(dp, wanted=True) == 4242
    assert len(dp.ops) == 1, "an unchanged seed was written again"
    dp.sysctls[SEED] = "0"  # someone reset it: drift
    assert keeper.sync(dp, wanted=True) == 4242 and dp.sysctls[SEED] == "4242"
    # The groups go: the seed stays (no second re-keying of the node's other multipath routes).
    assert keeper.sync(dp, wanted=False) == 4242 and dp.sysctls[SEED] == "4242"


def test_a_seed_already_in_place_is_not_rewritten() -> None:
    dp = fake.FakeDataplane()
    dp.sysctls[SEED] = "4242"
    assert mp.MultipathHash(mp.SeedSource("4242")).sync(dp, wanted=True) == 4242
    assert not dp.ops


def test_an_older_kernel_without_the_sysctl_is_skipped_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    dp = fake.FakeDataplane()
    del dp.sysctls[SEED]
    keeper = mp.MultipathHash(mp.SeedSource("4242"))
    with caplog.at_level(logging.INFO, logger=mp.__name__):
        for _ in range(3):
            assert keeper.sync(dp, wanted=True) is None
    lines = [r.getMessage() for r in caplog.records if "6.11" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert SEED in lines[0] and not dp.ops


def test_a_refused_write_is_logged_and_retried_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    dp = fake.FakeDataplane()
    dp.fail_next("write_sysctl", errno.EPERM)
    keeper = mp.MultipathHash(mp.SeedSource("4242"))
    with caplog.at_level(logging.WARNING, logger=mp.__name__):
        assert keeper.sync(dp, wanted=True) is None
    assert "cannot set the multipath hash seed" in caplog.text and "EPERM" in caplog.text
    assert dp.sysctls[SEED] == "0"
    assert keeper.sync(dp, wanted=True) == 4242, "not retried on the next pass"


def test_replacing_someone_elses_seed_and_a_non_default_ipv4_policy_are_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dp = fake.FakeDataplane()
    dp.sysctls[SEED] = "99"
    dp.sysctls[mp.IPV4_POLICY] = "1"
    with caplog.at_level(logging.INFO, logger=mp.__name__):
        assert mp.MultipathHash(mp.SeedSource("4242")).sync(dp, wanted=True) == 4242
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("was 99" in w and "replaced" in w for w in warnings), warnings
    assert any(f"{mp.IPV4_POLICY} is 1" in w for w in warnings), warnings
    assert dp.sysctls[mp.IPV4_POLICY] == "1", "the agent changed the node's IPv4 policy"


V6_FIELDS, V6_POLICY = (k for k, _ in mp.IPV6_HASH)


def test_ipv6_hash_made_addresses_only_fields_first_and_only_for_ipv6_multipath() -> None:
    dp = fake.FakeDataplane()
    keeper = mp.MultipathHash(mp.SeedSource("4242"))
    keeper.sync(dp, wanted=True, ipv6=False)
    assert (dp.sysctls[V6_FIELDS], dp.sysctls[V6_POLICY]) == ("7", "0"), "IPv6 hash changed without IPv6 groups"
    keeper.sync(dp, wanted=True, ipv6=True)
    assert (dp.sysctls[V6_FIELDS], dp.sysctls[V6_POLICY]) == ("3", "3")
    writes = [key for op, key in dp.ops if op == "write_sysctl"]
    assert writes == [f"{SEED}=4242", f"{V6_FIELDS}=3", f"{V6_POLICY}=3"], writes
    keeper.sync(dp, wanted=True, ipv6=True)
    assert len(dp.ops) == 3, "an unchanged IPv6 hash was written again"
    dp.sysctls[V6_POLICY] = "0"  # drift
    keeper.sync(dp, wanted=True, ipv6=True)
    assert dp.sysctls[V6_POLICY] == "3" and keeper.ipv6_applied


def test_ipv6_hash_on_a_kernel_without_custom_fields_is_skipped_and_the_seed_still_set(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dp = fake.FakeDataplane()
    del dp.sysctls[V6_FIELDS]
    keeper = mp.MultipathHash(mp.SeedSource("4242"))
    with caplog.at_level(logging.INFO, logger=mp.__name__):
        assert keeper.sync(dp, wanted=True, ipv6=True) == 4242
        keeper.sync(dp, wanted=True, ipv6=True)
    assert dp.sysctls[V6_POLICY] == "0" and not keeper.ipv6_applied
    assert caplog.text.count("Linux < 5.12") == 1, caplog.text
    dp.sysctls[V6_FIELDS] = "7"
    dp.fail_next("write_sysctl", errno.EINVAL)
    with caplog.at_level(logging.WARNING, logger=mp.__name__):
        keeper.sync(dp, wanted=True, ipv6=True)
    assert "cannot make the IPv6 multipath hash addresses-only" in caplog.text and not keeper.ipv6_applied
    keeper.sync(dp, wanted=True, ipv6=True)
    assert keeper.ipv6_applied and dp.sysctls[V6_POLICY] == "3"


def test_a_missing_ca_leaves_the_kernel_alone_until_it_appears(tmp_path: Path, cas: tuple[bytes, bytes]) -> None:
    dp = fake.FakeDataplane()
    ca = tmp_path / pki.CA_FILE
    keeper = mp.MultipathHash(mp.SeedSource(mp.AUTO, (ca,)))
    assert keeper.sync(dp, wanted=True) is None and dp.sysctls[SEED] == "0"
    ca.write_bytes(cas[0])
    assert keeper.sync(dp, wanted=True) == mp.seed_from_ca(cas[0])
    assert dp.sysctls[SEED] == str(mp.seed_from_ca(cas[0]))


def test_off_never_touches_the_kernel() -> None:
    dp = fake.FakeDataplane()
    assert mp.MultipathHash(mp.SeedSource(mp.OFF)).sync(dp, wanted=True) is None
    assert not dp.ops and dp.sysctls[SEED] == "0"


def test_fake_and_kernel_refuse_sysctls_outside_the_namespace() -> None:
    dp = fake.FakeDataplane()
    for key in ("kernel.hostname", "net", "net.ipv4.../x", "vm.swappiness"):
        with pytest.raises(ValueError, match="only per-namespace net"):
            dp.write_sysctl(key, "1")


# --- in the agent's pass ------------------------------------------------------------------------


def _agent(*extra: str) -> tuple[agent_mod.Agent, fake.FakeDataplane]:
    dp = fake.FakeDataplane()
    dp.add_plain_link("eth0", ip="198.18.0.11")
    cfg = _load("--multipath-hash-seed", "31337", *extra)
    return agent_mod.Agent(cfg, dp, handle_signals=False, prober_factory=NoProber), dp


DEVICE = types.VxlanDevice("vx-bridge", 54, 4876, mac="02:00:00:00:00:11", address="100.64.0.11/10",
                           local="198.18.0.11", mtu=1450)
PEERS = tuple(types.Peer("vx-bridge", ip, f"02:00:00:00:00:{n:02x}", f"198.18.0.{n}", node=f"west/w{n}")
              for n, ip in ((21, "100.64.0.21"), (22, "100.64.0.22")))  # fmt: skip


def test_the_agents_pass_sets_the_seed_only_for_a_plan_with_active_active_routes() -> None:
    agent, dp = _agent()
    single = types.NodeState(devices=(DEVICE,), peers=PEERS,
                             routes=(types.RouteEntry("10.20.0.0/16", "100.64.0.21", "vx-bridge"),))  # fmt: skip
    report = agent._pass(single, resync=True)
    assert not report.failures, report.first_error
    assert dp.sysctls[SEED] == "0", "a plan without active/active routes changed the node's seed"
    multi = types.NodeState(devices=(DEVICE,), peers=PEERS, routes=(types.RouteEntry(
        "10.20.0.0/16", "100.64.0.21", "vx-bridge", vias=("100.64.0.21", "100.64.0.22")),))  # fmt: skip
    report = agent._pass(multi, resync=True)
    assert not report.failures, report.first_error
    assert dp.sysctls[SEED] == "31337"
    writes = [i for i, op in enumerate(dp.ops) if op[0] == "write_sysctl"]
    groups = [i for i, op in enumerate(dp.ops) if op[0] == "set_nexthop_group"]
    assert writes and groups and writes[0] < groups[0], f"the seed came after the group: {dp.ops}"
    assert dp.sysctls[V6_POLICY] == "0", "an IPv4-only plan changed the IPv6 hash"
