"""The VM image: Debian 12 from Debian packages, cached by a hash of its inputs.

Flow of :func:`ensure_image`:

1. :func:`inputs` gathers everything the image is made of: the suite, the Debian packages, the
   mirror (read from this machine's apt sources, never hard-coded), the Python dependencies
   pinned to the versions this checkout runs with (:func:`python_pins`), and the text of this
   module and of the guest files it writes. Their SHA-256 is the image's name.
2. When ``<cache>/<hash>/manifest.json`` exists the image is reused as it is (a build is about
   a minute and a half of mmdebstrap and mkfs); otherwise :func:`build` makes it in a temporary
   directory beside it and renames it into place, so a build interrupted half-way never looks
   finished.
3. :func:`build`: an ed25519 key made for this image only (the guests trust it, nothing else
   does); a wheelhouse of the pinned dependencies (``pip wheel``: the guests have no network);
   ``mmdebstrap --variant=minbase`` of bookworm with ``linux-image-amd64``, the headers bcc
   compiles against, systemd, sshd, bpftool, tcpdump, python3-bpfcc, nftables; a customize
   hook makes ``/opt/kosmos-fabric/venv`` (system site packages, for bcc) from the wheelhouse,
   installs the key and the guest's network unit. Then ``mkfs.ext4 -d`` (no loop device, no
   mount) and ``qemu-img convert`` to qcow2; the kernel and initrd are copied out for direct
   kernel boot.

The guest learns its own addresses from the kernel command line (``kf.addr=``, ``kf.name=``):
one image serves every VM, and the Vagrant box (vagrant/) is the same disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata as md
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

_log = logging.getLogger(__name__)

CACHE_ROOT = Path(os.environ.get("KOSMOS_FABRIC_VM_CACHE", "/var/cache/kosmos-fabric/vm"))
SUITE = "bookworm"
#: What the guests need: a kernel and the headers bcc compiles the BPF programs against, an init,
#: sshd, the tools the tests and an operator use there, bcc's Python binding (Debian's, as on the
#: host: the project's virtualenv sees it through system site packages), nftables for the
#: service stand-in.
DEB_PACKAGES = (
    "linux-image-amd64",
    "linux-headers-amd64",
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "iproute2",
    "iputils-ping",
    "openssh-server",
    "bpftool",
    "tcpdump",
    "procps",
    "python3",
    "python3-venv",
    "python3-bpfcc",
    "python3-cryptography",
    "nftables",
    "ethtool",
)
#: Distributions the guests need beyond the production ones: scapy for the probe worker of
#: ``fabric-tool check`` (run in the guests' pod namespaces).
EXTRA_PYTHON = ("scapy",)
#: Bump when the build steps change in a way the other inputs do not show.
RECIPE_VERSION = 1
GUEST_VENV = "/opt/kosmos-fabric/venv"
GUEST_SRC = "/opt/kosmos-fabric/src"

#: Configures the guest from the kernel command line: eth0 (qemu user-mode network, ssh only)
#: and eth1 (the VMs' private network, the fabric's underlay), and the host name.
GUEST_NET_SCRIPT = """#!/bin/sh
# kosmos-fabric VM: addresses from the kernel command line (kf.name=, kf.addr=, kf.mgmt=).
# eth0 is management: qemu's user-mode network (static 10.0.2.15) or, with kf.mgmt=dhcp,
# Vagrant's (DHCP by systemd-networkd). eth1 is the private network, the fabric's underlay.
set -e
mgmt=static
for a in $(cat /proc/cmdline); do
  case "$a" in kf.name=*) name=${a#kf.name=};; kf.addr=*) addr=${a#kf.addr=};; kf.mgmt=*) mgmt=${a#kf.mgmt=};; esac
done
ip link set lo up
ip link set eth0 up
if [ "$mgmt" = dhcp ]; then
  mkdir -p /run/systemd/network
  printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' > /run/systemd/network/10-eth0.network
  systemctl --no-block start systemd-networkd.service
else
  ip addr replace 10.0.2.15/24 dev eth0
fi
if [ -n "$name" ]; then hostname "$name"; echo "$name" > /etc/hostname
  grep -q " $name\\$" /etc/hosts || echo "127.0.1.1 $name" >> /etc/hosts; fi
if [ -n "$addr" ]; then ip link set eth1 up; ip addr replace "$addr" dev eth1; fi
"""
#: Ordered after the two NICs' device units, not after systemd-udev-settle (which waits for every
#: device of the machine: 9.5 s of a 44 s boot under TCG, on the path to sshd). A NIC that never
#: comes times its device job out and the script still runs (Wants=, not Requires=).
GUEST_NET_UNIT = """[Unit]
Description=kosmos-fabric VM addresses from the kernel command line
DefaultDependencies=no
Before=network.target ssh.service
After=systemd-udevd.service
Wants=sys-subsystem-net-devices-eth0.device sys-subsystem-net-devices-eth1.device
After=sys-subsystem-net-devices-eth0.device sys-subsystem-net-devices-eth1.device

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/kf-net

[Install]
WantedBy=multi-user.target
"""


class ImageError(RuntimeError):
    """The image cannot be built or found; the message says which step and why."""


@dataclasses.dataclass(frozen=True)
class Image:
    """A built image: ``disk`` (qcow2, the base of every VM's overlay), the kernel and initrd for
    direct kernel boot, and the private key the guests' root trusts."""

    dir: Path
    key: str

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def ssh_key(self) -> Path:
        return self.dir / "id_ed25519"

    def manifest(self) -> dict[str, object]:
        doc = json.loads((self.dir / "manifest.json").read_text())
        assert isinstance(doc, dict)
        return doc


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (``KOSMOS_FABRIC_VM_MIRROR`` overrides it):
    the image comes from the same place as the host's packages."""
    override = os.environ.get("KOSMOS_FABRIC_VM_MIRROR")
    if override:
        return override
    texts: list[str] = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(p.read_text())
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            m = re.match(r"^URIs:\s*(\S+)", line) or re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\b", line)
            if m and not m.group(1).rstrip("/").endswith("-security"):
                return m.group(1)
    raise ImageError("no Debian mirror found in /etc/apt/sources.list{,.d/*}; set KOSMOS_FABRIC_VM_MIRROR")


def _closure(names: list[str]) -> dict[str, str]:
    """Installed distributions reachable from ``names`` through their unconditional requirements,
    with their installed versions (lower-case names)."""
    out: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop().strip(), maxsplit=1)[0].lower().replace("_", "-")
        if not name or name in out:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        # Distributions this interpreter takes from Debian's dist-packages (system site packages:
        # bcc, cryptography) come from the same Debian packages in the guest (DEB_PACKAGES).
        if Path(str(dist.locate_file(""))).resolve().is_relative_to(Path(sys.prefix).resolve()):
            out[name] = dist.version
        else:
            out[name] = ""
        for req in dist.requires or ():
            if "extra ==" in req or "extra==" in req:
                continue
            todo.append(req)
    return out


def python_pins() -> list[str]:
    """``name==version`` of every distribution the guests' virtualenv needs, as installed in this
    interpreter: the guests run exactly what the tests here run (host and guest are both Debian
    12 with Python 3.11, so the same wheels fit)."""
    pins = _closure(["kosmos-fabric", *EXTRA_PYTHON])
    pins.pop("kosmos-fabric", None)
    pins = {n: v for n, v in pins.items() if v}
    if "grpcio" not in pins:
        raise ImageError("kosmos-fabric is not installed in this interpreter; run ./dev.sh setup first")
    return sorted(f"{n}=={v}" for n, v in pins.items())


def inputs() -> dict[str, object]:
    """Everything the image is made of (its hash is the cache key)."""
    return {
        "suite": SUITE,
        "mirror": apt_mirror(),
        "packages": list(DEB_PACKAGES),
        "python": python_pins(),
        "python_version": f"{sys.version_info[0]}.{sys.version_info[1]}",
        # The files baked into the guest and the build recipe's version (not this module's whole
        # text: a comment edit does not cost a rebuild).
        "recipe": RECIPE_VERSION,
        "guest_files": hashlib.sha256(
            (GUEST_NET_SCRIPT + GUEST_NET_UNIT + _customize_script(Path("/work"))).encode()
        ).hexdigest(),
    }


def input_hash(doc: dict[str, object] | None = None) -> str:
    doc = inputs() if doc is None else doc
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def cached(cache: Path = CACHE_ROOT) -> Image | None:
    """The image for the current inputs, when it has been built."""
    h = input_hash()
    d = cache / h
    return Image(d, h) if (d / "manifest.json").exists() else None


def missing_tools() -> list[str]:
    """Host programs a build needs that are not on PATH (each with its Debian package)."""
    need = {"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "qemu-img": "qemu-utils",
            "ssh-keygen": "openssh-client"}  # fmt: skip
    return [f"{tool} (Debian package {pkg})" for tool, pkg in need.items() if shutil.which(tool) is None]


def ensure_image(cache: Path = CACHE_ROOT, progress: bool = True) -> Image:
    """The cached image for the current inputs, built first when there is none.

    Only a directory named by the hash with its ``manifest.json`` counts as built (the build
    writes the manifest last, in its own ``.build-*`` directory, and renames that into place).
    Builders of one hash take turns (a lock file beside it): a second one waits, then finds
    the image made. Half-made ``.build-*`` directories of builds that died (their process is
    gone) are removed before building."""
    doc = inputs()
    h = input_hash(doc)
    final = cache / h
    if (final / "manifest.json").exists():
        return Image(final, h)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f".lock-{h}", "a")  # noqa: SIM115 - held until the build ends
    except OSError as e:
        raise ImageError(f"image cache {cache}: {e} (KOSMOS_FABRIC_VM_CACHE sets another place)") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "manifest.json").exists():
            return Image(final, h)
        remove_dead_builds(cache)
        return build(doc, final, progress)


def remove_dead_builds(cache: Path = CACHE_ROOT) -> list[Path]:
    """Remove ``.build-<hash>-<pid>`` directories whose builder is no longer running (a build
    killed before its cleanup ran); never trusted as images, they only take space."""
    removed = []
    for d in cache.glob(".build-*-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and Path(f"/proc/{pid}").exists():
            continue
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)
        removed.append(d)
    return removed


def _run(argv: list[str], what: str, log: Path, **kw: object) -> None:
    with open(log, "ab") as f:
        f.write(f"\n--- {what}: {' '.join(argv)}\n".encode())
        f.flush()
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ImageError(f"image build: {what} failed (exit {r.returncode}); log {log}:\n    {tail}")


_PIP_INSTALL = (
    f"{GUEST_VENV}/bin/pip install -q --no-index --find-links /tmp/wheelhouse -r /tmp/wheelhouse/requirements.txt"
)


def _customize_script(work: Path) -> str:
    return f"""#!/bin/sh
set -e
root="$1"
cp -a {work}/wheelhouse "$root/tmp/wheelhouse"
chroot "$root" python3 -m venv --system-site-packages {GUEST_VENV}
chroot "$root" {_PIP_INSTALL}
rm -rf "$root/tmp/wheelhouse"
mkdir -p "$root/root/.ssh" "$root{GUEST_SRC}"
chmod 700 "$root/root/.ssh"
cp {work}/id_ed25519.pub "$root/root/.ssh/authorized_keys"
chmod 600 "$root/root/.ssh/authorized_keys"
cp {work}/kf-net "$root/usr/local/sbin/kf-net"
chmod 755 "$root/usr/local/sbin/kf-net"
cp {work}/kf-net.service "$root/etc/systemd/system/kf-net.service"
ln -sf /etc/systemd/system/kf-net.service "$root/etc/systemd/system/multi-user.target.wants/kf-net.service"
echo '/dev/vda / ext4 defaults,errors=remount-ro 0 1' > "$root/etc/fstab"
echo kosmos-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\\n127.0.1.1 kosmos-vm\\n' > "$root/etc/hosts"
printf 'UseDNS no\\nPermitRootLogin prohibit-password\\n' > "$root/etc/ssh/sshd_config.d/kosmos.conf"
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\\nStorage=volatile\\nRuntimeMaxUse=32M\\n' > "$root/etc/systemd/journald.conf.d/kosmos.conf"
# Nothing in the guests waits for a network that never comes (no DHCP on the user-mode NIC).
rm -f "$root/etc/systemd/system/multi-user.target.wants/apt-daily"* || true
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* || true
"""


def build(doc: dict[str, object], final: Path, progress: bool = True) -> Image:
    """Build the image for ``doc`` into ``final`` (see the module docstring)."""
    if os.geteuid() != 0:
        raise ImageError("building the VM image needs root (mmdebstrap in root mode, files owned by root)")
    missing = missing_tools()
    if missing:
        raise ImageError("building the VM image needs " + ", ".join(missing))
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".build-{final.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    log = work / "build.log"
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if progress:
            print(f"vm image: {msg} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

    try:
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"kosmos-fabric-vm-{final.name}",
              "-f", str(work / "id_ed25519")], "ssh-keygen", log)  # fmt: skip
        wheels = work / "wheelhouse"
        wheels.mkdir()
        pins = [str(p) for p in doc["python"]]  # type: ignore[attr-defined]
        (wheels / "requirements.txt").write_text("\n".join(pins) + "\n")
        say(f"wheelhouse of {len(pins)} pinned Python distributions")
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), *pins], "pip wheel", log)
        (work / "kf-net").write_text(GUEST_NET_SCRIPT)
        (work / "kf-net.service").write_text(GUEST_NET_UNIT)
        (work / "customize.sh").write_text(_customize_script(work))
        rootfs = work / "rootfs"
        say(f"mmdebstrap {SUITE} ({len(DEB_PACKAGES)} packages and their dependencies)")
        _run(["mmdebstrap", "--mode=root", "--variant=minbase", "--aptopt=APT::Install-Recommends \"false\"",
              "--include=" + ",".join(DEB_PACKAGES),
              f"--customize-hook=sh {work}/customize.sh \"$1\"",
              SUITE, str(rootfs), str(doc["mirror"])], "mmdebstrap", log)  # fmt: skip
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise ImageError(f"image build: no kernel/initrd under {rootfs}/boot after mmdebstrap; log {log}")
        shutil.copy2(kernels[-1], work / "vmlinuz")
        shutil.copy2(initrds[-1], work / "initrd.img")
        kernel_version = kernels[-1].name.removeprefix("vmlinuz-")
        used = int(subprocess.run(["du", "-sxm", str(rootfs)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])  # fmt: skip
        size_mb = int(used * 1.3) + 512
        say(f"mkfs.ext4 -d ({used} MiB of files in a {size_mb} MiB file system)")
        raw = work / "disk.raw"
        _run(["mkfs.ext4", "-q", "-F", "-L", "kfroot", "-d", str(rootfs), str(raw), f"{size_mb}M"], "mkfs.ext4", log)
        shutil.rmtree(rootfs)
        say("qemu-img convert to qcow2")
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2")], "qemu-img convert", log)
        raw.unlink()
        manifest = {
            "inputs": doc,
            "hash": final.name,
            "kernel": kernel_version,
            "build_seconds": round(time.monotonic() - t0, 1),
            "disk_bytes": (work / "disk.qcow2").stat().st_size,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        say(f"built {final} (kernel {kernel_version})")
        return Image(final, final.name)
    except ImageError:
        # A step failed: its log stays (the error names it) and the rest goes; the next build
        # removes the directory (:func:`remove_dead_builds`). Nothing in it is ever trusted: only
        # ``<hash>/manifest.json`` marks an image built.
        for big in ("rootfs", "disk.raw", "disk.qcow2", "wheelhouse"):
            subprocess.run(["rm", "-rf", "--one-file-system", str(work / big)], check=False)
        raise
    except BaseException:
        # Interrupted (Ctrl-C, a test's time limit): nothing worth keeping.
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
        raise


def prune(cache: Path = CACHE_ROOT, keep: str | None = None) -> list[Path]:
    """Remove cached images other than ``keep`` (and failed builds); the removed directories."""
    removed = []
    if cache.is_dir():
        for d in cache.iterdir():
            if d.name != keep and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed
