"""What every process of the control benchmark agrees on: keepalives, the quiet period
between changes, the bare baseline's method names, channel options.
"""

from __future__ import annotations

import logging
from typing import Any

_log = logging.getLogger(__name__)


#: The benchmark's name (progress lines, JSON keys).
NAME = "control"
KEEPALIVE_S = 30.0
#: Pause before each fabric change: longer than the reflector's longest coalescing window
#: (fabric.control.reflector.DEFAULT_MAX_COALESCE_WINDOW_S), so every change is a lone change.
QUIET_S = 1.2
BARE_STREAM = "/kft.bench.Bare/Stream"
BARE_BROADCAST = "/kft.bench.Bare/Broadcast"


def agent_channel_options() -> list[tuple[str, Any]]:
    """What real agents use (fabric.control.client), plus a connection of its own per agent (no
    shared subchannel), as agents on separate nodes have."""
    from fabric.control import client

    return [*client.CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


CHANGE_TIMEOUT_S = 300.0
