"""``python -m kubeemu.ctrl``: the controller-manager of one lab cluster.

It connects to the cluster's API server, builds every enabled controller (each registers the
informers it needs in ``__init__``), starts the shared informers, and runs the controllers until
SIGTERM. A controller bug ends the process (exit 1) so whoever started it restarts it into a
clean re-list; API errors are retried per key inside each controller.

In order: :func:`main` reads the flags into :class:`Options` (the settings some controllers take:
storage root, root CA, podgc's threshold); :func:`registry` makes a fresh name -> factory table
with those options bound into the factories; :func:`select` picks the names (``--controllers a,b`` or ``all``, the
default; ``-name`` disables one, as kube-controller-manager's ``--controllers`` flag does);
:func:`run` builds and runs them. Nothing here is module state: two managers in one process (the
tests run several) never see each other's settings.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from kubeemu.client import Client
from kubeemu.ctrl.base import Controller, Informers
from kubeemu.process import run_until_signalled
from kubeemu.selectors import SelectorError, parse_labels

_log = logging.getLogger(__name__)

ControllerFactory = Callable[[Client, Informers], Controller]


@dataclasses.dataclass(frozen=True)
class Options:
    """What the controller-manager's flags give its controllers (kube-controller-manager's
    ``ControllerContext``, for the settings the lab's controllers take); None: the controller's
    own default."""

    #: ``--storage-root``: where lab-local-provisioner makes volume directories.
    storage_root: Path | None = None
    #: ``--storage-node-selector``: the nodes lab-local-provisioner serves (None: all).
    storage_node_selector: str | None = None
    #: ``--root-ca-file``'s contents: the bundle root-ca-cert-publisher publishes.
    root_ca: str | None = None
    #: ``--terminated-pod-gc-threshold``: terminated pods podgc keeps (<= 0: keeps them all).
    terminated_pod_gc_threshold: int | None = None
    #: podgc's ``gcCheckPeriod`` and ``quarantineTime`` in seconds (no flags: tests shorten them,
    #: as upstream's ``NewPodGCInternal``).
    podgc_check_period: float | None = None
    podgc_quarantine: float | None = None


def registry(options: Options | None = None) -> dict[str, ControllerFactory]:
    """Every controller of the lab's controller-manager, by name, as factories with ``options``
    bound (a new table each call). Imports are local so one broken controller module names
    itself in the error instead of breaking the import of this module."""
    from kubeemu.ctrl import provisioner, volume
    from kubeemu.ctrl.daemonset import DaemonSetController
    from kubeemu.ctrl.deployment import DeploymentController
    from kubeemu.ctrl.endpoints import EndpointsController
    from kubeemu.ctrl.endpointslice import EndpointSliceController
    from kubeemu.ctrl.job import JobController
    from kubeemu.ctrl.podgc import PodGCController
    from kubeemu.ctrl.replicaset import ReplicaSetController
    from kubeemu.ctrl.rootca import RootCACertPublisher
    from kubeemu.ctrl.statefulset import StatefulSetController
    from kubeemu.ctrl.ttlafterfinished import TTLAfterFinishedController

    opts = options or Options()
    return {
        "replicaset": ReplicaSetController,
        "deployment": DeploymentController,
        "statefulset": StatefulSetController,
        "job": JobController,
        "endpointslice": EndpointSliceController,
        "persistentvolume-binder": volume.PersistentVolumeBinder,
        "pvc-protection": volume.PVCProtection,
        "pv-protection": volume.PVProtection,
        "persistentvolume-expander": volume.ExpandController,
        "lab-local-provisioner": functools.partial(provisioner.LocalProvisioner, storage_root=opts.storage_root,
                                                   node_selector=opts.storage_node_selector),
        "daemonset": DaemonSetController,
        "ttl-after-finished": TTLAfterFinishedController,
        "endpoint": EndpointsController,
        "root-ca-cert-publisher": functools.partial(RootCACertPublisher, root_ca=opts.root_ca),
        "podgc": functools.partial(PodGCController, terminated_pod_threshold=opts.terminated_pod_gc_threshold,
                                   check_period=opts.podgc_check_period, quarantine=opts.podgc_quarantine),
    }


def select(spec: str, known: dict[str, ControllerFactory]) -> list[str]:
    """Names enabled by a ``--controllers`` value: ``all`` (or ``*``), names, ``-name`` to drop."""
    names: list[str] = []
    for raw in (p.strip() for p in spec.split(",")):
        if not raw:
            continue
        if raw in ("all", "*"):
            names.extend(n for n in known if n not in names)
        elif raw.startswith("-"):
            if raw[1:] not in known:
                raise ValueError(f"--controllers: unknown controller {raw[1:]!r} (known: {', '.join(sorted(known))})")
            names = [n for n in names if n != raw[1:]]
        elif raw in known:
            if raw not in names:
                names.append(raw)
        else:
            raise ValueError(f"--controllers: unknown controller {raw!r} (known: {', '.join(sorted(known))})")
    return names


async def run(url: str, names: list[str], known: dict[str, ControllerFactory]) -> None:
    """Run the named controllers against ``url`` until cancelled (or a controller bug)."""
    async with Client(url, user_agent="kubeemu-controller-manager") as client:
        informers = Informers(client)
        controllers = [known[n](client, informers) for n in names]
        informers.start()
        try:
            await asyncio.gather(*(c.run() for c in controllers))
        finally:
            await informers.stop()


def main(argv: list[str] | None = None) -> int:
    names_help = ", ".join(sorted(registry()))
    p = argparse.ArgumentParser(
        prog="python -m kubeemu.ctrl", description="The lab's controller-manager for one emulated cluster.",
        epilog="examples:\n  python -m kubeemu.ctrl --server http://127.0.0.1:6443\n"
               "  python -m kubeemu.ctrl --server URL --controllers all,-job",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, help="the API server URL (http://HOST:PORT)")
    p.add_argument("--controllers", default="all",
                   help=f"comma-separated: all, NAME or -NAME (known: {names_help or 'none'})")
    p.add_argument("--storage-root", type=Path, default=None,
                   help="where lab-local-provisioner makes volume directories (<root>/<node>/<pv>; "
                        "default: $TMPDIR/kubeemu-volumes)")
    p.add_argument("--storage-node-selector", default=None, metavar="SELECTOR",
                   help="a label selector of the nodes lab-local-provisioner provisions on (as a node-deployment "
                        "provisioner's DaemonSet nodeSelector; claims selected onto other nodes are left alone; "
                        "default: every node)")
    p.add_argument("--root-ca-file", type=Path, default=None,
                   help="the CA bundle root-ca-cert-publisher puts in every namespace's kube-root-ca.crt "
                        "(default: a self-signed CA made at start)")
    p.add_argument("--terminated-pod-gc-threshold", type=int, default=None, metavar="N",
                   help="podgc deletes terminated pods beyond N, oldest first (<= 0: never; default 12500, "
                        "as kube-controller-manager)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    root_ca = None
    if args.root_ca_file is not None:
        try:
            root_ca = args.root_ca_file.read_text()
        except OSError as e:
            p.error(f"--root-ca-file {args.root_ca_file}: {e.strerror}")
    try:
        parse_labels(args.storage_node_selector)
    except SelectorError as e:
        p.error(f"--storage-node-selector: {e}")
    known = registry(Options(storage_root=args.storage_root, storage_node_selector=args.storage_node_selector,
                             root_ca=root_ca, terminated_pod_gc_threshold=args.terminated_pod_gc_threshold))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        names = select(args.controllers, known)
    except ValueError as e:
        p.error(str(e))

    print(f"controller-manager for {args.server}: {', '.join(names) or 'no controllers'}", flush=True)
    asyncio.run(run_until_signalled(run(args.server, names, known), "controller-manager stopping"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
