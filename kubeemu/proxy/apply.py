"""Putting a kube-proxy table into a node's network namespace, and reading back what is there.

Every call execs ``nsenter --net=/run/netns/NETNS -- nft ...`` (no ``preexec_fn``, no fork in
Python: DESIGN.md "Processes"). A table is replaced by one ``nft -f -`` transaction (create,
delete, define: :func:`kubeemu.proxy.rules.replace_script`), so packets never see a missing or
half-written table. :func:`kernel_hash` reads the hash our table carries in its comment, which
is how a restarted proxy (and the periodic check) knows the kernel already has the ruleset.
"""

from __future__ import annotations

import asyncio
import logging

from kubeemu.proxy import rules

_log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"


class ApplyError(RuntimeError):
    """``nft`` refused a ruleset or could not run in the namespace."""


def nft_argv(netns: str, *args: str) -> list[str]:
    return ["nsenter", f"--net={NETNS_DIR}/{netns}", "--", "nft", *args]


async def _run(argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def apply_table(netns: str, text: str, family: int) -> None:
    """Replace our table of ``family`` in ``netns`` with ``text`` (one transaction)."""
    rc, _, err = await _run(nft_argv(netns, "-f", "-"), rules.replace_script(text, family))
    if rc != 0:
        raise ApplyError(f"nft -f in netns {netns} (IPv{family} table {rules.TABLE}) failed: {err.strip()}")


async def delete_table(netns: str, family: int) -> None:
    """Remove our table of ``family`` from ``netns`` (``--cleanup``; nothing else is touched)."""
    rc, _, err = await _run(nft_argv(netns, "-f", "-"), rules.delete_script(family))
    if rc != 0:
        raise ApplyError(f"deleting table {rules.TABLE} (IPv{family}) in netns {netns} failed: {err.strip()}")


async def kernel_hash(netns: str, family: int) -> str | None:
    """The ruleset hash of our table in ``netns`` (None: no table, or not one of ours)."""
    fam = "ip6" if family == 6 else "ip"
    rc, out, _ = await _run(nft_argv(netns, "-t", "list", "table", fam, rules.TABLE))  # -t: no set elements
    return rules.table_hash(out) if rc == 0 else None
