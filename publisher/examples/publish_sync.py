"""Publish the seed's four message types from a blocking service (Django,
Flask, a Celery task, a script), with smapws-publisher alone::

    pip install ./publisher        # or the hub's package, which includes it
    REDIS_URL=redis://localhost:6379/0 python publisher/examples/publish_sync.py user_123

A tab of ``user_123`` connected to a hub on that Redis receives the progress
bar moving, the completion, a notification and an alert.
"""

from __future__ import annotations

import os
import sys

from smapws_publisher import Publisher, PublishError


def main() -> int:
    user = sys.argv[1] if len(sys.argv) > 1 else "user_123"
    url = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    # One per process: thread-safe, connects on first use, reuses its connection.
    with Publisher(redis_url=url) as pub:
        try:
            hubs = pub.progress(
                user, project_id="proj_xyz", status="CRAWLING", total=1000, done=150, errors=2
            )
            pub.progress(user, project_id="proj_xyz", status="DONE", total=1000, done=1000)
            pub.notify(user, "New Comment", "Someone commented on your project")
            pub.alert(user, "Quota", "80% of your crawl quota is used", severity="warning")
        except PublishError as exc:  # Redis down or refusing: the message was not sent
            print(exc, file=sys.stderr)
            return 1
    # Redis counts subscribers: hubs, not tabs (0: no hub listens, the message is gone).
    print(f"published 4 messages to {user}; hubs listening: {hubs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
