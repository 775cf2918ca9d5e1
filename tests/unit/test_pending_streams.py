"""``Limits.max_pending_streams`` reaches gRPC (``bounds.server_options``): new streams wait in
gRPC core until the server's event loop takes them up, and past the bound gRPC refuses them.

A server in its own process keeps its event loop busy while the test opens streams on
connections made before, so every stream waits in gRPC core, as streams wait behind a busy
reflector. With a small bound all but the bound's worth are refused; with the default bound
1,200 waiting streams are all answered (gRPC's own options refuse some of them at random above
1,000: ``tools.bench.control.accept --grpc-defaults`` refuses half of 10,000).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

_SERVER = r"""
import asyncio, json, os, sys, time
import grpc
from fabric.control import bounds

limit, block, release = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
options = bounds.server_options(bounds.Limits() if limit is None else bounds.Limits(max_pending_streams=limit))

async def open_(requests, context):
    await anext(aiter(requests))
    yield b"answered"
    async for _ in requests:
        pass

async def busy_when_told():
    while not os.path.exists(block):
        await asyncio.sleep(0.02)
    while not os.path.exists(release):  # the loop is busy: nothing is taken up meanwhile
        time.sleep(0.02)

async def main():
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "kosmos.test.Pending", {"Open": grpc.stream_stream_rpc_method_handler(open_)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await busy_when_told()
    await server.wait_for_termination()

asyncio.run(main())
"""


def _streams_answered(tmp: Path, limit: int | None, waiting: int) -> tuple[int, dict[str, int]]:
    """Open ``waiting`` streams while the server's loop is busy, then let it go: how many were
    answered, and the status codes of the others."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * waiting + 256
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    block, release = tmp / "block", tmp / "release"
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, json.dumps(limit), str(block), str(release)],
        stdout=subprocess.PIPE, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        return asyncio.run(_open(port, block, release, waiting))
    finally:
        release.touch()
        server.kill()
        server.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _open(port: int, block: Path, release: Path, waiting: int) -> tuple[int, dict[str, int]]:
    def identity(b: bytes) -> bytes:
        return b

    # A connection per stream, as agents on their own nodes have; all connected first, so
    # every stream reaches the server while its loop is busy.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(waiting)]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 60)
        block.touch()
        await asyncio.sleep(0.3)  # the server's loop sees it and stops taking streams up
        calls: list[Any] = [
            ch.stream_stream("/kosmos.test.Pending/Open", request_serializer=identity, response_deserializer=identity)()
            for ch in channels
        ]
        failed: dict[str, int] = {}

        async def first_message(call: Any) -> bool:
            try:
                await call.write(b"open")
                return True
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):  # refused before or during the write
                code = (await call.code()).name
                failed[code] = failed.get(code, 0) + 1
                return False

        sent = await asyncio.gather(*(first_message(c) for c in calls))
        await asyncio.sleep(0.5)  # the last HEADERS frames reach the server
        release.touch()

        async def answer(call: Any) -> bool:
            try:
                return bool(await asyncio.wait_for(call.read(), 60) == b"answered")
            except grpc.aio.AioRpcError as e:
                failed[e.code().name] = failed.get(e.code().name, 0) + 1
                return False

        answered = await asyncio.gather(*(answer(c) for c, ok in zip(calls, sent, strict=True) if ok))
        return sum(answered), failed
    finally:
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close(grace=None)


def test_streams_past_the_pending_bound_are_refused(tmp_path: Path) -> None:
    answered, failed = _streams_answered(tmp_path, limit=20, waiting=60)
    # 20 wait for the loop, the rest are refused, but for the few the server had asked gRPC
    # for before its loop went busy (2 in every run with grpcio 1.85; why 2 was not looked into).
    assert 20 <= answered <= 22, (answered, failed)
    assert sum(failed.values()) == 60 - answered
    assert set(failed) <= {"CANCELLED", "INTERNAL"}, failed


def test_the_default_bound_refuses_no_stream_of_a_reconnecting_fleet(tmp_path: Path) -> None:
    answered, failed = _streams_answered(tmp_path, limit=None, waiting=1_200)
    assert (answered, failed) == (1_200, {})
