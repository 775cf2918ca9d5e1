"""``status`` (the reflector's status as JSON), ``verifier`` (the BPF programs' verifier
instruction counts on this kernel) and ``loaded`` (those of the programs a process holds).

``status`` runs on the host inside the VM environment's namespace (``nsenter``; the runner gives
its bridge an address on the VMs' private network there, so the reflector is reachable without
anything in the root namespace) or, for VMs Vagrant made, in the reflector's VM through ssh. It
prints what the runner waits on (every node in sync) and what the tests read (gateway roles).
``verifier`` runs on the host and ``loaded`` in each guest: the tier compares the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path


def status_doc(target: str, tls_dir: str, timeout_s: float) -> dict[str, object]:
    # Imported here, not at the top: ``loaded`` and ``verifier`` run in TCG guests where importing
    # gRPC and the generated stubs costs seconds of a CPU the agents are compiling on.
    from fabric.control import client, tls

    st = client.get_status_sync(target, timeout_s, tls.TLSDir(Path(tls_dir)))
    return {
        "epoch": st.epoch,
        "holding": st.holding,
        "nodes": [
            {"key": n.key, "connected": n.connected, "in_sync": n.in_sync, "planned": n.planned_version,
             "applied": n.applied_version, "reports_unreachable": list(n.reports_unreachable)}
            for n in st.nodes()
        ],
        "clusters": [
            {"name": c.name, "mode": c.mode, "active_gateway": c.active_gateway, "standby_gateway": c.standby_gateway,
             "gateway_moves": c.gateway_moves}
            for c in st.clusters
        ],
        "rejections": [str(r) for r in st.rejections],
    }  # fmt: skip


def verifier_doc(pin_root: Path) -> dict[str, object]:
    """Compile the translator (bcc, against this kernel's headers), load each program as the
    agent does and read how many instructions the verifier walked (``verified_insns`` in the
    program's fdinfo, Linux 5.16 and later; -1 where the kernel does not say). A program that
    does not load is reported with the verifier's reason instead of a count."""
    from fabric.bpf import translate

    instance = f"verifier-{os.getpid()}"
    programs: dict[str, object] = {}
    t = translate.Translator(instance, pin_root=pin_root)
    try:
        t.load()
        for point in translate.AttachPoint:
            fn = t._bpf.load_func(point.function.encode(), t._bpf.SCHED_CLS)
            info = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
            m = re.search(r"^verified_insns:\s*(\d+)", info, re.M)
            programs[point.function] = int(m.group(1)) if m else -1
    except Exception as e:  # reported, not raised: the caller compares kernels
        programs["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            t.close()
        finally:
            shutil.rmtree(translate.pin_dir_for(instance, pin_root), ignore_errors=True)
    return {"kernel": platform.release(), "programs": programs}


def loaded_doc(pid: int) -> dict[str, object]:
    """The BPF programs process ``pid`` (the agent) holds, by name, with the instruction count
    the verifier walked when this kernel loaded them (the fdinfo's ``verified_insns``; bpftool
    does not show it on Debian 12)."""
    import subprocess

    programs: dict[str, object] = {}
    for info in sorted(Path(f"/proc/{pid}/fdinfo").iterdir()):
        try:
            text = info.read_text()
        except OSError:
            continue
        pid_m = re.search(r"^prog_id:\s*(\d+)", text, re.M)
        if pid_m is None:
            continue
        ins_m = re.search(r"^verified_insns:\s*(\d+)", text, re.M)
        out = subprocess.run(["bpftool", "-j", "prog", "show", "id", pid_m.group(1)], capture_output=True,
                             text=True, check=False).stdout  # fmt: skip
        try:
            name = str(json.loads(out).get("name", f"id{pid_m.group(1)}"))
        except ValueError:
            name = f"id{pid_m.group(1)}"
        programs[name] = int(ins_m.group(1)) if ins_m else -1
    return {"kernel": platform.release(), "programs": programs}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.vm.guest")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="the reflector's status as JSON")
    s.add_argument("--reflector", required=True)
    s.add_argument("--tls-dir", required=True)
    s.add_argument("--timeout", type=float, default=3.0)
    v = sub.add_parser("verifier", help="verifier instruction counts of the BPF programs on this kernel")
    v.add_argument("--pin-root", default="/sys/fs/bpf/kosmos-fabric-verifier", help="a directory on a bpffs")
    lo = sub.add_parser("loaded", help="the BPF programs a process holds, with their verifier instruction counts")
    lo.add_argument("--pid", type=int, required=True)
    args = p.parse_args(argv)
    if args.cmd == "loaded":
        print(json.dumps(loaded_doc(args.pid)))
        return 0
    if args.cmd == "verifier":
        print(json.dumps(verifier_doc(Path(args.pin_root))))
        return 0
    try:
        doc = status_doc(args.reflector, args.tls_dir, args.timeout)
    except Exception as e:  # the caller polls: any failure is one JSON line saying why
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
