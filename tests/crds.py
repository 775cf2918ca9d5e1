"""CustomResourceDefinitions installed in an emulated API server for a test, the one way."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from scheduler.kube import Api, ApiError
from tests.waiting import wait_until

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def install(api: Api, files: Iterable[Path], served: Iterable[str], timeout: float = 10.0) -> None:
    """Create the CRDs of ``files`` and wait until a list of each path in ``served`` answers
    (an established CRD's resource is served a moment after its create returns)."""
    for f in files:
        api.create(CRDS, yaml.safe_load(f.read_text()))
    paths = list(served)

    def answered() -> bool:
        try:
            for p in paths:
                api.get(p)
            return True
        except ApiError:
            return False

    wait_until(answered, timeout, f"{', '.join(paths)} served")
