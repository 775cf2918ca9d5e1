"""``fabric-tool vm``: its parsers and its dispatch (wired in :mod:`tools.cli` like ``ca``/``cert``).

Exit codes as everywhere in fabric-tool: 0 success, 1 the operation failed (``vm check``: a
failed pair), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fabric.cli_types import positive_seconds
from tools.lab.state import LabError
from tools.vm import image as imagemod
from tools.vm import runner

EPILOG = """\
examples:
  fabric-tool vm image                    build the VM image (or say which cached one is current)
  fabric-tool vm up                       3 VMs from vagrant/settings.yaml, provisioned, in sync
  fabric-tool vm check                    every pod pair between the VMs, the lab's matrix
  fabric-tool vm status                   the VMs and the reflector's view
  fabric-tool vm ssh vm2 -- journalctl -u fabric-agent -n 20
  fabric-tool vm down                     end the VMs' qemu processes, delete namespace and overlays
"""


def add_parsers(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "vm",
        help="the fabric on real kernels: Debian 12 VMs booted with qemu (the VM tier)",
        description="Boot VMs from one cached Debian 12 image (direct kernel boot, qcow2 overlays), their private "
        "network in a namespace of their own (nothing in the root namespace), ssh through a port forward inside "
        "it. Each VM is one node of the settings' topology with an agent (systemd); one also runs the reflector. "
        "Needs root, qemu-system-x86 and (to build the image) mmdebstrap.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    vsub = p.add_subparsers(dest="vm_command", metavar="VM_COMMAND", required=True)
    name = argparse.ArgumentParser(add_help=False)
    name.add_argument("--name", default=runner.DEFAULT_NAME, help=f"environment name (default {runner.DEFAULT_NAME})")
    vsub.add_parser("image", help="build the image if its inputs changed; print its directory",
                    description=f"Build the image into {imagemod.CACHE_ROOT}/<hash of its inputs> unless it is "
                                "there; --prune removes the others.", formatter_class=formatter)  # fmt: skip
    vsub.choices["image"].add_argument("--prune", action="store_true", help="remove cached images of older inputs")
    up = vsub.add_parser("up", parents=[name], help="boot, provision and wait until every node is in sync",
                         formatter_class=formatter)  # fmt: skip
    up.add_argument("settings", nargs="?", default=str(runner.DEFAULT_SETTINGS),
                    help="settings: a topology with a vm: section (default vagrant/settings.yaml)")  # fmt: skip
    up.add_argument("--grace-period", type=positive_seconds, default=30.0, help="reflector's grace period (default 30)")
    up.add_argument("--timeout", type=positive_seconds, default=runner.BOOT_TIMEOUT_S,
                    help=f"seconds for the VMs to answer ssh (default {runner.BOOT_TIMEOUT_S:g})")  # fmt: skip
    ck = vsub.add_parser("check", parents=[name], help="probe every pod pair between the VMs and print the matrix",
                         formatter_class=formatter)  # fmt: skip
    ck.add_argument("--timeout", type=positive_seconds, default=3.0, help="seconds per probe (default 3)")
    ck.add_argument("--services", action="store_true", help="also probe the other clusters' lab service IPs")
    ck.add_argument("--json", action="store_true", help="machine-readable result")
    vsub.add_parser("status", parents=[name], help="the VMs and the reflector's status", formatter_class=formatter)
    vsub.choices["status"].add_argument("--json", action="store_true")
    sh = vsub.add_parser("ssh", parents=[name], help="a shell or a command on a VM", formatter_class=formatter)
    sh.add_argument("vm", metavar="VM")
    sh.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND... (default: a login shell)")
    pv = vsub.add_parser("vagrant-prepare", help="write what vagrant/Vagrantfile needs (box, kernel, key, bundles)",
                         description="Build the image if needed and write into vagrant/.prepared: the box "
                         "(add it with 'vagrant box add --name kosmos-fabric/bookworm "
                         "vagrant/.prepared/kosmos-fabric.box'), the kernel and initrd, the key and one provisioning "
                         "bundle per VM of SETTINGS.",
                         formatter_class=formatter)  # fmt: skip
    pv.add_argument("settings", nargs="?", default=str(runner.DEFAULT_SETTINGS))
    pv.add_argument("-o", "--output", default=str(runner.REPO / "vagrant" / ".prepared"))
    ck.add_argument("--vagrant", metavar="SSH_CONFIG",
                    help="check VMs that Vagrant made ('vagrant ssh-config > FILE'), with --settings")  # fmt: skip
    ck.add_argument("--settings", default=str(runner.DEFAULT_SETTINGS), help="with --vagrant: the settings they use")
    bu = vsub.add_parser("bundle", parents=[name], help="write the provisioning tar of one VM (the Vagrantfile's)",
                         formatter_class=formatter)  # fmt: skip
    bu.add_argument("vm", metavar="VM")
    bu.add_argument("--settings", default=str(runner.DEFAULT_SETTINGS))
    bu.add_argument("-o", "--output", required=True, help="the tar file to write")
    vsub.add_parser("down", parents=[name], help="end the VMs and remove the namespace, taps, overlays and state",
                    formatter_class=formatter)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cmd = args.vm_command
    try:
        if cmd == "image":
            runner.require_root()
            img = imagemod.ensure_image()
            if args.prune:
                for d in imagemod.prune(keep=img.dir.name):
                    print(f"removed {d}", file=sys.stderr)
            print(img.dir)
            return 0
        if cmd == "up":
            runner.up(Path(args.settings), args.name, grace_period_s=args.grace_period, timeout_s=args.timeout)
            return 0
        if cmd == "vagrant-prepare":
            runner.require_root()
            img = imagemod.ensure_image()
            uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
            owner = (int(uid), int(gid)) if uid and gid else None
            for p in runner.prepare_vagrant(Path(args.settings), Path(args.output), img, owner):
                print(p)
            return 0
        if cmd == "check":
            if args.vagrant:
                st = runner.vagrant_state(Path(args.settings), Path(args.vagrant))
            else:
                st = runner.require_state(args.name)
            result = runner.run_check(st, timeout_s=args.timeout, services=args.services)
            if args.json:
                print(json.dumps(result.to_json(), indent=2))
            else:
                from tools.diagnose import check as checkmod

                print(checkmod.render_matrix(result))
            return 0 if result.ok else 1
        if cmd == "status":
            st = runner.require_state(args.name)
            doc: dict[str, Any] = {"vms": [{"name": v.name, "cluster": v.cluster, "ip": v.ip, "qemu_pid": v.pid,
                            "running": v.running()} for v in st.vms],
                   "reflector": runner.status(st)}  # fmt: skip
            if args.json:
                print(json.dumps(doc, indent=2))
            else:
                for v in doc["vms"]:
                    print(f"{v['cluster']}/{v['name']}: {v['ip']} qemu pid {v['qemu_pid']} "
                          f"{'running' if v['running'] else 'NOT RUNNING'}")  # fmt: skip
                print(json.dumps(doc["reflector"], indent=2))
            return 0
        if cmd == "ssh":
            st = runner.require_state(args.name)
            rest = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            import subprocess

            return subprocess.run(runner.ssh_argv(st, st.vm(args.vm), *rest, tty=not rest), check=False).returncode
        if cmd == "bundle":
            st = runner.new_state(args.name, Path(args.settings), imagemod.cached())
            Path(args.output).write_bytes(runner.bundle(st, args.vm))
            return 0
        if cmd == "down":
            runner.down(args.name)
            return 0
    except imagemod.ImageError as e:
        print(f"fabric-tool: error: {e}", file=sys.stderr)
        return 1
    except LabError as e:
        print(f"fabric-tool: error: {e}", file=sys.stderr)
        return e.exit_code
    raise AssertionError(f"unknown vm command {cmd!r}")
