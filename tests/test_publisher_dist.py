"""``smapws-publisher`` as a backend service installs it: its own wheel, built
from ``publisher/``, in a fresh virtualenv with nothing of the hub's, publishing
to a real redis-server (the session's) with the runnable examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import smapws_publisher
from smapws import __version__
from smapws._core import auth, envelope
from smapws.publisher import Publisher

from .conftest import RedisServer, doc_block

ROOT = Path(__file__).resolve().parent.parent
PUBLISHER = ROOT / "publisher"
#: The hub's stack: a service that only publishes must not get any of it.
HUB_ONLY = ("trio", "trio_websocket", "trio_asyncio", "trio_util", "cryptography", "jwt", "smapws")


def run(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``args`` run outside the checkout (where ``import smapws`` finds nothing)."""
    kwargs.setdefault("cwd", "/")
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=180, **kwargs
    )
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a new virtualenv holding the built smapws-publisher wheel."""
    where = tmp_path_factory.mktemp("publisher")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", where / "dist", PUBLISHER)
    (wheel,) = (where / "dist").glob("smapws_publisher-*.whl")
    assert wheel.name == f"smapws_publisher-{__version__}-py3-none-any.whl"
    run(sys.executable, "-m", "venv", where / "venv")
    python = where / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel)
    return python


def test_it_installs_with_redis_and_orjson_only(fresh: Path) -> None:
    listed = run(fresh, "-m", "pip", "list", "--format", "json").stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert {"smapws-publisher", "redis", "orjson"} <= names
    assert not {"trio", "trio-websocket", "trio-asyncio", "cryptography", "pyjwt", "smapws"} & names
    probe = f"import importlib.util as u; print([m for m in {HUB_ONLY!r} if u.find_spec(m)])"
    assert run(fresh, "-c", probe).stdout.strip() == "[]"
    # Importing it imports none of them either (nor does checking a message).
    check = (
        "import sys, smapws_publisher._messages as m; m.encode('notification', {'title': 't'}); "
        f"print(sorted(set(sys.modules) & set({HUB_ONLY!r})))"
    )
    assert run(fresh, "-c", check).stdout.strip() == "[]"


def test_the_hub_uses_the_same_checks_one_copy() -> None:
    # smapws.publisher is the distribution's code, and the hub's parser and
    # token check use its validation (not a copy of it).
    assert Publisher is smapws_publisher.Publisher
    assert envelope.InvalidMessage is smapws_publisher.InvalidMessage
    assert auth.valid_user_id is envelope.valid_user_id
    assert auth.valid_user_id.__module__ == "smapws_publisher._validate"
    assert envelope.loads_strict.__module__ == "smapws_publisher._validate"
    assert smapws_publisher.__version__ == __version__


@pytest.fixture
def subscriber(redis_server: RedisServer) -> Iterator[redis.client.PubSub]:
    """A subscriber to ``user_noti:*`` (what arrives waits in its socket)."""
    with redis.Redis(port=redis_server.port) as client, client.pubsub() as pubsub:
        pubsub.psubscribe("user_noti:*")
        assert pubsub.get_message(timeout=5)["type"] == "psubscribe"  # type: ignore[index]
        yield pubsub


def received(pubsub: redis.client.PubSub) -> list[dict[str, Any]]:
    """Every message published so far (the examples have exited: all is here)."""
    got = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        got.append({"channel": message["channel"].decode(), **json.loads(message["data"])})
    return got


@pytest.mark.parametrize("example", ["publish_sync.py", "publish_asyncio.py"])
def test_the_examples_publish_the_seeds_messages_from_the_fresh_venv(
    fresh: Path, redis_server: RedisServer, subscriber: redis.client.PubSub, example: str
) -> None:
    env = {**os.environ, "REDIS_URL": redis_server.url}
    out = run(fresh, PUBLISHER / "examples" / example, "user_123", env=env).stdout
    # One subscriber (this test's) counts as one hub.
    assert out.strip() == "published 4 messages to user_123; hubs listening: 1"
    progress = {
        "project_id": "proj_xyz", "status": "CRAWLING", "total": 1000, "done": 150,
        "errors": 2, "progress_percent": 15.0,
    }  # fmt: skip
    done = {**progress, "status": "DONE", "done": 1000, "errors": 0, "progress_percent": 100.0}
    note = {"title": "New Comment", "message": "Someone commented on your project"}
    alert = {"title": "Quota", "message": "80% of your crawl quota is used"}
    channel = "user_noti:user_123"
    expected = [
        {"channel": channel, "type": "project_progress", "payload": progress},
        {"channel": channel, "type": "project_completed", "payload": done},
        {"channel": channel, "type": "notification", "payload": {**note, "level": "info"}},
        {"channel": channel, "type": "alert", "payload": {**alert, "severity": "warning"}},
    ]
    assert received(subscriber) == expected


def test_the_documented_snippet_runs_as_written_from_the_fresh_venv(
    fresh: Path, redis_server: RedisServer, subscriber: redis.client.PubSub
) -> None:
    snippet = doc_block("docs/backend.rst", "The same in Python (``req``")
    assert "redis://redis:6379/0" in snippet
    run(fresh, "-c", snippet.replace("redis://redis:6379/0", redis_server.url))
    progress = {
        "project_id": "proj_xyz", "status": "CRAWLING", "total": 1000, "done": 150,
        "errors": 2, "progress_percent": 15.0,
    }  # fmt: skip
    assert received(subscriber) == [
        {"channel": "user_noti:user_123", "type": "project_progress", "payload": progress}
    ]


def test_a_bad_message_is_refused_before_sending_from_the_fresh_venv(
    fresh: Path, redis_server: RedisServer
) -> None:
    script = (
        "import sys\n"
        "from smapws_publisher import InvalidMessage, Publisher\n"
        f"pub = Publisher(redis_url={redis_server.url!r})\n"
        "try:\n"
        "    pub.notify('u1', 'x' * 70000, 'too big for the hub')\n"
        "except InvalidMessage as exc:\n"
        "    print(exc.reason)\n"
        "try:\n"
        "    Publisher.from_env({})\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('from_env:', exc)\n"
    )
    lines = run(fresh, "-c", script).stdout.splitlines()
    assert lines[0] == "too_large"
    assert lines[1].startswith("from_env: ") and "redis_url=" in lines[1]
