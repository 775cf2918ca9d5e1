"""The per-container shim (what containerd-shim/conmon are): one process per container attempt.

The kubelet's spawner (:mod:`kubeemu.runtime.spawner`, which has this module imported) forks it
already inside the pod's network namespace and a new mount and UTS namespace of its own, and
calls :func:`main` with ``<attempt dir>/spec.json`` (nothing forks in the kubelet, and no
interpreter starts per container). In that order it:

1. sets the hostname (the pod's name) in its UTS namespace;
2. builds the container's root: an overlay whose lower layer is the host root and whose upper
   layer is a tmpfs (the container's writable layer: it never writes the host's files), with the
   host's top-level mounts (``/proc``, ``/sys``, ``/dev``, ...) bound in, except ``/run`` and
   ``/tmp``, which are fresh tmpfs (the container's own, as an image's);
3. binds each volume at its ``mountPath`` (creating the mount point in the writable layer,
   symlinks resolved inside the container root, never on the host),
   read-only ones remounted read-only, and the pod's ``hostname``/``hosts`` files over
   ``/etc/hostname`` and ``/etc/hosts``;
4. opens the CRI log file, pivots into the root (``pivot_root(2)``, the old root detached: the
   namespace keeps no copy of the host's mounts, such as another pod's ``/run/netns`` entry that
   would keep its network namespace alive), starts the container process (stdin
   ``/dev/null``, stdout/stderr pipes) and records its PID + start time in ``container.json``;
5. copies each pipe line by line into the log in the CRI format containerd writes
   (``<RFC3339Nano> <stdout|stderr> <F|P> <content>``; ``P`` for a partial line split at 16 KiB),
   in one thread: a poll over both pipes and a pidfd of the container process (no threads, no
   ``subprocess``: the container is started with ``posix_spawn``);
6. on exit writes ``exit.json`` (exit code, 128+signal when killed, ``finishedAt``) and exits.

SIGTERM/SIGINT to the shim are forwarded to the container process. When the container's main
process exits, whatever is left in its process group is killed (there is no PID namespace; a
container's other processes end with its PID 1 upstream). The shim is never the kubelet's or the
spawner's child (init reaps it): it keeps the pipes and the log, so a container outlives its
kubelet, and a restarted kubelet finds it from ``shim.json``/``container.json``.

Only the standard library, and cheap at import: the spawner imports it once per kubelet.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import IO, Any

#: The longest line written as one log entry; longer ones are split into partial (``P``) entries.
MAX_LINE = 16 * 1024


def rfc3339nano(t: float | None = None) -> str:
    """``2024-01-02T03:04:05.123456789Z`` as containerd writes log timestamps (UTC)."""
    ns = time.time_ns() if t is None else int(t * 1e9)
    secs, frac = divmod(ns, 10**9)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))}.{frac:09d}Z"


def start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (clock ticks since boot): with the PID, one process's identity."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2:].split()[19])


def write_json(dirfd: int, name: str, obj: dict[str, Any]) -> None:
    """Write ``name`` in directory ``dirfd`` atomically (a temp file renamed), readable by root only."""
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=dirfd)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)


_libc = ctypes.CDLL(None, use_errno=True)
#: pivot_root(2) has no libc wrapper: its system call number, per architecture.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "i686": 217, "armv7l": 218}
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2


def mount(source: str, target: str | Path, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    """mount(2) itself: one system call, where the ``mount`` program would be a process per mount."""
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype or 'bind'}, flags {flags:#x}): {os.strerror(err)}")


def detach(target: str | Path) -> bool:
    """umount2(MNT_DETACH): lazily unmount ``target`` (and so everything mounted below it)."""
    return bool(_libc.umount2(str(target).encode(), MNT_DETACH) == 0)


def pivot_root(new_root: Path) -> None:
    """Make ``new_root`` the mount namespace's root and drop the old one (runc's ``pivot_root(".", ".")``):
    afterwards the namespace holds only the container's mounts, no copy of the host's (a copy of
    a ``/run/netns`` entry would keep another pod's network namespace alive)."""
    os.chdir(new_root)
    machine = os.uname().machine
    nr = SYS_PIVOT_ROOT.get(machine)
    if nr is None:
        raise OSError(f"pivot_root {new_root}: no system call number known for {machine}")
    if _libc.syscall(ctypes.c_long(nr), b".", b".") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root {new_root}: {os.strerror(err)}")
    if not detach("."):
        err = ctypes.get_errno()
        raise OSError(err, f"detaching the old root: {os.strerror(err)}")
    os.chdir("/")


def _top_mounts() -> list[str]:
    """The host's mount points directly below ``/`` (``/proc``, ``/sys``, ``/dev``, ...), to bind recursively.

    Read once per container, from a table that holds every pod's ``/run/netns`` entry too: a
    mount is kept when none of its ancestors is (a set lookup per path component, not a scan of
    the tops), and only a mount point with an octal escape (``\\040``) is decoded as such."""
    with open("/proc/self/mountinfo", "rb") as f:
        raw = f.read()
    points: set[str] = set()
    for line in raw.splitlines():
        fields = line.split(b" ", 5)
        if len(fields) < 5:
            continue
        mp = fields[4].decode(errors="surrogateescape")
        if "\\" in mp:
            mp = mp.encode().decode("unicode_escape")
        if mp != "/":
            points.add(mp)
    tops: set[str] = set()
    for mp in sorted(points, key=len):
        cut = mp.rfind("/")
        while cut > 0 and mp[:cut] not in tops:
            cut = mp.rfind("/", 0, cut)
        if cut <= 0:
            tops.add(mp)
    return sorted(tops, key=len)


def resolve_in_root(root: Path, target: str) -> Path:
    """``target`` inside ``root`` with every symlink resolved *within* ``root`` (as runc's
    securejoin): an absolute link (``/var/run -> /run``) restarts at ``root``, ``..`` never
    climbs above it. Without this a mount point could be created on the host's file system."""
    parts = [p for p in target.split("/") if p and p != "."]
    cur: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if cur:
                cur.pop()
            continue
        candidate = root.joinpath(*cur, name)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise OSError(f"too many levels of symbolic links resolving {target} in the container")
            link = os.readlink(candidate)
            if link.startswith("/"):
                cur = []
            parts = [p for p in link.split("/") if p and p != "."] + parts
            continue
        cur.append(name)
    return root.joinpath(*cur)


def _make_target(root: Path, target: str, source: str) -> Path:
    dest = resolve_in_root(root, target)
    if os.path.isdir(source):
        dest.mkdir(parents=True, exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            dest.touch()
    return dest


#: Top-level directories a container gets fresh (a tmpfs), as an image has its own: the host's
#: are never shared, so nothing a container creates there reaches the host.
PRIVATE_DIRS = {"/run": "mode=0755", "/tmp": "mode=1777"}


def build_root(spec: dict[str, Any]) -> Path:
    """Steps 1-4 of the module docstring; returns the container's root directory (not yet pivoted)."""
    socket.sethostname(spec["hostname"])
    state = Path(spec["rootDir"])
    rw, root = state / "rw", state / "root"
    rw.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    mount("kubeemu-rw", rw, "tmpfs", 0, "mode=0755")
    (rw / "upper").mkdir()
    (rw / "work").mkdir()
    mount("kubeemu-root", root, "overlay", 0, f"lowerdir=/,upperdir={rw / 'upper'},workdir={rw / 'work'}")
    for mp in _top_mounts():
        if mp.startswith(str(state)) or any(mp == d or mp.startswith(d + "/") for d in PRIVATE_DIRS):
            continue  # never the host's /run (its netns entries would pin other pods' namespaces) nor /tmp
        dest = root / mp.lstrip("/")
        if not dest.is_dir() or dest.is_symlink():
            continue
        mount(mp, dest, None, MS_BIND | MS_REC)
    for d, opts in PRIVATE_DIRS.items():
        dest = root / d.lstrip("/")
        if dest.is_dir() and not dest.is_symlink():
            mount("kubeemu-" + d.strip("/"), dest, "tmpfs", 0, opts)
    for m in spec.get("mounts", []):
        dest = _make_target(root, m["target"], m["source"])
        mount(m["source"], dest, None, MS_BIND)
        if m.get("readOnly"):
            mount("none", dest, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    return root


class _Log:
    """The CRI log file of one attempt: the bytes of both pipes as they arrive, cut into entries
    (one per line, ``P`` pieces of ``MAX_LINE`` for longer ones)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.pending: dict[str, bytes] = {}  # per stream, the start of a line not yet ended

    def feed(self, stream: str, data: bytes, eof: bool = False) -> None:
        """Write the entries ``data`` completes on ``stream``; at ``eof`` also the rest (a last line
        without a newline is full, as containerd tags it)."""
        buf = self.pending.pop(stream, b"") + data
        entries = []
        pos, end = 0, len(buf)
        while pos < end:
            nl = buf.find(b"\n", pos, pos + MAX_LINE)
            if nl >= 0:
                content, pos, tag = buf[pos:nl], nl + 1, b" F "
            elif end - pos >= MAX_LINE:  # partial only when cut at MAX_LINE
                content, pos, tag = buf[pos:pos + MAX_LINE], pos + MAX_LINE, b" P "
            elif eof:
                content, pos, tag = buf[pos:], end, b" F "
            else:
                break
            entries.append(rfc3339nano().encode() + b" " + stream.encode() + tag + content + b"\n")
        if pos < end:
            self.pending[stream] = buf[pos:]
        if entries:
            self.f.write(b"".join(entries))
            self.f.flush()


def _executable(name: str, env: dict[str, str]) -> str:
    """``name`` looked up in the container's ``PATH`` (as execvpe does, but with the container's
    environment, not the shim's); FileNotFoundError when no directory has it."""
    if "/" in name:
        return name
    for d in (env.get("PATH") or os.defpath).split(os.pathsep):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(2, "No such file or directory", name)


def _start(argv: list[str], env: dict[str, str]) -> tuple[int, int, int]:
    """Start the container process in a session of its own, stdin ``/dev/null``, stdout/stderr
    pipes (``posix_spawn``: no fork of the shim's memory). Returns its PID and the pipes' read ends."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.posix_spawn(_executable(argv[0], env), argv, env, setsid=True,
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # ignored in the shim (Python's)
                             file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                                           (os.POSIX_SPAWN_DUP2, err_w, 2)])
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        for fd in (out_w, err_w, devnull):
            os.close(fd)
    return pid, out_r, err_r


#: How long the pipes are still read once the container's main process is gone (and its process
#: group killed): what it wrote last reaches the log, a process it detached cannot hold the shim.
DRAIN_S = 2.0


def _supervise(pid: int, pidfd: int, pipes: dict[int, str], log: _Log) -> int:
    """Step 5 until the container's main process exits: copy the pipes into the log, reap it, kill
    what is left of its process group, drain the pipes. Returns its exit status (negative: signal).
    One thread: a poll over the pipes and ``pidfd`` (the process's; readable once it exited)."""
    poller = select.poll()
    for fd in (*pipes, pidfd):
        poller.register(fd, select.POLLIN)
    rc: int | None = None
    drain_until = 0.0
    while pipes or rc is None:
        if rc is None:
            events = poller.poll()
        else:
            left = drain_until - time.monotonic()
            if left <= 0:
                break
            events = poller.poll(left * 1000)
        for fd, _ in events:
            if fd == pidfd:
                rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                poller.unregister(pidfd)
                # The container ends with its main process, as a container's processes end with
                # its PID 1: what it left in its process group (the container's session) is killed.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                drain_until = time.monotonic() + DRAIN_S
                continue
            data = os.read(fd, 65536)
            log.feed(pipes[fd], data, eof=not data)
            if not data:
                poller.unregister(fd)
                os.close(fd)
                del pipes[fd]
    assert rc is not None
    return rc


def main(argv: list[str]) -> int:
    """Run the attempt whose spec is ``argv[0]`` (steps 1-6), in the shim process the spawner forked;
    returns the shim's exit code (0 once the container's exit is recorded)."""
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    dirfd = os.open(spec_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    log = _Log(open(spec["log"], "ab"))  # noqa: SIM115 - kept open for the container's lifetime
    started = rfc3339nano()
    try:
        root = build_root(spec)
        pivot_root(root)
        cwd = spec.get("workingDir") or "/"
        os.makedirs(cwd, exist_ok=True)  # runc creates a missing working directory too
        os.chdir(cwd)
        pid, out_r, err_r = _start(spec["argv"], spec["env"])
    except OSError as e:
        if isinstance(e, FileNotFoundError) and spec["argv"] and "/" not in spec["argv"][0]:
            e = OSError(f'exec: "{spec["argv"][0]}": executable file not found in $PATH')  # runc's words
        elif isinstance(e, FileNotFoundError) and spec["argv"]:
            e = OSError(f'exec: "{spec["argv"][0]}": stat {spec["argv"][0]}: no such file or directory')
        e = OSError(f"failed to create containerd task: failed to create shim task: OCI runtime create failed: "
                    f"runc create failed: unable to start container process: {e}: unknown")
        log.f.write(f"{rfc3339nano()} stderr F kubeemu shim: {e}\n".encode())
        log.f.close()
        write_json(dirfd, "exit.json", {"exitCode": 128, "reason": "StartError", "startedAt": started,
                                        "finishedAt": rfc3339nano(), "message": str(e)})
        return 1
    write_json(dirfd, "container.json", {"pid": pid, "start": start_time(pid), "startedAt": started})
    pidfd = os.pidfd_open(pid)  # open until the shim exits: a signal never reaches a reused PID

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    rc = _supervise(pid, pidfd, {out_r: "stdout", err_r: "stderr"}, log)
    code = 128 - rc if rc < 0 else rc
    write_json(dirfd, "exit.json", {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                    "startedAt": started, "finishedAt": rfc3339nano(),
                                    **({"signal": -rc} if rc < 0 else {})})
    log.f.close()
    return 0
