"""The ``smapws`` command as a user runs it: help texts, ``token``, ``publish``.

Each case runs the real console entry point in a child process with a
controlled environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import jwt
import pytest
import trio

from smapws import Server, serve
from smapws._cli import main
from smapws._config import OPTIONS, shown_default

from .conftest import (
    API_KEY,
    SECRET,
    RedisServer,
    connect,
    free_port,
    make_config,
    receive_json,
    wait_connections,
)

BASE_ENV = {"PATH": "/usr/bin:/bin"}


def smapws(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smapws", *args],
        env={**BASE_ENV, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def flags_in(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text))


def run_main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str, **env: str
) -> tuple[int, str, str]:
    """``smapws *args`` in this process, with exactly ``env`` as the environment."""
    monkeypatch.setattr(os, "environ", {**BASE_ENV, **env})
    try:
        code = main(list(args))
    except SystemExit as exc:  # --help
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_serve_help_shows_every_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_main(capsys, monkeypatch, "serve", "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    for opt in OPTIONS:
        assert f"(default: {shown_default(opt.default)}) [env {opt.env}]" in text, opt.env
    assert "(default: 54) [env SMAPWS_PING_INTERVAL]" in text


def test_publish_and_token_help_list_only_their_own_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, publish, _ = run_main(capsys, monkeypatch, "publish", "--help")
    assert flags_in(publish) == {"--help", "--user", "--type", "--payload", "--url"}
    assert "REDIS_URL" in publish and "SMAPWS_API_KEY" in publish
    _, token, _ = run_main(capsys, monkeypatch, "token", "--help")
    assert flags_in(token) == {"--help", "--user", "--ttl"}
    assert "JWT_SECRET" in token
    assert "(default: 3600)" in token


def test_token_reads_the_jwt_settings_from_the_environment() -> None:
    out = smapws("token", "--user", "u9", "--ttl", "60", JWT_SECRET=SECRET, JWT_ISSUER="gw")
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"], issuer="gw")
    assert claims["sub"] == "u9"
    assert claims["exp"] - claims["iat"] == 60
    missing = smapws("token", "--user", "u9")
    assert missing.returncode == 2
    assert missing.stderr.startswith("smapws: configuration error: JWT_SECRET: required")


def test_publish_with_the_seeds_redis_variables(redis_server: RedisServer) -> None:
    with redis_server.client() as client:
        pubsub = client.pubsub()
        pubsub.psubscribe("user_noti:*")
        assert pubsub.get_message(timeout=5) is not None
        out = smapws(
            "publish", "--user", "c1", "--type", "project_progress",
            "--payload", '{"project_id": "p", "done": 1, "total": 2}',
            REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis_server.port), REDIS_DB="0",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"status": "published", "hubs": 1, "receivers": 1}
        msg = pubsub.get_message(timeout=5)
        pubsub.close()
    assert msg is not None
    assert (msg["channel"], msg["data"]) == (
        b"user_noti:c1",
        b'{"type":"project_progress","payload":{"project_id":"p","done":1,"total":2}}',
    )


def test_a_failed_redis_publish_names_the_server_and_the_reason() -> None:
    port = free_port()
    out = smapws(
        "publish", "--user", "u1", "--type", "notification",
        REDIS_URL=f"redis://:pw-hunter2@127.0.0.1:{port}/0", SMAPWS_REDIS_TIMEOUT="2",
    )  # fmt: skip
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"smapws: publish to redis://:***@127.0.0.1:{port}/0 failed: ")
    assert "ConnectionError" in lines[0] and "refused" in lines[0]
    assert "hunter2" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--payload", "[1]"], {}, "smapws: --payload: expected a JSON object"),
        (["--type", ""], {}, "smapws: invalid message: bad_type"),
        (
            ["--payload", '{"x": "' + "y" * 200 + '"}'],
            {"SMAPWS_MAX_MESSAGE_BYTES": "100"},
            "smapws: invalid message: too_large: ",
        ),
        ([], {"REDIS_URL": "http://x"}, "smapws: configuration error: REDIS_URL: expected"),
        ([], {"REDIS_URL": ""}, "smapws: configuration error: SMAPWS_API_KEY: needed"),
    ],
)
def test_publish_input_errors_exit_2_in_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    base = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    code, out, err = run_main(
        capsys, monkeypatch, "publish", "--user", "u1", "--type", "n", *args, **{**base, **env}
    )
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert err.startswith(message), err


async def test_publish_through_a_hubs_http_api(nursery: trio.Nursery) -> None:
    hub: Server = await nursery.start(serve, make_config())
    url = f"http://127.0.0.1:{hub.port}"
    async with connect(hub, "h1") as ws:
        await wait_connections(hub, 1)
        ok = await trio.to_thread.run_sync(
            lambda: smapws(
                "publish", "--user", "h1", "--type", "alert", "--payload", '{"title": "x"}',
                "--url", url, SMAPWS_API_KEY=API_KEY,
            )
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == {"status": "accepted", "hubs": 1, "receivers": 1}
        assert (await receive_json(ws))["payload"] == {"title": "x"}
    refused = await trio.to_thread.run_sync(
        lambda: smapws(
            "publish", "--user", "h1", "--type", "alert", "--url", url,
            SMAPWS_API_KEY="wrong-key-77-0123456789",
        )
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr == (
        f"smapws: publish to {url} refused: HTTP 401 bad_api_key "
        "(SMAPWS_API_KEY here is not the hub's)\n"
    )


async def test_publish_to_the_public_port_of_a_split_hub_says_to_use_the_internal_one(
    nursery: trio.Nursery,
) -> None:
    """The public port of a hub with SMAPWS_INTERNAL_PORT serves no publish
    API: the refusal says so once (no doubled "404 404") and what to do, and
    the internal port it names then works."""
    hub: Server = await nursery.start(serve, make_config(SMAPWS_INTERNAL_PORT=0))
    args = ("publish", "--user", "p1", "--type", "alert")
    env = {"SMAPWS_API_KEY": API_KEY, "SMAPWS_HOST": "127.0.0.1"}
    public = await trio.to_thread.run_sync(lambda: smapws(*args, SMAPWS_PORT=str(hub.port), **env))
    assert public.returncode == 1
    assert public.stderr == (
        f"smapws: publish to http://127.0.0.1:{hub.port} refused: HTTP 404 Not Found (no "
        "publish API at this address; a hub with SMAPWS_INTERNAL_PORT serves /api/publish "
        "only on that port: set SMAPWS_INTERNAL_PORT here to the hub's, or give that "
        "port's URL (--url))\n"
    )
    internal = await trio.to_thread.run_sync(
        lambda: smapws(*args, SMAPWS_INTERNAL_PORT=str(hub.internal_port), **env)
    )
    assert internal.returncode == 0, internal.stderr
    assert json.loads(internal.stdout)["status"] == "accepted"


def test_publish_to_a_port_nobody_listens_on_says_what_to_check() -> None:
    out = smapws(
        "publish", "--user", "u1", "--type", "n",
        SMAPWS_API_KEY=API_KEY, SMAPWS_PORT=str(free_port()),
    )  # fmt: skip
    assert out.returncode == 1
    assert len(out.stderr.splitlines()) == 1
    assert "ConnectionRefusedError" in out.stderr
    assert out.stderr.rstrip().endswith(
        "(no hub listens there: start one, or say where it is with SMAPWS_HOST and "
        "SMAPWS_INTERNAL_PORT or SMAPWS_PORT, or --url)"
    )


def test_a_misspelt_variable_gets_one_warning_naming_the_setting() -> None:
    """SMAPWS_PROT=9000 would be ignored without a word: one warning line
    names SMAPWS_PORT (and never the value), and the command still runs."""
    out = smapws(
        "token", "--user", "u1", JWT_SECRET=SECRET, SMAPWS_PROT="9000",
        SMAPWS_NOT_A_THING_AT_ALL="s3cret-value", SMAPWS_FUZZ_SEED="1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "smapws: warning: SMAPWS_NOT_A_THING_AT_ALL is not a setting and is ignored "
        "(`smapws serve --help` lists the settings)",
        "smapws: warning: SMAPWS_PROT is not a setting and is ignored (did you mean SMAPWS_PORT?)",
    ]
    assert jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "u1"


def test_demo_help_lists_no_setting_the_demo_ignores(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo runs on the embedded broker in one process: its help lists
    no Redis, subscription-mode or worker flag, and such a flag is refused."""
    _, out, _ = run_main(capsys, monkeypatch, "demo", "--help")
    flags = flags_in(out)
    for flag in ("--redis-url", "--redis-host", "--redis-sentinels", "--subscribe-mode",
                 "--sharded-pubsub", "--workers", "--demo", "--reconnect-max"):  # fmt: skip
        assert flag not in flags, flag
    assert {"--port", "--host", "--api-key", "--jwt-secret"} <= flags
    assert "SMAPWS_API_KEY" in out and "smapws publish --url" in " ".join(out.split())
    code, _, err = run_main(capsys, monkeypatch, "demo", "--redis-url", "redis://x")
    assert code == 2 and "unrecognized arguments: --redis-url" in err


def _demo_until_open(*args: str, **env: str) -> tuple[subprocess.Popen[str], list[str]]:
    """``smapws demo *args`` with ``env``; its log lines up to its "open" line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "smapws", "demo", *args],
        env={**BASE_ENV, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("smapws demo: open"):
        line = proc.stderr.readline()
        assert line, f"the demo exited: {lines}"
        lines.append(line.rstrip("\n"))
    return proc, lines


@pytest.mark.parametrize("public", [False, True])
def test_the_demo_listens_on_loopback_and_signs_with_its_own_secret(public: bool) -> None:
    """Issue 16: ``smapws demo`` took SMAPWS_HOST (0.0.0.0 in the image) and
    JWT_SECRET from the environment, so its login, which hands a token to
    anyone, listened on every interface and signed with the production key.
    Now loopback unless --public, a fresh secret always, both in its first
    log line."""
    port = free_port()
    env = {"SMAPWS_HOST": "0.0.0.0", "JWT_SECRET": SECRET, "SMAPWS_PORT": str(port)}
    proc, lines = _demo_until_open(*(["--public"] if public else []), **env)
    try:
        first = lines[0]
        assert "fresh random secret, not JWT_SECRET" in first, first
        host = "0.0.0.0" if public else "127.0.0.1"
        assert f"listening on {host}" in first, first
        assert ("--public: anyone" in first) is public, first
        assert any(f"msg=listening host={host} port={port}" in line for line in lines), lines
        request = urllib.request.Request(f"http://127.0.0.1:{port}/demo/login", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            cookie = answer.headers["Set-Cookie"]
        token = cookie.split(";")[0].removeprefix("access_token=")
        assert jwt.decode(token, options={"verify_signature": False})["sub"].startswith("demo-")
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(token, SECRET, algorithms=["HS256"])
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.parametrize("flag", [False, True])
def test_serve_refuses_demo_mode(flag: bool) -> None:
    """Review 16: ``SMAPWS_DEMO=true smapws serve`` (or ``--demo``) in the image
    listened on 0.0.0.0 and its login handed anyone a token signed with the
    production JWT_SECRET: what ``smapws demo`` was made unable to do. Only
    ``smapws demo`` turns the demo on from the command line."""
    env = {"SMAPWS_HOST": "0.0.0.0", "JWT_SECRET": SECRET, "SMAPWS_PORT": str(free_port())}
    if not flag:
        env["SMAPWS_DEMO"] = "true"
    ran = smapws("serve", *(["--demo", "true"] if flag else []), **env)
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.splitlines()[-1] == (
        "smapws: configuration error: SMAPWS_DEMO (--demo): the demo runs only as "
        "smapws demo, which signs with a secret of its own and listens on loopback"
    )


def test_the_demo_refuses_a_public_host_without_public() -> None:
    ran = smapws("demo", "--host", "0.0.0.0", SMAPWS_PORT=str(free_port()))
    assert ran.returncode == 2
    assert ran.stderr.splitlines() == [
        "smapws: configuration error: --host: 0.0.0.0 is not a loopback address; "
        "smapws demo listens on loopback only unless --public is given"
    ]
