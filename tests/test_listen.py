"""``smapws listen``: a tab as a user, every frame one JSON line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from functools import partial

import trio

from smapws._io.listen import frame_line, listen, with_since
from smapws._io.server import Server
from tests.conftest import SECRET, token, wait_connections

MESSAGE = b'{"type":"notification","payload":{"title":"t","message":"m\\nx"}}'


async def publish(server: Server, user: str, data: bytes = MESSAGE) -> None:
    await server.app.broker.publish(b"user_noti:" + user.encode(), data)


async def test_listen_prints_each_frame_as_one_json_line(memory_hub: Server) -> None:
    out, err = io.StringIO(), io.StringIO()
    url = f"ws://127.0.0.1:{memory_hub.port}/ws"
    status: list[int] = []

    async def run() -> None:
        status.append(await listen(url, token("l1"), count=2, out=out, err=err))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_connections(memory_hub, 1)
        await publish(memory_hub, "l1")
        await publish(memory_hub, "l1")
    assert status == [0]
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["type"] == "notification" and first["payload"]["message"] == "m\nx"
    assert len(first["id"]) == 16 and first["id"] != second["id"]
    assert json.loads(err.getvalue().splitlines()[0])["event"] == "open"


async def test_a_refused_upgrade_is_one_line_without_the_token(memory_hub: Server) -> None:
    out, err = io.StringIO(), io.StringIO()
    bad = token("l2", key="another-secret-of-32-bytes-or-more!!")
    url = f"ws://127.0.0.1:{memory_hub.port}/ws"
    assert await listen(url, bad, out=out, err=err) == 1
    assert "HTTP 401" in err.getvalue() and bad not in err.getvalue()
    assert out.getvalue() == ""


async def test_a_token_no_cookie_can_carry_is_refused_without_printing_it(
    memory_hub: Server,
) -> None:
    # h11 refused the header with the whole value in its message
    # ("Illegal header value b'access_token=eyJ...'"), and that went out in
    # a traceback: a token read from a file with CRLF line ends, or with a
    # header smuggled into it. Surrounding whitespace is dropped (a JWT has
    # none); what is left must be a cookie value.
    url = f"ws://127.0.0.1:{memory_hub.port}/ws"
    good = token("l5")
    smuggled = good[:20] + "\r\nX-Injected: 1" + good[20:]
    for bad in (smuggled, good[:20] + " " + good[20:], good + ";x=y"):
        err = io.StringIO()
        assert await listen(url, bad, err=err) == 2
        assert good[:20] not in err.getvalue() and "token" in err.getvalue()
        assert len(err.getvalue().splitlines()) == 1
    out, err = io.StringIO(), io.StringIO()
    status: list[int] = []

    async def run() -> None:
        status.append(await listen(url, good + "\r\n", count=1, out=out, err=err))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_connections(memory_hub, 1)
        await publish(memory_hub, "l5")
    assert status == [0] and json.loads(out.getvalue())["type"] == "notification"


async def test_an_unreachable_hub_is_exit_1() -> None:
    err = io.StringIO()
    from tests.conftest import free_port

    url = f"ws://127.0.0.1:{free_port()}/ws"
    assert await listen(url, token("l3"), err=err, connect_timeout=5) == 1
    # The line says why, not only the exception's type ("OSError").
    assert err.getvalue().startswith(f"smapws: listen: cannot connect to {url}: OSError: ")
    assert "failed" in err.getvalue() and len(err.getvalue().splitlines()) == 1


async def test_a_url_urllib_cannot_split_is_exit_2_in_one_line() -> None:
    # A port that is no number or out of range, a broken IPv6 literal: urllib
    # raised ValueError at parts.port, out of listen as a traceback (exit 1).
    for url in ("ws://127.0.0.1:abc/ws", "ws://127.0.0.1:99999/ws", "ws://[::1/ws"):
        err = io.StringIO()
        assert await listen(url, token("l6"), err=err) == 2
        assert err.getvalue().startswith("smapws: listen: expected a ws:// or wss:// URL")
        assert len(err.getvalue().splitlines()) == 1


async def test_a_failed_tls_handshake_says_why_at_once() -> None:
    # wss:// to a server that answers in plain HTTP: the TLS handshake failed
    # in trio-websocket's reader task, which let the upgrade wait out
    # connect_timeout and report TooSlowError.
    async def plain_http(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, plain_http, 0, host="127.0.0.1"))
        url = f"wss://127.0.0.1:{listener.socket.getsockname()[1]}/ws"
        err = io.StringIO()
        with trio.fail_after(5):
            assert await listen(url, token("l7"), err=err, connect_timeout=30) == 1
        nursery.cancel_scope.cancel()
    assert err.getvalue().startswith(f"smapws: listen: cannot connect to {url}: ")
    assert "SSL" in err.getvalue() and "TooSlowError" not in err.getvalue()


def test_frames_and_urls() -> None:
    assert frame_line("not json") == '{"text": "not json"}'
    assert frame_line(b"\x00\x01") == '{"binary": 2}'
    assert frame_line('{"a": [1, 2]}') == '{"a":[1,2]}'
    assert with_since("ws://h/ws", "ab") == "ws://h/ws?since=ab"
    assert with_since("ws://h/ws?x=1", "ab") == "ws://h/ws?x=1&since=ab"
    assert with_since("ws://h/ws", None) == "ws://h/ws"


async def test_the_command_mints_a_token_and_resumes(memory_hub: Server) -> None:
    # `listen --count 1` gets the first message; `listen --since <its id>`
    # then gets the second only.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMAPWS_", "JWT_"))}
    env.update(JWT_SECRET=SECRET, SMAPWS_HOST="127.0.0.1", SMAPWS_PORT=str(memory_hub.port))
    command = [sys.executable, "-m", "smapws", "listen", "--user", "l4", "--count", "1"]
    run = partial(trio.run_process, env=env, capture_stdout=True, capture_stderr=True)
    done: list[subprocess.CompletedProcess[bytes]] = []

    async def first_run() -> None:
        done.append(await run(command))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_run)
        await wait_connections(memory_hub, 1, timeout=20)
        await publish(memory_hub, "l4")
    first = json.loads(done[0].stdout)
    await publish(memory_hub, "l4", b'{"type":"notification","payload":{"n":2}}')
    resumed = await run([*command, "--since", first["id"]])
    assert resumed.returncode == 0
    assert json.loads(resumed.stdout)["payload"] == {"n": 2}
    assert SECRET not in resumed.stderr.decode()


def test_a_count_below_one_is_refused_before_connecting() -> None:
    # --count 0 connected and exited at once, printing nothing: as if the
    # hub had sent nothing. No hub listens here: the refusal comes first.
    for count in ("0", "-3", "x"):
        done = subprocess.run(
            [sys.executable, "-m", "smapws", "listen", "--user", "l7", "--count", count,
             "--url", "ws://127.0.0.1:9/ws"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "JWT_SECRET": SECRET},
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "argument --count" in done.stderr and done.stdout == ""
