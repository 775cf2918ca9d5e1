"""The baseline: a bare grpc.aio server that pushes the same planner-computed bytes to the
same agents, with no planning, no snapshot and no bookkeeping of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tools.bench.control.agents import raise_fd_limit, read_commands
from tools.bench.control.shapes import agent_index

_log = logging.getLogger(__name__)


# -- the baseline server ---------------------------------------------------------------------


def broadcast_request(groups: Sequence[tuple[Sequence[int], bytes]]) -> bytes:
    """The baseline's trigger: per group of agent indexes, the message bytes to write to each."""
    return json.dumps([[list(idx), base64.b64encode(payload).decode()] for idx, payload in groups]).encode()


async def _bare_serve(listen: str) -> None:
    """A bare grpc.aio server: EOS to every stream's first message, bytes pushed on demand to the
    streams of the agents a Broadcast names (each stream is known by its Announce's node name)."""
    import grpc

    from fabric.control.generated import fabric_pb2 as pb

    eos = pb.SyncNodeResponse(end_of_snapshot=pb.EndOfSnapshot(version=0, epoch="bare")).SerializeToString()
    streams: dict[int, asyncio.Queue[bytes | None]] = {}

    async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        first = await anext(requests)
        if not first:
            return
        agent = agent_index(pb.SyncNodeRequest.FromString(first).announce.node.name)
        streams[agent] = q

        async def drain() -> None:
            async for _ in requests:  # Keepalive and Applied: read and dropped, as bytes
                pass

        reader = asyncio.create_task(drain())
        try:
            yield eos
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item
        finally:
            reader.cancel()
            if streams.get(agent) is q:
                del streams[agent]

    async def broadcast(request: bytes, context: Any) -> bytes:
        sent = 0
        for idx, payload in json.loads(request):
            data = base64.b64decode(payload)
            for i in idx:
                q = streams.get(i)
                if q is not None:
                    q.put_nowait(data)
                    sent += 1
        return str(sent).encode()

    handler = grpc.method_handlers_generic_handler(
        "kft.bench.Bare",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
            "Broadcast": grpc.unary_unary_rpc_method_handler(broadcast),
        },
    )
    from fabric.control import bounds
    from fabric.control.reflector_service import server_options

    # The reflector's own gRPC server options (keepalive, bounds): the two servers differ only
    # by what the fabric does with the streams, not by how gRPC takes them up.
    server = grpc.aio.server(options=server_options(bounds.Limits()))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(listen)
    await server.start()
    print(json.dumps({"ev": "listening"}), flush=True)
    await read_commands()
    await server.stop(0.5)


def bare_server_main(args: argparse.Namespace) -> int:
    raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_bare_serve(args.listen))
    return 0
