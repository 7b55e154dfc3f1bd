"""smapws: the SMAP real-time notification hub.

Backend services publish JSON messages to Redis channels ``user_noti:{user_id}``;
smapws delivers each to every open WebSocket of that user. Run it with
``smapws serve``; embed it with :func:`serve`::

    async with trio.open_nursery() as nursery:
        server = await nursery.start(smapws.serve, smapws.load_config(os.environ))
        print(server.port)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smapws._config import Config, ConfigError
from smapws._config import load as load_config
from smapws._version import __version__

if TYPE_CHECKING:
    from smapws._io.server import Server, serve

__all__ = ["Config", "ConfigError", "Server", "__version__", "load_config", "serve"]


def __getattr__(name: str) -> Any:
    # The server (trio, the WebSocket layer, the Redis bridge) is imported on
    # first use, so that ``import smapws.publisher`` in a backend service
    # costs only what the publisher needs.
    if name in ("Server", "serve"):
        from smapws._io import server

        return getattr(server, name)
    raise AttributeError(f"module 'smapws' has no attribute {name!r}")
