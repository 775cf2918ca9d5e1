"""``fabric-tool vm up|check|down|status|ssh``: the fabric on real kernels, booted with qemu.

Flow of :func:`up` (each step recorded in the state file before the next, so :func:`down`
cleans up after an interrupted run too):

1. **Settings** (:func:`load_settings`): a lab topology file (``vagrant/settings.yaml``) whose
   nodes are VMs, plus a ``vm:`` section (memory, the private network). Every node is pinned
   to its VM's address (``.11``, ``.12``, ... of the private network): that *is* the topology
   the reflector reads, generated from the VMs' addresses. Planning is the lab's
   (:func:`tools.lab.planning.plan`): the same names, pod addresses, lab services and global
   IPs as a lab of the same file, so ``check``'s pairs and expectations are the lab's too.
2. **Image**: :func:`tools.vm.image.ensure_image` (cached by the hash of its inputs).
3. **Network**: a namespace ``kfvm-NAME`` holding the bridge ``br0`` and one tap per VM. qemu
   runs inside it (:func:`tools.nsutil.spawn_in_netns`, exec, PID and start time recorded), so
   its user-mode port forward for ssh listens on the *namespace's* 127.0.0.1 and the ssh client
   runs there too: nothing at all is added to the machine's root namespace.
4. **Boot**: ``qemu-system-x86_64 -accel tcg,tb-size=256`` (KVM cannot run a stock kernel on
   these machines; ``KOSMOS_FABRIC_VM_ACCEL`` overrides it), direct kernel boot, one qcow2
   overlay per VM over the shared image. NIC order as under Vagrant: the user-mode NIC first
   (the guest's ``eth0``: management, ssh only, ``restrict=on``), then the tap (``eth1``, the
   private network: the fabric's underlay).
5. **Provisioning** (:func:`bundle`): one tar per VM, unpacked at ``/``: the project source
   (with its generated stubs) under ``/opt/kosmos-fabric/src``, the topology, the
   certificates issued as the lab issues them (:mod:`tools.lab.labpki`: the CA and the
   reflector's server certificate on the reflector's VM, the cluster's bootstrap credential on
   every VM; agents get their own node certificates from the reflector), systemd units for
   the reflector and the agent, and ``kf-provision``, which plays the clusters' CNI exactly as
   the lab does (pod namespaces, host-gw routes, the lab service's DNAT) and starts the units.
   The Vagrantfile runs the same bundle (``fabric-tool vm bundle``).
6. **Sync**: poll the reflector's status through ssh (:mod:`tools.vm.guest`) until every node
   reports its planned state applied.

:func:`check` reuses ``fabric-tool check`` piece by piece: the pairs (:func:`tools.diagnose.check.jobs`),
the probe worker (``python -m tools.diagnose.probe``, here run in the guest's pod namespace
through ssh), the parsing, the expectations and the matrix.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from fabric import netns as namespaces
from fabric import topology
from fabric.control import api
from tools import nsutil
from tools.diagnose import check as checkmod
from tools.lab import labpki, planning
from tools.lab import plumbing as labplumbing
from tools.lab.state import LabError, LabState, LabUsageError, NodeRecord
from tools.vm import image as imagemod

_log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_SETTINGS = REPO / "vagrant" / "settings.yaml"
STATE_ROOT = Path(os.environ.get("KOSMOS_FABRIC_VM_STATE", "/var/lib/kosmos-fabric/vm"))
DEFAULT_NAME = "kfvm"
DEFAULT_NETWORK = "192.168.77.0/24"
#: The first VM's host number on the private network (``.11``, ``.12``, ...).
FIRST_HOST = 11
DEFAULT_MEMORY_MB = 512
#: This machine's budget: 2 cores and 24 GiB shared (about 700 MiB of qemu per 512 MiB VM).
MAX_VMS = 8
SSH_PORT_BASE = 2200
BRIDGE = "br0"
#: The guests' NICs: eth0 management (qemu user-mode / Vagrant's network), eth1 the private network.
UNDERLAY_NIC = "eth1"
GUEST_ETC = "/etc/kosmos-fabric"
GUEST_PKI = f"{GUEST_ETC}/pki"
BOOT_TIMEOUT_S = 420.0
#: Agents' gateway probes in the VMs (see :func:`agent_argv`): a dead gateway is seen in 3 s.
PROBE_INTERVAL_S = 0.5
PROBE_MULTIPLIER = 6
#: Every agent's first snapshot applied: three bcc compiles under TCG on two cores, the reflector's
#: VM compiling too. 5.5 min with the machine's load average at 5, over 7 min at 20 (issue 22's
#: CI notes): a bound for a stuck environment, not an expectation.
SYNC_TIMEOUT_S = 900.0
Progress = Callable[[str], None]


def _say(msg: str) -> None:
    print(f"vm: {msg}", flush=True, file=sys.stderr)


# -- settings --------------------------------------------------------------------------------


@dataclasses.dataclass
class VMRecord:
    """One VM: its node, its address on the private network, its ssh port (on the namespace's
    127.0.0.1), its tap, its overlay and its qemu process."""

    name: str
    cluster: str
    ip: str
    ssh_port: int
    tap: str
    mac: str
    overlay: str
    console: str
    pid: int | None = None
    start: int | None = None

    def running(self) -> bool:
        return self.pid is not None and nsutil.same_process(self.pid, self.start)


@dataclasses.dataclass
class VMState:
    name: str
    settings: str
    image: str
    netns: str
    network: str
    memory_mb: int
    reflector_vm: str
    vms: list[VMRecord]
    #: The generated topology (the settings with every node pinned to its VM's address).
    topology: dict[str, Any]
    #: VMs made by Vagrant (``vagrant ssh-config`` output, hosts named as the VMs): ssh goes
    #: there instead of through the runner's namespace.
    ssh_config: str = ""

    @property
    def dir(self) -> Path:
        return STATE_ROOT / self.name

    def vm(self, name: str) -> VMRecord:
        for v in self.vms:
            if v.name == name or f"{v.cluster}/{v.name}" == name:
                return v
        have = ", ".join(v.name for v in self.vms)
        raise LabUsageError(f"VM environment {self.name} has no VM {name!r} (it has {have})")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VMState:
        vms = [VMRecord(**v) for v in doc["vms"]]
        return cls(**{k: v for k, v in doc.items() if k != "vms"}, vms=vms)


def state_path(name: str) -> Path:
    return STATE_ROOT / name / "state.json"


def load_state(name: str) -> VMState | None:
    p = state_path(name)
    if not p.exists():
        return None
    try:
        return VMState.from_json(json.loads(p.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise LabError(f"malformed VM state {p}: {e}; 'fabric-tool vm down --name {name}' removes it") from e


def save_state(st: VMState) -> None:
    st.dir.mkdir(parents=True, exist_ok=True)
    tmp = state_path(st.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(st.to_json(), indent=2))
    os.replace(tmp, state_path(st.name))


def load_settings(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``vm:`` section, the topology with every node pinned to its VM's address)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LabUsageError(f"VM settings {path}: cannot read: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("clusters"), list):
        raise LabUsageError(f"VM settings {path}: expected a topology mapping with a 'clusters' list")
    vm = doc.pop("vm", None) or {}
    if not isinstance(vm, dict):
        raise LabUsageError(f"VM settings {path}: 'vm' must be a mapping (memory, network, reflector)")
    unknown = set(vm) - {"memory", "network", "reflector"}
    if unknown:
        raise LabUsageError(
            f"VM settings {path}: vm: unknown keys {sorted(unknown)} (known: memory, network, reflector)"
        )
    network = str(vm.get("network", doc.get("underlay", DEFAULT_NETWORK)))
    try:
        net = ipaddress.IPv4Network(network)
    except ValueError as e:
        raise LabUsageError(f"VM settings {path}: vm.network {network!r}: {e}") from None
    memory = vm.get("memory", DEFAULT_MEMORY_MB)
    if not isinstance(memory, int) or not 256 <= memory <= 4096:
        raise LabUsageError(f"VM settings {path}: vm.memory {memory!r}: must be an integer from 256 to 4096 (MiB)")
    doc["underlay"] = str(net)
    i = 0
    for c in doc["clusters"]:
        for n in (c.get("nodes") or []) if isinstance(c, dict) else []:
            if isinstance(n, dict):
                if "underlay" in n:
                    raise LabUsageError(f"VM settings {path}: node {n.get('name')!r}: 'underlay' is the VM's address, "
                                        "set by the runner; remove it")  # fmt: skip
                n["underlay"] = str(net.network_address + FIRST_HOST + i)
                i += 1
    if not 1 <= i <= MAX_VMS:
        raise LabUsageError(f"VM settings {path}: {i} nodes; the VM tier runs 1 to {MAX_VMS} VMs")
    return {"memory": memory, "network": str(net), "reflector": vm.get("reflector")}, doc


def plan_lab(name: str, topo_doc: dict[str, Any], source: str, reflector_ip: str) -> LabState:
    """The lab's plan of the generated topology (names, pod addresses, services, global IPs),
    with the reflector's address on its VM."""
    try:
        topo = topology.parse(json.loads(json.dumps(topo_doc)), source)
    except topology.TopologyError as e:
        raise LabUsageError(str(e)) from None
    lab = planning.plan(name, topo)
    lab.gateway = reflector_ip  # LabState.reflector_address is "<gateway>:<port>"
    return _VMLab(**{f.name: getattr(lab, f.name) for f in dataclasses.fields(lab)})


@dataclasses.dataclass
class _VMLab(LabState):
    """The lab's state type, with its files (certificates) in the VM environment's directory."""

    @property
    def state_dir(self) -> Path:  # type: ignore[override]
        return STATE_ROOT / self.name


def lab_of(st: VMState) -> LabState:
    return plan_lab(st.name, st.topology, st.settings, st.vm(st.reflector_vm).ip)


def new_state(name: str, settings_path: Path, image: imagemod.Image | None) -> VMState:
    vm, topo_doc = load_settings(settings_path)
    net = ipaddress.IPv4Network(vm["network"])
    vms = []
    i = 0
    for c in topo_doc["clusters"]:
        for n in c.get("nodes") or []:
            i += 1
            d = STATE_ROOT / name
            vms.append(VMRecord(name=n["name"], cluster=c["name"], ip=n["underlay"], ssh_port=SSH_PORT_BASE + i,
                                tap=f"kftap{i}", mac=f"52:54:00:77:{i // 256:02x}:{i % 256:02x}",
                                overlay=str(d / f"{n['name']}.qcow2"),
                                console=str(d / f"{n['name']}.console.log")))  # fmt: skip
    names = [v.name for v in vms]
    if len(set(names)) != len(names):
        raise LabUsageError(f"VM settings {settings_path}: node names must be unique across clusters (they are the "
                            f"VMs' host names): {names}")  # fmt: skip
    refl = vm["reflector"] or vms[0].name
    if refl not in names:
        raise LabUsageError(f"VM settings {settings_path}: vm.reflector {refl!r} is not one of the VMs {names}")
    st = VMState(name=name, settings=str(settings_path), image=str(image.dir) if image else "", netns=f"kfvm-{name}",
                 network=str(net), memory_mb=vm["memory"], reflector_vm=refl, vms=vms, topology=topo_doc)  # fmt: skip
    lab_of(st)  # refuse a topology the lab would refuse, before anything is built
    return st


# -- ssh -------------------------------------------------------------------------------------


def ssh_argv(st: VMState, v: VMRecord, *cmd: str, tty: bool = False) -> list[str]:
    """ssh to ``v`` from inside the environment's namespace (the port forward lives there), or
    with Vagrant's ssh configuration for VMs that Vagrant made."""
    if st.ssh_config:
        return ["ssh", "-F", st.ssh_config, "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", *(["-t"] if tty else []),
                v.name, *cmd]  # fmt: skip
    key = Path(st.image) / "id_ed25519"
    return [
        "nsenter", f"--net=/run/netns/{st.netns}", "--",
        "ssh", "-i", str(key), "-p", str(v.ssh_port),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=10", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=10",
        "-o", "ControlMaster=auto", "-o", f"ControlPath={st.dir}/ssh-{v.name}", "-o", "ControlPersist=600",
        *(["-t"] if tty else []),
        "root@127.0.0.1", *cmd,
    ]  # fmt: skip


def ssh(st: VMState, vm: str | VMRecord, command: str, *, input: bytes | None = None, timeout: float = 120.0,
        check: bool = True) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    """Run ``command`` (a shell line) as root on the VM; raises :class:`LabError` on failure when
    ``check``."""
    v = st.vm(vm) if isinstance(vm, str) else vm
    try:
        r = subprocess.run(ssh_argv(st, v, command), input=input, capture_output=True, timeout=timeout, check=False,
                           stdin=None if input is not None else subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise LabError(f"vm {v.name}: {command!r} did not finish in {timeout:g} s") from e
    if check and r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip()[-800:]
        raise LabError(f"vm {v.name}: {command!r} failed (exit {r.returncode}): {err}")
    return r


# -- network and qemu ------------------------------------------------------------------------


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def build_network(st: VMState) -> None:
    """The namespace with the bridge and one tap per VM (nothing in the root namespace)."""
    if not namespaces.exists(st.netns):
        _ip("netns", "add", st.netns)
    batch = ["link set lo up"]
    if subprocess.run(["ip", "-n", st.netns, "link", "show", BRIDGE], capture_output=True, check=False).returncode:
        batch.append(f"link add {BRIDGE} type bridge")
    batch += [f"link set {BRIDGE} up", f"addr replace {bridge_address(st)} dev {BRIDGE}"]
    for v in st.vms:
        if subprocess.run(["ip", "-n", st.netns, "link", "show", v.tap], capture_output=True, check=False).returncode:
            batch.append(f"tuntap add {v.tap} mode tap")
        batch += [f"link set {v.tap} master {BRIDGE}", f"link set {v.tap} up"]
    r = subprocess.run(["ip", "-n", st.netns, "-batch", "-"], input="\n".join(batch) + "\n", capture_output=True,
                       text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        raise LabError(f"VM network in namespace {st.netns}: {r.stderr.strip()}")


def bridge_address(st: VMState) -> str:
    """The namespace's own address on the VMs' private network (host 1, below the VMs' from
    :data:`FIRST_HOST`): the runner asks the reflector for its status from there (no Python
    started in a busy TCG guest), and nothing is added to the machine's root namespace."""
    net = ipaddress.IPv4Network(st.network)
    return f"{net.network_address + 1}/{net.prefixlen}"


def accel() -> str:
    return os.environ.get("KOSMOS_FABRIC_VM_ACCEL", "tcg,tb-size=256")


def qemu_argv(st: VMState, v: VMRecord, img: imagemod.Image) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise LabError("qemu-system-x86_64 is not on PATH (Debian package qemu-system-x86)")
    prefix = st.network.split("/")[1]
    append = (f"root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet kf.name={v.name} kf.addr={v.ip}/{prefix} "
              "systemd.show_status=0")  # fmt: skip
    return [
        qemu, "-name", v.name, "-accel", accel(), "-m", str(st.memory_mb), "-smp", "1",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", append,
        "-drive", f"file={v.overlay},if=virtio,format=qcow2,cache=unsafe",
        "-netdev", f"user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{v.ssh_port}-:22",
        "-device", "virtio-net-pci,netdev=mgmt",
        "-netdev", f"tap,id=ul,ifname={v.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=ul,mac={v.mac}",
        "-display", "none", "-monitor", "none", "-serial", f"file:{v.console}", "-no-reboot",
    ]  # fmt: skip


def boot(st: VMState, img: imagemod.Image) -> None:
    for v in st.vms:
        if v.running():
            continue
        Path(v.overlay).unlink(missing_ok=True)
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(img.disk), v.overlay],
                           capture_output=True, text=True, check=False)  # fmt: skip
        if r.returncode != 0:
            raise LabError(f"vm {v.name}: qemu-img create overlay: {r.stderr.strip()}")
        log = open(Path(v.console).with_suffix(".qemu.log"), "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = nsutil.spawn_in_netns(st.netns, qemu_argv(st, v, img), stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        v.pid, v.start = proc.pid, nsutil.start_time(proc.pid)
        save_state(st)


def wait_ssh(st: VMState, timeout_s: float, progress: Progress) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {v.name for v in st.vms}
    t0 = time.monotonic()
    while pending:
        for name in sorted(pending):
            v = st.vm(name)
            if not v.running():
                tail = "\n    ".join(Path(v.console).read_text(errors="replace").splitlines()[-10:]) \
                    if Path(v.console).exists() else ""  # fmt: skip
                raise LabError(f"vm {name}: qemu exited during boot; console {v.console}:\n    {tail}")
            try:
                answered = ssh(st, v, "true", timeout=30, check=False).returncode == 0
            except LabError:  # the port forward accepts before sshd runs: no banner yet
                answered = False
            if answered:
                pending.discard(name)
                progress(f"{name} answers ssh ({time.monotonic() - t0:.0f} s)")
        if pending and time.monotonic() > deadline:
            raise LabError(f"VMs {sorted(pending)} did not answer ssh in {timeout_s:g} s; consoles in {st.dir}")
        if pending:
            time.sleep(3)


# -- provisioning ----------------------------------------------------------------------------


def _source_files() -> list[tuple[Path, str]]:
    """(file, path in the guest) of the project source the guests run: the production package
    and the tools (the check's probe worker, the guest helper), with the generated stubs."""
    out = []
    for top in ("fabric", "tools"):
        for p in sorted((REPO / top).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".c", ".h", ".proto", ".pyi"):
                out.append((p, f"{imagemod.GUEST_SRC.lstrip('/')}/{p.relative_to(REPO)}"))
    return out


def _unit(description: str, exec_start: Sequence[str], after: str = "network-online.target kf-net.service") -> str:
    return (
        f"[Unit]\nDescription={description}\nAfter={after}\n\n"
        f"[Service]\nEnvironment=PYTHONPATH={imagemod.GUEST_SRC}\nExecStart={' '.join(exec_start)}\n"
        "Restart=on-failure\nRestartSec=2\nKillSignal=SIGTERM\nTimeoutStopSec=20\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


def reflector_argv(lab: LabState, grace_period_s: float) -> list[str]:
    return [
        f"{imagemod.GUEST_VENV}/bin/python", "-m", "fabric.control.reflector_cli",
        "--config", f"{GUEST_ETC}/topology.yaml",
        "--listen", lab.reflector_address, "--listen", "unix:/run/fabric-reflector.sock",
        "--grace-period", f"{grace_period_s:g}",
        "--metrics-listen", f"0.0.0.0:{api.DEFAULT_REFLECTOR_METRICS_PORT}",
        "--tls-dir", f"{GUEST_PKI}/reflector", "--ca-dir", f"{GUEST_PKI}/ca", "--log-level", "info",
    ]  # fmt: skip


def agent_argv(lab: LabState, node: NodeRecord) -> list[str]:
    return [
        f"{imagemod.GUEST_VENV}/bin/python", "-m", "fabric.agent.agent",
        "--reflector", lab.reflector_address, "--cluster", node.cluster, "--node", node.name,
        "--underlay-ip", node.underlay_ip, *(a for c in node.pod_cidrs for a in ("--pod-cidr", c)),
        "--metrics-listen", f"0.0.0.0:{api.DEFAULT_AGENT_METRICS_PORT}",
        # Gateway liveness probes: 0.1 s x 3 (the default) is a few TCG time slices on a busy
        # 2-core host, and the VMs then see each other die and come back several times a minute.
        "--probe-interval", f"{PROBE_INTERVAL_S:g}", "--probe-multiplier", str(PROBE_MULTIPLIER),
        "--tls-dir", f"{GUEST_PKI}/node", "--bootstrap-dir", f"{GUEST_PKI}/bootstrap", "--log-level", "info",
    ]  # fmt: skip


def cni_script(lab: LabState, node: NodeRecord) -> str:
    """The clusters' CNI on one VM, as the lab plays it on a node namespace (the same commands
    from :mod:`tools.lab.plumbing`): pods behind veths with proxy ARP, host-gw routes to the
    other nodes of the cluster over the underlay NIC (:data:`UNDERLAY_NIC`), the lab service's DNAT."""
    cluster = next(c for c in lab.clusters if c.name == node.cluster)
    lines = [
        "set -e",
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0",
        # Proxy ARP answers the pods' gateway (169.254.1.1) only when the node routes it off the
        # pod's veth: a lab node has its default route to the lab gateway; a VM under Vagrant has
        # one from DHCP; a qemu-runner VM gets one to qemu's user-mode gateway (restrict=on: it
        # leads nowhere).
        "ip route show default | grep -q . || ip route add default via 10.0.2.2 dev eth0",
    ]
    for pod in node.pods:
        lines += [
            f"ip netns del {pod.netns} 2>/dev/null || true",
            f"ip netns add {pod.netns}",
            f"ip link add {pod.host_if} type veth peer name eth0 netns {pod.netns}",
            "ip -batch - <<'EOF'", *labplumbing._node_side(pod), "EOF",
            f"sysctl -qw net.ipv4.conf.{pod.host_if}.proxy_arp=1 net.ipv4.neigh.{pod.host_if}.proxy_delay=0",
            f"ip -n {pod.netns} -batch - <<'EOF'", *labplumbing._pod_side(pod), "EOF",
        ]  # fmt: skip
    # The lab's node has its underlay on eth0; a VM has it on its second NIC.
    peers = [cmd.replace(" dev eth0", f" dev {UNDERLAY_NIC}")
             for peer in cluster.nodes if peer.name != node.name for cmd in labplumbing._host_gw(peer)]  # fmt: skip
    if peers:
        lines += ["ip -batch - <<'EOF'", *peers, "EOF"]
    services = ((cluster.service_ip, cluster.service_backend), (cluster.service_ip6, cluster.service_backend6))
    rules = "".join(labplumbing.service_ruleset(ip, b) for ip, b in services if ip is not None and b is not None)
    if rules:
        lines += ["nft delete table ip kflab 2>/dev/null || true", "nft -f - <<'EOF'", rules.rstrip(), "EOF"]
    return "\n".join(lines) + "\n"


def bundle(st: VMState, vm: str, grace_period_s: float = 30.0) -> bytes:
    """The tar (unpacked at ``/``) that provisions ``vm``; ``kf-provision`` then applies it."""
    lab = lab_of(st)
    v = st.vm(vm)
    node = lab.node(f"{v.cluster}/{v.name}")
    assert node is not None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_text(path: str, text: str, mode: int = 0o644) -> None:
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))

        def add_dir(src: Path, dst: str) -> None:
            for p in sorted(src.iterdir()):
                info = tar.gettarinfo(str(p), f"{dst}/{p.name}")
                info.uid = info.gid = 0
                with open(p, "rb") as f:
                    tar.addfile(info, f)

        for path, arc in _source_files():
            info = tar.gettarinfo(str(path), arc)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with open(path, "rb") as f:
                tar.addfile(info, f)
        etc = GUEST_ETC.lstrip("/")
        add_text(f"{etc}/topology.yaml", yaml.safe_dump(st.topology, sort_keys=False))
        add_dir(labpki.bootstrap_dir(lab, v.cluster), f"{etc}/pki/bootstrap")
        units = ["fabric-agent.service"]
        if v.name == st.reflector_vm:
            server, ca = labpki.reflector_dirs(lab)
            add_dir(server, f"{etc}/pki/reflector")
            add_dir(ca, f"{etc}/pki/ca")
            add_dir(labpki.reader_dir(lab), f"{etc}/pki/reader")
            add_text("etc/systemd/system/fabric-reflector.service",
                     _unit("Kosmos Fabric reflector", reflector_argv(lab, grace_period_s)))  # fmt: skip
            units.insert(0, "fabric-reflector.service")
        add_text("etc/systemd/system/fabric-agent.service",
                 _unit("Kosmos Fabric agent", agent_argv(lab, node),
                       after="network-online.target kf-net.service kf-cni.service"))  # fmt: skip
        add_text("usr/local/sbin/kf-cni", "#!/bin/sh\n" + cni_script(lab, node), 0o755)
        add_text("etc/systemd/system/kf-cni.service",
                 "[Unit]\nDescription=the clusters' CNI stand-in (pods, host-gw routes, lab service)\n"
                 "After=kf-net.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
                 "ExecStart=/usr/local/sbin/kf-cni\n\n[Install]\nWantedBy=multi-user.target\n")  # fmt: skip
        add_text("usr/local/sbin/kf-provision",
                 "#!/bin/sh\nset -e\nsystemctl daemon-reload\nsystemctl enable --now kf-cni.service\n"
                 + "".join(f"systemctl enable {u}\nsystemctl restart {u}\n" for u in units), 0o755)  # fmt: skip
    return buf.getvalue()


def provision(st: VMState, progress: Progress, grace_period_s: float = 30.0) -> None:
    """Unpack every VM's bundle and start its units, the reflector's VM first."""
    order = sorted(st.vms, key=lambda v: v.name != st.reflector_vm)
    # The bundles are made here, one after another, not in the threads below: the first bundle
    # of a cluster makes its bootstrap key and certificate (labpki, made as needed), and two VMs
    # of one cluster making them at once could each ship the key of one and the certificate of
    # the other (seen: "tls.key is not the key of tls.crt", the agent refused to start).
    bundles = {v.name: bundle(st, v.name, grace_period_s) for v in order}

    def one(v: VMRecord) -> None:
        ssh(st, v, f"rm -rf {imagemod.GUEST_SRC}/fabric {imagemod.GUEST_SRC}/tools && tar -x -C / -f -",
            input=bundles[v.name], timeout=300)  # fmt: skip
        ssh(st, v, "/usr/local/sbin/kf-provision", timeout=300)
        progress(f"{v.name}: provisioned ({v.cluster}, {v.ip}{', reflector' if v.name == st.reflector_vm else ''})")

    one(order[0])
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(order)) as pool:
        for f in [pool.submit(one, v) for v in order[1:]]:
            f.result()


def status(st: VMState, timeout_s: float = 5.0) -> dict[str, Any]:
    """The reflector's status (:mod:`tools.vm.guest`), or ``{"error": ...}``."""
    lab = lab_of(st)
    try:
        if st.ssh_config:
            # VMs Vagrant made: ask from the reflector's VM (a Python start in a TCG guest that
            # compiles BPF programs next door takes tens of seconds).
            r = ssh(st, st.reflector_vm,
                    f"cd {imagemod.GUEST_SRC} && {imagemod.GUEST_VENV}/bin/python -m tools.vm.guest status "
                    f"--reflector {lab.reflector_address} --tls-dir {GUEST_PKI}/reader --timeout {timeout_s:g}",
                    timeout=180 + timeout_s, check=False)  # fmt: skip
        else:
            # Our VMs: from this machine, inside the environment's namespace (its bridge has an
            # address on the private network, :func:`bridge_address`), with the reader
            # certificate the bundle copies to the guests. Polling this costs the guests nothing.
            argv = ["nsenter", f"--net=/run/netns/{st.netns}", "--", sys.executable, "-m", "tools.vm.guest",
                    "status", "--reflector", lab.reflector_address, "--tls-dir", str(labpki.reader_dir(lab)),
                    "--timeout", f"{timeout_s:g}"]  # fmt: skip
            try:
                r = subprocess.run(argv, capture_output=True, timeout=60 + timeout_s, check=False, cwd=str(REPO),
                                   stdin=subprocess.DEVNULL)  # fmt: skip
            except subprocess.TimeoutExpired:
                return {"error": f"status of the reflector at {lab.reflector_address} from namespace {st.netns}: "
                                 f"no answer in {60 + timeout_s:g} s"}  # fmt: skip
    except LabError as e:
        return {"error": str(e)}
    try:
        doc = json.loads(r.stdout.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"exit {r.returncode}: {r.stderr.decode(errors='replace').strip()[-300:]}"}
    return doc if isinstance(doc, dict) else {"error": f"unexpected {doc!r:.80}"}


def wait_in_sync(st: VMState, timeout_s: float, progress: Progress) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    want = {f"{v.cluster}/{v.name}" for v in st.vms}
    last = ""
    while True:
        doc = status(st)
        if "error" in doc:
            report = f"reflector: {doc['error']}"
        else:
            synced = {n["key"] for n in doc["nodes"] if n["in_sync"]}
            if want <= synced:
                progress(f"all {len(want)} nodes in sync")
                return doc
            report = f"{len(want & synced)}/{len(want)} nodes in sync; waiting for {', '.join(sorted(want - synced))}"
        if report != last:
            progress(report)
            last = report
        if time.monotonic() > deadline:
            raise LabError(f"VM environment {st.name}: not in sync after {timeout_s:g} s ({report}); see "
                           f"'fabric-tool vm ssh VM -- journalctl -u fabric-agent'")  # fmt: skip
        time.sleep(1)  # a poll is one short Python run on this machine (status())


# -- the verbs -------------------------------------------------------------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the VM tier needs root (network namespaces, tap devices, the image build)")


def up(settings_path: Path, name: str = DEFAULT_NAME, progress: Progress = _say, grace_period_s: float = 30.0,
       timeout_s: float = BOOT_TIMEOUT_S) -> VMState:  # fmt: skip
    """Build (or reuse) the image, boot the VMs, provision them and wait until in sync."""
    require_root()
    existing = load_state(name)
    if existing is not None and any(v.running() for v in existing.vms):
        raise LabUsageError(f"VM environment {name} is already up ({existing.settings}); "
                            f"'fabric-tool vm down --name {name}' first")  # fmt: skip
    if existing is not None:
        down(name, progress)
    new_state(name, settings_path, None)  # bad settings fail before the image is built
    t0 = time.monotonic()
    img = imagemod.ensure_image()
    progress(f"image {img.dir} ({time.monotonic() - t0:.0f} s)")
    st = new_state(name, settings_path, img)
    save_state(st)
    build_network(st)
    t1 = time.monotonic()
    boot(st, img)
    progress(f"booting {len(st.vms)} VMs ({accel()}, {st.memory_mb} MiB each)")
    wait_ssh(st, timeout_s, progress)
    progress(f"booted in {time.monotonic() - t1:.0f} s")
    provision(st, progress, grace_period_s)
    wait_in_sync(st, SYNC_TIMEOUT_S, progress)
    progress(f"up in {time.monotonic() - t0:.0f} s: 'fabric-tool vm check --name {name}' probes it, "
             f"'fabric-tool vm down --name {name}' removes it")  # fmt: skip
    return st


def run_check(st: VMState, timeout_s: float = 3.0, count: int = 1, services: bool = False) -> checkmod.CheckResult:
    """``fabric-tool check`` on the VMs: the lab's pairs, each source's probe worker run in its
    pod namespace in its VM."""
    lab = lab_of(st)
    pods = checkmod.pods_of(lab, (4,))
    svcs = checkmod.services_of(lab, (4,)) if services else []
    vm_of = {p.netns: st.vm(n.name) for n in lab.nodes() for p in n.pods}
    t0 = time.monotonic()
    workers = []
    for src, dsts in checkmod.jobs(pods, svcs):
        req = json.dumps({"targets": [d.ip for d in dsts], "timeout": timeout_s, "count": count})
        cmd = (f"cd {imagemod.GUEST_SRC} && ip netns exec {src.netns} {imagemod.GUEST_VENV}/bin/python "
               "-m tools.diagnose.probe")  # fmt: skip
        proc = subprocess.Popen(ssh_argv(st, vm_of[src.netns], cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
        workers.append((src, dsts, proc, req))
    pairs = []
    for src, dsts, proc, req in workers:
        try:
            out, err = proc.communicate(req.encode(), timeout=timeout_s * count + 90)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rc = None
        pairs += checkmod.parse_worker_output(src, dsts, out.decode(errors="replace"), err.decode(errors="replace"),
                                              rc)  # fmt: skip
    result = checkmod.CheckResult(list(pods), pairs, time.monotonic() - t0, list(svcs), [])
    result.not_expected = checkmod.not_expected(lab, (4,), services=services)
    return result


def vagrant_state(settings_path: Path, ssh_config: Path) -> VMState:
    """The environment Vagrant made from ``settings_path`` (the same names and addresses)."""
    st = new_state("vagrant", settings_path, None)
    st.ssh_config = str(ssh_config)
    return st


def prepare_vagrant(settings_path: Path, out: Path, img: imagemod.Image, owner: tuple[int, int] | None) -> list[Path]:
    """What vagrant/Vagrantfile boots and provisions, in ``out``: the kernel and initrd (direct
    kernel boot, as the runner), the key the image's root trusts, one provisioning bundle per VM,
    and ``kosmos-fabric.box`` (the image's disk as a vagrant-libvirt box). ``owner``: the user
    who runs vagrant (files made as root are handed to them)."""
    out.mkdir(parents=True, exist_ok=True)
    st = new_state("vagrant", settings_path, img)
    made = []
    for src, name in ((img.kernel, "vmlinuz"), (img.initrd, "initrd.img"), (img.ssh_key, "id_ed25519")):
        shutil.copyfile(src, out / name)
        made.append(out / name)
    (out / "id_ed25519").chmod(0o600)
    for v in st.vms:
        (out / f"{v.name}.tar").write_bytes(bundle(st, v.name))
        made.append(out / f"{v.name}.tar")
    size_gb = -(-json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img.disk)], capture_output=True,
                                           text=True, check=True).stdout)["virtual-size"] // (1 << 30))  # fmt: skip
    box = out / "kosmos-fabric.box"
    with tarfile.open(box, "w") as tar:
        meta = json.dumps({"provider": "libvirt", "format": "qcow2", "virtual_size": size_gb}).encode()
        info = tarfile.TarInfo("metadata.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        tar.add(str(img.disk), "box.img")
    made.append(box)
    if owner is not None:
        for p in [out, *made]:
            os.chown(p, *owner)
    return made


def require_state(name: str) -> VMState:
    st = load_state(name)
    if st is None:
        raise LabError(f"VM environment {name} is not up (no {state_path(name)}); start it with 'fabric-tool vm up'")
    return st


def set_link(st: VMState, vm: str, up_: bool) -> None:
    """Cut a VM off the private network (its tap down: a dead machine for the others) or back."""
    _ip("-n", st.netns, "link", "set", st.vm(vm).tap, "up" if up_ else "down")


def down(name: str = DEFAULT_NAME, progress: Progress = _say) -> list[str]:
    """End the environment's qemu processes (only those: by recorded PID and start time, then
    any process left in its namespace: an interrupted ``up``), delete the namespace (its
    bridge and taps go with it), the overlays and the state. What was removed, as text."""
    require_root()
    done: list[str] = []
    st = load_state(name)
    netns = st.netns if st else f"kfvm-{name}"
    if st is not None:
        targets = [(v.pid, v.start) for v in st.vms if v.pid is not None and v.running()]
        if targets:
            nsutil.terminate(targets, grace_s=10.0)  # type: ignore[arg-type]
            done.append(f"{len(targets)} qemu processes")
    if namespaces.exists(netns):
        with contextlib.suppress(OSError):
            inode = os.stat(f"/run/netns/{netns}").st_ino
            left = nsutil.pids_in_netns([inode])
            if left:
                nsutil.terminate([(pid, nsutil.start_time(pid)) for pid in left], grace_s=5.0)
                done.append(f"{len(left)} processes left in {netns}")
        _ip("netns", "del", netns)
        done.append(f"namespace {netns}")
    d = STATE_ROOT / name
    if d.exists():
        shutil.rmtree(d)
        done.append(str(d))
    progress("removed " + (", ".join(done) if done else "nothing (was not up)"))
    return done
