"""Publish the seed's four message types from an asyncio service (FastAPI,
aiohttp, a consumer), with smapws-publisher alone::

    REDIS_URL=redis://localhost:6379/0 python publisher/examples/publish_asyncio.py user_123

The same messages as publish_sync.py, through :class:`AsyncPublisher`.
"""

from __future__ import annotations

import asyncio
import os
import sys

from smapws_publisher import AsyncPublisher, PublishError


async def main() -> int:
    user = sys.argv[1] if len(sys.argv) > 1 else "user_123"
    url = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    # One per process (e.g. made in a FastAPI lifespan), shared by every task.
    async with AsyncPublisher(redis_url=url) as pub:
        try:
            hubs = await pub.progress(
                user, project_id="proj_xyz", status="CRAWLING", total=1000, done=150, errors=2
            )
            await pub.progress(user, project_id="proj_xyz", status="DONE", total=1000, done=1000)
            await pub.notify(user, "New Comment", "Someone commented on your project")
            await pub.alert(user, "Quota", "80% of your crawl quota is used", severity="warning")
        except PublishError as exc:
            print(exc, file=sys.stderr)
            return 1
    print(f"published 4 messages to {user}; hubs listening: {hubs}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
