"""Leader election on a ``coordination.k8s.io/v1`` Lease, after client-go's ``leaderelection``
(the scheduler's ``--leader-elect``): only the holder schedules, so two replicas never both bind.

In order, on the elector's thread:

1. Acquire: at once, then every ``retry_period`` plus a random part of up to
   :data:`JITTER_FACTOR` times it (client-go's ``wait.JitterUntil(..., JitterFactor=1.2)``: 2 to
   4.4 s with the defaults, so candidates do not poll in step), read the Lease; create it if
   absent; take it over if its holder is empty (released), is us, or has not changed it for
   ``lease_duration`` **as observed by our own clock** (the record's timestamps are not trusted
   across machines, as client-go; :class:`fabric.lease.ObservedLease`, the rule the reflector's
   replicas share). Updates carry the read ``resourceVersion``, so of two
   candidates only one wins (the other gets 409).
2. Lead: ``on_started`` runs; the lease is renewed every ``retry_period`` (client-go's
   ``wait.Until``, no jitter), each request of a renewal bounded by what is left of the renew
   deadline (client-go's renew context), so an API server that stops answering cannot hold the
   leader past it. If no renewal has succeeded for ``renew_deadline`` the leadership
   is lost: ``on_stopped`` runs and the elector ends (kube-scheduler exits at that point;
   ``main`` does the same).
3. :meth:`LeaderElector.is_leader` is the guard the binder checks before each bind: true only
   while the last successful renewal is younger than ``renew_deadline``, which is shorter than
   the ``lease_duration`` any other candidate must wait, so a deposed leader stops binding before
   a successor can start.
4. ``release`` on a clean stop (SIGTERM: kube-scheduler sets client-go's ``ReleaseOnCancel``)
   writes client-go's release record (no holder, ``leaseDurationSeconds: 1``), so a standby, or
   the same scheduler restarted, takes over at its next try instead of waiting out
   ``lease_duration``. A process that dies without releasing (SIGKILL, a crash) leaves the lease
   to lapse, as upstream: its successor waits ``lease_duration`` from when it last saw the
   record change.

The timings are checked as client-go's ``NewLeaderElector`` does (:func:`timing_problem`).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import random
import threading
import time
from collections.abc import Callable

from fabric import cli_types
from fabric.lease import ObservedLease
from scheduler.kube import Api, ApiError, resource_path

_log = logging.getLogger(__name__)


#: The shortest timeout a request of a renewal gets, however close the renew deadline is.
MIN_REQUEST_S = 0.1

#: client-go ``leaderelection.JitterFactor``: an acquiring candidate waits ``retry_period`` plus
#: up to this many times ``retry_period`` between tries; ``renew_deadline`` must exceed
#: ``JITTER_FACTOR * retry_period``.
JITTER_FACTOR = 1.2


def _now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def timing_problem(lease_duration: float, renew_deadline: float, retry_period: float) -> str | None:
    """Why these timings cannot work (client-go's ``NewLeaderElector`` checks), or None.

    A leader must give up (``renew_deadline``) before any candidate may take over
    (``lease_duration``), and must get more than one jittered retry into its renew deadline."""
    if not retry_period > 0:
        return f"retry period must be greater than zero (got {retry_period:g} s)"
    if not renew_deadline > JITTER_FACTOR * retry_period:
        return (f"renew deadline ({renew_deadline:g} s) must be greater than retry period * {JITTER_FACTOR:g} "
                f"({JITTER_FACTOR * retry_period:g} s)")
    if not lease_duration > renew_deadline:
        return f"lease duration ({lease_duration:g} s) must be greater than renew deadline ({renew_deadline:g} s)"
    return None


def add_flags(p: argparse.ArgumentParser, *, lease_name: str, acts: str, root: bool = False,
              config_file: bool = False) -> None:
    """The command-line flags kosmos-scheduler and kosmos-tree share, spelled as kube-scheduler's:
    which API server (``--kubeconfig``, ``--master``, ``--context``, for
    :func:`scheduler.kube.connect`) and the Lease election (``--leader-elect*`` and ``--identity``,
    for :class:`LeaderElector`; check the timings with :func:`timing_problem`).

    ``lease_name``: the Lease's default name. ``acts``: what a replica does only while it holds
    the Lease (the help says so). ``root``: the API server is the root cluster's (the tree
    manager). ``config_file``: a configuration file has the election's defaults (the scheduler's
    KubeSchedulerConfiguration ``leaderElection``), so a flag not given is None and the file's
    value stands; it also brings that configuration's ``--leader-elect-resource-lock``."""
    p.add_argument("--kubeconfig", help=f"{'root kubeconfig' if root else 'kubeconfig file'} (default: in-cluster, "
                                        "then $KUBECONFIG/~/.kube/config)")
    p.add_argument("--master", help=f"{'root ' if root else ''}API server URL (overrides the kubeconfig's server)")
    p.add_argument("--context", help="kubeconfig context")
    # With a configuration file argparse has no defaults (None: not given), the help names them.
    shown = " (default {})" if config_file else ""
    p.add_argument("--leader-elect", type=cli_types.boolean, nargs="?", const=True,
                   default=None if config_file else True,
                   help=f"campaign for a Lease and {acts} only while holding it (default true"
                        + (", or the config's)" if config_file else ")"))
    if config_file:
        p.add_argument("--leader-elect-resource-lock", choices=["leases"], default="leases",
                       help="the lock's resource type: leases only (upstream's default; its endpoints and configmaps "
                            "locks are gone)")
    p.add_argument("--leader-elect-resource-namespace", default=None if config_file else "kube-system",
                   help="the Lease's namespace" + shown.format("kube-system"))
    p.add_argument("--leader-elect-resource-name", default=None if config_file else lease_name,
                   help="the Lease's name" + shown.format(lease_name))
    for flag, seconds in (("lease-duration", 15.0), ("renew-deadline", 10.0), ("retry-period", 2.0)):
        p.add_argument(f"--leader-elect-{flag}", type=cli_types.positive_seconds,
                       default=None if config_file else seconds, help=f"seconds (default {seconds:g})")
    p.add_argument("--identity", help="this replica's holder identity (default host name + uuid)")


class LeaderElector:
    def __init__(self, api: Api, identity: str, *, namespace: str = "kube-system", name: str = "kosmos-scheduler",
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 on_started: Callable[[], None] | None = None, on_stopped: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        problem = timing_problem(lease_duration, renew_deadline, retry_period)
        if problem:
            raise ValueError(f"leader election of {namespace}/{name}: {problem}")
        self.api = api
        self.identity = identity
        self.namespace = namespace
        self.name = name
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.clock = clock
        self._observed = ObservedLease()  # last spec seen, and when it changed (our clock)
        self._last_renew: float | None = None
        self._leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return resource_path("coordination.k8s.io/v1", "leases", self.namespace, self.name)

    def is_leader(self) -> bool:
        last = self._last_renew
        return self._leading and last is not None and self.clock() - last < self.renew_deadline

    def holder(self) -> str:
        return self._observed.holder()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.retry_period * 3)
        if release and self._leading:
            self.release()

    def _sleep(self, jitter: float = 0.0) -> bool:
        """One retry period, plus up to ``jitter`` times it at random; True when asked to stop."""
        return self._stop.wait(self.retry_period * (1 + random.random() * jitter))

    def run(self) -> None:
        while not self._stop.is_set():
            if self.try_acquire_or_renew():
                break
            if self._sleep(JITTER_FACTOR):
                return
        if self._stop.is_set():
            return
        self._leading = True
        _log.info("leader election: %s acquired lease %s/%s", self.identity, self.namespace, self.name)
        if self.on_started:
            self.on_started()
        while not self._stop.is_set():
            if self._sleep():
                return
            ok = self.try_acquire_or_renew()
            if not ok and self._last_renew is not None and self.clock() - self._last_renew >= self.renew_deadline:
                self._leading = False
                _log.error("leader election: %s lost lease %s/%s (no renewal for %gs)", self.identity,
                           self.namespace, self.name, self.renew_deadline)
                if self.on_stopped:
                    self.on_stopped()
                return

    def _budget(self, now: float) -> float:
        """How long one request of this try may take. client-go renews under a context that ends at
        the renew deadline, so a request the API server never answers cannot keep a leader that
        has lost its lease from noticing (and running ``on_stopped``) until the client's own
        timeout; a candidate's tries (and the release) get the renew deadline too."""
        if self._leading and self._last_renew is not None:
            return max(MIN_REQUEST_S, self.renew_deadline - (now - self._last_renew))
        return self.renew_deadline

    def try_acquire_or_renew(self) -> bool:
        """client-go tryAcquireOrRenew: True when we hold the lease after this call."""
        now = self.clock()
        budget = self._budget(now)
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": max(1, round(self.lease_duration)),
                "acquireTime": _now_micro(), "renewTime": _now_micro(), "leaseTransitions": 0}
        try:
            lease = self.api.request("GET", self.path, timeout=budget)
        except ApiError as e:
            if e.status != 404:
                _log.warning("leader election: reading lease %s/%s: %s", self.namespace, self.name, e)
                return False
            try:
                self.api.create(resource_path("coordination.k8s.io/v1", "leases", self.namespace),
                                {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                 "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec},
                                timeout=budget)
            except ApiError as e2:
                _log.info("leader election: creating lease %s/%s: %s", self.namespace, self.name, e2)
                return False
            except Exception as e2:  # connection errors: try again next period
                _log.warning("leader election: creating lease: %s", e2)
                return False
            self._observed.observe(spec, now)
            self._last_renew = now
            return True
        except Exception as e:
            _log.warning("leader election: reading lease %s/%s: %s", self.namespace, self.name, e)
            return False
        old = lease.get("spec") or {}
        before = self.holder()
        if self._observed.observe(old, now) and self.holder() != before:
            _log.info("leader election: lease %s/%s held by %s", self.namespace, self.name,
                      self.holder() or "nobody (released)")
        holder = self.holder()
        if self._observed.held_by_other(self.identity, now, self.lease_duration):
            return False
        if holder == self.identity:
            spec["acquireTime"] = old.get("acquireTime") or spec["acquireTime"]
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0)
        else:
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + 1
        lease["spec"] = spec
        try:
            self.api.update(self.path, lease, timeout=max(MIN_REQUEST_S, budget - (self.clock() - now)))
        except ApiError as e:
            if e.status != 409:
                _log.warning("leader election: updating lease %s/%s: %s", self.namespace, self.name, e)
            return False
        except Exception as e:
            _log.warning("leader election: updating lease: %s", e)
            return False
        self._observed.observe(spec, now)
        self._last_renew = now
        return True

    def release(self) -> None:
        """Give the lease up so a standby need not wait it out: client-go's release record (no
        holder, ``leaseDurationSeconds: 1``, acquire and renew time now, transitions kept).
        Only when we still hold it: a lease another replica took over is not ours to clear."""
        self._leading = False
        try:
            lease = self.api.request("GET", self.path, timeout=self.renew_deadline)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = _now_micro()
            lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1,
                             "acquireTime": now, "renewTime": now}
            self.api.update(self.path, lease, timeout=self.renew_deadline)
            _log.info("leader election: %s released lease %s/%s", self.identity, self.namespace, self.name)
        except Exception as e:  # best effort on the way out
            _log.warning("leader election: releasing lease: %s", e)
