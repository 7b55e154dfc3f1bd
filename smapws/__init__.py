"""smapws: the SMAP real-time notification hub.

Backend services publish JSON messages to Redis channels ``user_noti:{user_id}``;
smapws delivers each to every open WebSocket of that user. Run it with
``smapws serve``; embed it with :func:`serve`::

    async with trio.open_nursery() as nursery:
        server = await nursery.start(smapws.serve, smapws.load_config(os.environ))
        print(server.port)
"""

from smapws._config import Config, ConfigError
from smapws._config import load as load_config
from smapws._io.server import Server, serve
from smapws._version import __version__

__all__ = ["Config", "ConfigError", "Server", "__version__", "load_config", "serve"]
