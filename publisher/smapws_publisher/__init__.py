"""smapws-publisher: publish to the smapws hub from a Python service.

The seed's messages (``progress``, ``notify``, ``alert``, any ``publish``),
checked exactly as the hub checks them before anything is sent, to Redis
(``PUBLISH user_noti:{user_id}``) or through a hub's ``POST /api/publish``;
blocking (:class:`Publisher`) or asyncio (:class:`AsyncPublisher`). Needs
redis and orjson only::

    from smapws_publisher import Publisher

    with Publisher(redis_url="redis://redis:6379/0") as pub:
        hubs = pub.progress("user_123", project_id="proj_xyz", status="CRAWLING",
                            total=1000, done=150, errors=2)

Each publish returns how many hubs received the message (Redis's count of
subscribers), not how many tabs: 0 means no hub listens.
"""

from __future__ import annotations

from smapws_publisher._publisher import (
    DEFAULT_TIMEOUT,
    AsyncPublisher,
    InvalidMessage,
    Publisher,
    PublishError,
    PublishRefused,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncPublisher",
    "InvalidMessage",
    "PublishError",
    "PublishRefused",
    "Publisher",
    "__version__",
]
