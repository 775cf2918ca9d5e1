"""A test-only stand-in for a scheduler: ``python tests/standin_binder.py URL`` binds every pod
whose ``schedulerName`` is ``default-scheduler`` and that has no node, round robin over the
nodes, through ``pods/binding`` - the one call a scheduler makes. It places nothing by any rule.

Only tests use it, to exercise what drives a scheduler (the scheduler benchmark's machinery)
without the real one; it never stands in for the scheduler in a production path.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def main(url: str) -> None:
    counter = itertools.count()
    sel = urllib.parse.urlencode({"fieldSelector": "spec.schedulerName=default-scheduler,spec.nodeName="})
    while True:
        nodes = [n["metadata"]["name"] for n in _get(f"{url}/api/v1/nodes")["items"]]
        pods = _get(f"{url}/api/v1/pods?{sel}")["items"] if nodes else []
        for p in pods:
            ns, name = p["metadata"]["namespace"], p["metadata"]["name"]
            body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": ns},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": nodes[next(counter) % len(nodes)]}}
            req = urllib.request.Request(f"{url}/api/v1/namespaces/{ns}/pods/{name}/binding", method="POST",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=10).close()
            except urllib.error.HTTPError as e:
                if e.code != 409:  # already bound: fine
                    raise
        if not pods:
            time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1])
