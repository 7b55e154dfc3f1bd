"""A live hub fed garbage from every side (issue 8, point 3).

A real ``smapws serve`` process on the session's redis-server, with a
bystander tab open, is fed for :data:`DURATION` seconds, all at once:

- broker messages on ``user_noti:*`` (Redis PUBLISH): the issue's attacks
  (1,000-deep arrays, NaN, 1e999, lone surrogates, megabytes, binary junk,
  channel names with control characters) and random mutations of valid
  messages;
- HTTP requests over raw sockets: mutated heads, ``/api/publish`` with the
  API key and nasty bodies or lengths, upgrades with broken headers or
  tokens, heads too large, heads cut short;
- WebSocket frames after valid upgrades: bad opcodes, reserved bits,
  fragmented or oversized control frames, lengths far beyond what follows,
  invalid UTF-8, bad close codes, unmasked frames, frames after the hub's
  close.

Every answer is judged as it comes (a status the README documents, never
500; well-formed frames with a documented close code), and afterwards the
process is alive, answers ``/health``, delivers to the bystander, counts no
internal error, grew its RSS by less than :data:`RSS_BOUND_KIB`, and wrote
only one-line JSON records to stderr.

Inputs come from a seeded RNG: the seed is printed, and
``SMAPWS_FUZZ_SEED=<seed>`` replays the same inputs (their interleaving
depends on timing).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Final

import redis
import trio
import websockets.exceptions

from smapws import Server

from .conftest import (
    API_KEY,
    SECRET,
    RedisServer,
    connect,
    free_port,
    http,
    metric,
    receive_json,
    token,
    wait_connections,
    wait_port_ready,
)
from .test_fuzz_frames import HUB_CLOSE_CODES, INVALID_UTF8, close_payload, frame
from .test_fuzz_parsers import HEAD_SEEDS, HTTP_TOKENS, NASTY_TOKENS, VALID_MESSAGES
from .test_storm import _rss_kib
from .test_websocket import UPGRADE_HEAD

#: Seconds of fuzzing (the whole test takes a few more).
DURATION: Final = 9.0
#: What the hub's resident memory may grow by, fuzzing included (it holds
#: no more than a few connections at a time here).
RSS_BOUND_KIB: Final = 64 * 1024
#: Users the fuzzing tabs log in as, and the broker fuzzing writes to.
USERS: Final = [b"u0", b"u1", b"u2", b"u\xc3\xa9"]
HANDSHAKE_TIMEOUT: Final = 2.0
#: Every answer comes within this (the handshake deadline, then the
#: lingering close of a refused request).
ANSWER_WITHIN: Final = 8.0
#: Statuses the README documents for some request (500 is not one: it is
#: what a barrier answers for a bug).
HTTP_STATUSES: Final = frozenset(
    {101, 200, 202, 400, 401, 403, 404, 405, 408, 411, 413, 426, 429, 431, 503, 505}
)
HEAD_ONLY_OK: Final = b"HTTP/1.1 "


class Problems(list[str]):
    """What the fuzzing saw go wrong, reported all at once at the end."""

    def add(self, what: str, sent: bytes = b"") -> None:
        if len(self) < 50:
            self.append(f"{what} (sent {sent[:120]!r}{'...' if len(sent) > 120 else ''})")


def mutate(rng: random.Random, data: bytes, tokens: list[bytes]) -> bytes:
    """A few random edits: insert a nasty token, delete or duplicate a range,
    flip a bit, truncate."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        i = rng.randint(0, len(buf))
        j = min(len(buf), i + rng.randint(0, 16))
        op = rng.randrange(5)
        if op == 0:
            buf[i:i] = rng.choice(tokens)
        elif op == 1:
            del buf[i:j]
        elif op == 2:
            buf[i:i] = buf[i:j] * rng.randint(1, 50)
        elif op == 3 and i < len(buf):
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 4:
            del buf[i:]
    return bytes(buf)


# -- broker messages -------------------------------------------------------------

#: The issue's attacks, and one more the fuzzing found (the escaped quotes).
BROKER_ATTACKS: Final = [
    b'{"type":"notification","payload":{"deep":' + b"[" * 1000 + b"]" * 1000 + b"}}",
    b"[" * 60_000,
    b'{"type":"notification","payload":{"x":NaN}}',
    b'{"type":"notification","payload":{"x":-Infinity}}',
    b'{"type":"notification","payload":{"x":1e999}}',
    b'{"type":"notification","payload":{"x":"\\ud800"}}',
    b'{"type":"notification","payload":{"\\udfff":1}}',
    b'{"type":"notification","payload":{"x":"\xed\xa0\x80"}}',
    b'{"type":"notification","payload":{"x":"' + b"a" * 65_000 + b'"}}',
    b'{"type":"notification","payload":{"n":' + b"9" * 5000 + b"}}",
    b'\xef\xbb\xbf{"type":"notification","payload":{}}',
    # The depth scan rescanned an unterminated string from every escaped
    # quote: one such 64 KiB message held the hub for 90 s.
    b"[" * 33 + b'"' + b'\\"' * 32_000,
]


#: Megabytes are refused (too_large), but only once read: a hub reads them
#: at some tens of MiB/s, and past that Redis disconnects it (its pubsub
#: output buffer limit, 32 MiB) and the hub reconnects and resyncs. Sent
#: once a second, the attack stays one.
HUGE: Final = b'{"type":"notification","payload":{"x":"' + b"a" * (2 << 20) + b'"}}'


def broker_message(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.05:
        return rng.choice(BROKER_ATTACKS)
    if pick < 0.15:
        return rng.randbytes(rng.randint(0, 300))
    if pick < 0.25:
        return b"".join(rng.choices(NASTY_TOKENS, k=rng.randint(0, 40)))
    if pick < 0.35:
        n = rng.choice([31, 32, 33, 100, 999, 1000, 5000])
        return b'{"type":"notification","payload":{"d":' + b"[" * n + b"]" * n + b"}}"
    if pick < 0.55:
        return rng.choice(VALID_MESSAGES)
    return mutate(rng, rng.choice(VALID_MESSAGES), NASTY_TOKENS)


def channel_user(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.5:
        return rng.choice(USERS)
    return rng.choice(
        [
            rng.randbytes(rng.randint(0, 24)),
            b"\r\n\x1b[31mred\x00" + rng.randbytes(4),
            "\u2028\u202e\ufeff".encode(),
            b"x" * 10_000,
            b"",
            b"\xff\xfe",
            b"*",
        ]
    )


async def fuzz_broker(redis_server: RedisServer, rng: random.Random, stats: Counter[str]) -> None:
    client = redis.Redis(port=redis_server.port, socket_timeout=10)

    def publish(batch: list[tuple[bytes, bytes]]) -> None:
        pipe = client.pipeline(transaction=False)
        for channel, message in batch:
            pipe.publish(channel, message)
        pipe.execute()

    next_huge = trio.current_time()
    try:
        while True:
            batch = [(b"user_noti:" + channel_user(rng), broker_message(rng)) for _ in range(40)]
            if trio.current_time() >= next_huge:
                batch.append((b"user_noti:" + rng.choice(USERS), HUGE))
                next_huge = trio.current_time() + 1.0
            await trio.to_thread.run_sync(publish, batch)
            stats["broker messages"] += len(batch)
            await trio.sleep(0.02)
    finally:
        client.close()


# -- HTTP requests -----------------------------------------------------------------

BAD_LENGTHS: Final = ["+66", "6_6", "-1", " 12", "0x10", "1e3", "", "9" * 14, "٦٦", "12, 12"]


def publish_request(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        user = b'"u0"'
    else:
        user = rng.choice([b'"\\ud800"', b'"u\\u0000"', b"5", b"null", b'"' + b"a" * 300 + b'"'])
    message = rng.choice(VALID_MESSAGES) if rng.random() < 0.3 else broker_message(rng)
    body = b'{"user_id":' + user + b',"message":' + message + b"}"
    if rng.random() < 0.3:
        body = mutate(rng, body, NASTY_TOKENS)
    elif rng.random() < 0.05:
        body = b"[" * 60_000  # the issue's: RecursionError stopped the process
    key = API_KEY if rng.random() < 0.9 else rng.choice(["", "x", API_KEY + " ", API_KEY[:-1]])
    lines = [b"POST /api/publish HTTP/1.1", b"Host: h", f"Authorization: Bearer {key}".encode()]
    pick = rng.random()
    if pick < 0.75:
        lines.append(b"Content-Length: %d" % (len(body) + rng.choice([0, 0, 0, -1, 1, 100])))
    elif pick < 0.9:
        lines.append(f"Content-Length: {rng.choice(BAD_LENGTHS)}".encode())
    else:
        lines.append(b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def upgrade_request(rng: random.Random) -> bytes:
    user = rng.choice(USERS).decode()
    cookie = rng.choice(
        [
            f"access_token={token(user)}",
            f"access_token={token(user)}; access_token=x",
            f"access_token={mutate(rng, token(user).encode(), [b'.', b'=']).decode('latin-1')}",
            f"access_token={token(user, ttl=-10)}",
            "access_token=",
            "",
        ]
    )
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    if rng.random() < 0.3:
        extra += rng.choice(["Origin: http://evil\r\n", "Origin: http://[\r\n", "Origin: null\r\n"])
    head = UPGRADE_HEAD.format(query=rng.choice(["", "?token=x", "?token=%ff%00"]), extra=extra)
    data = head.encode("latin-1")
    return mutate(rng, data, HTTP_TOKENS) if rng.random() < 0.3 else data


def http_request(rng: random.Random) -> tuple[bytes, bool]:
    """A request, and whether to half-close right after sending it."""
    pick = rng.random()
    if pick < 0.25:
        return publish_request(rng), True
    if pick < 0.45:
        return upgrade_request(rng), False
    if pick < 0.6:
        return mutate(rng, rng.choice(HEAD_SEEDS), HTTP_TOKENS), True
    if pick < 0.7:
        return rng.randbytes(rng.randint(0, 2000)) + rng.choice([b"", b"\r\n\r\n"]), True
    if pick < 0.75:
        return b"GET /health HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", True
    if pick < 0.8:
        return b"GET /ws HTTP/1.1\r\nHost: h\r\n", rng.random() < 0.5  # cut short
    return b"".join(rng.choices(HTTP_TOKENS + HEAD_SEEDS, k=rng.randint(1, 10))), True


def client_frame(rng: random.Random) -> tuple[bytes, int | None]:
    """A client frame, good or bad, and the close code it carries if the
    hub may echo it."""
    pick = rng.random()
    if pick < 0.1:
        junk = rng.randbytes(rng.randint(1, 20))
        return bytes((junk[0] & 0xF0 | 0x1,)) + junk[1:], None  # never a close frame
    if pick < 0.25:
        code = rng.choice([1000, 1001, 1002, 1005, 1006, 1015, 2999, 3000, 4999, 5000])
        payload = close_payload(code, rng.choice([b"", b"bye", *INVALID_UTF8]))
        return frame(0x8, payload, mask=rng.choice([b"\x01\x02\x03\x04", None])), code
    opcode = rng.choice([0x0, 0x1, 0x2, 0x9, 0xA, 0x9, 0xA, rng.randrange(16)])
    payload = rng.choice(
        [rng.randbytes(rng.randint(0, 40)), b"x" * rng.randint(0, 6000), rng.choice(INVALID_UTF8)]
    )
    length = rng.choice([None] * 6 + [200, 70_000, 2**40, 2**63 - 1])
    data = frame(
        opcode,
        payload,
        fin=rng.random() < 0.8,
        rsv=rng.choice([0] * 6 + [1, 4, 7]),
        mask=rng.choice([b"\x37\xfa\x21\x3d"] * 4 + [None]),
        length=length,
        long_form=rng.random() < 0.1,
    )
    if opcode == 0x8 and length is None and len(payload) >= 2:
        return data, struct.unpack("!H", payload[:2])[0]
    return data, None


def server_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    """The hub's complete frames in ``data``, and whether each was well
    formed (FIN, unmasked, a known opcode); a trailing partial frame is
    left out."""
    frames, ok = [], True
    while len(data) >= 2:
        n, offset = data[1] & 0x7F, 2
        if n == 126:
            (n,), offset = struct.unpack("!H", data[2:4]), 4
        elif n == 127:
            (n,), offset = struct.unpack("!Q", data[2:10]), 10
        if len(data) < offset + n:
            break
        ok = ok and data[0] & 0xF0 == 0x80 and not data[1] & 0x80
        ok = ok and data[0] & 0x0F in (0x1, 0x8, 0x9, 0xA)
        frames.append((data[0] & 0x0F, data[offset : offset + n]))
        data = data[offset + n :]
    return frames, ok


def hub_closed(received: bytes) -> bool:
    """Whether the hub's frames so far end with its close frame."""
    return any(op == 0x8 for op, _ in server_frames(received)[0])


def check_websocket(body: bytes, client_codes: set[int], problems: Problems, sent: bytes) -> None:
    frames, ok = server_frames(body)
    if not ok:
        problems.add("malformed frame from the hub", sent)
    ops = [op for op, _ in frames]
    if 0x8 in ops[:-1]:
        problems.add(f"frames after the hub's close frame: {ops}", sent)
    for op, payload in frames:
        if op == 0x8 and payload:
            (code,) = struct.unpack("!H", payload[:2])
            if code not in HUB_CLOSE_CODES and code not in client_codes:
                problems.add(f"close code {code} not documented", sent)


async def read_all(stream: trio.SocketStream, within: float) -> tuple[bytes, bool]:
    """Everything until EOF, and whether EOF came within ``within`` s."""
    data = b""
    with trio.move_on_after(within):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass  # reset after a refusal with unread input: the answer came first
        return data, True
    return data, False


async def websocket_phase(
    stream: trio.SocketStream,
    rng: random.Random,
    stats: Counter[str],
    problems: Problems,
    sent: bytes,
) -> tuple[bytes, set[int]]:
    """After a 101: send random frames, sometimes answer pings, sometimes go
    on after the hub's close frame; returns what the hub sent and the close
    codes it may echo."""
    codes: set[int] = set()
    received = b""
    deadline = trio.current_time() + rng.uniform(0.2, 3.0)
    with trio.move_on_after(ANSWER_WITHIN):
        try:
            if rng.random() < 0.3:
                # Quiet until the hub closes (no pong: 1011, or the token
                # expired: 1008), then frames during its close handshake.
                # (The hub's close frame parsed, not a 0x88 byte: a frame
                # of 136 bytes has one in its length.)
                while not hub_closed(received) and (chunk := await stream.receive_some(65536)):
                    received += chunk
                for _ in range(rng.randint(1, 4)):
                    data, code = client_frame(rng)
                    if code is not None:
                        codes.add(code)  # (a close crossing the hub's is answered)
                    await stream.send_all(data)
                    stats["frames sent while the hub closes"] += 1
            while trio.current_time() < deadline:
                for _ in range(rng.randint(0, 4)):
                    data, code = client_frame(rng)
                    if code is not None:
                        codes.add(code)
                    await stream.send_all(data)
                    stats["frames sent"] += 1
                with trio.move_on_after(rng.uniform(0.0, 0.5)):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return received, codes
                    received += chunk
                    if b"\x89\x00" in chunk and rng.random() < 0.5:
                        await stream.send_all(frame(0xA, b""))
            if rng.random() < 0.5:
                await stream.send_eof()
            while chunk := await stream.receive_some(65536):
                received += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return received, codes
    problems.add(f"a WebSocket not closed within {ANSWER_WITHIN} s", sent)
    return received, codes


async def fuzz_http(
    port: int, rng: random.Random, stats: Counter[str], problems: Problems, ws_only: bool
) -> None:
    while True:
        if ws_only:
            user = rng.choice(USERS).decode()
            cookie = f"Cookie: access_token={token(user, ttl=rng.choice([3600, 2]))}\r\n"
            request, eof = UPGRADE_HEAD.format(query="", extra=cookie).encode(), False
        else:
            request, eof = http_request(rng)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(request)
                if eof:
                    await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # refused before we were done sending
            if not eof and b"\r\n\r\n" not in request:
                await stream.send_eof()
            head = b""
            with trio.move_on_after(ANSWER_WITHIN):
                try:
                    while b"\r\n\r\n" not in head and (chunk := await stream.receive_some(4096)):
                        head += chunk
                except trio.BrokenResourceError:
                    pass
            status_line = head.split(b"\r\n", 1)[0]
            parts = status_line.split(b" ")
            if not head:
                if b"\r\n\r\n" in request[: 16 * 1024 + 4096]:
                    problems.add("no answer to a complete head", request)
                stats["no answer (head cut short)"] += 1
                continue
            if not head.startswith(HEAD_ONLY_OK) or len(parts) < 2 or not parts[1].isdigit():
                problems.add(f"not an HTTP answer: {head[:60]!r}", request)
                continue
            status = int(parts[1])
            stats[f"HTTP {status}"] += 1
            if status not in HTTP_STATUSES:
                problems.add(f"status {status}", request)
            if status != 101:
                _, in_time = await read_all(stream, ANSWER_WITHIN)
                if not in_time:
                    problems.add("a refused request was not closed", request)
                continue
            body = head.partition(b"\r\n\r\n")[2]
            more, codes = await websocket_phase(stream, rng, stats, problems, request)
            check_websocket(body + more, codes, problems, request)


# -- the hub process ---------------------------------------------------------------


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (all labels) in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ ":
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_samples(text: str, prefix: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and not line.endswith(" 0.0")
    }


def notable(log: str) -> str:
    """The hub's warnings and errors other than the expected drops: what to
    read first when the test fails."""
    lines = [
        line
        for line in log.splitlines()
        if '"level": "info"' not in line and "invalid broker message dropped" not in line
    ]
    return "hub warnings and errors:\n" + "\n".join(lines[:30])


def test_a_hub_fed_garbage_from_every_side_keeps_serving(redis_server: RedisServer) -> None:
    seed = int(os.environ.get("SMAPWS_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nfuzz seed {seed} (SMAPWS_FUZZ_SEED={seed} replays these inputs)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMAPWS_", "REDIS_", "JWT_"))}
    env.update(
        SMAPWS_HOST="127.0.0.1",
        SMAPWS_PORT=str(port),
        JWT_SECRET=SECRET,
        SMAPWS_API_KEY=API_KEY,
        REDIS_URL=redis_server.url,
        SMAPWS_LOG_FORMAT="json",
        SMAPWS_LOG_LEVEL="info",
        SMAPWS_MAX_ACCEPT_RATE="0",
        SMAPWS_MAX_ACCEPT_RATE_PER_USER="0",
        SMAPWS_MAX_PENDING_PER_ADDRESS="0",
        SMAPWS_HANDSHAKE_TIMEOUT=str(HANDSHAKE_TIMEOUT),
        # Heartbeats within the fuzzing time, so that the hub also closes
        # connections of its own accord while clients send junk.
        SMAPWS_PING_INTERVAL="1",
        SMAPWS_PONG_WAIT="1",
        SMAPWS_WRITE_WAIT="1",
    )
    with tempfile.TemporaryFile() as stderr:
        hub = subprocess.Popen([sys.executable, "-m", "smapws", "serve"], env=env, stderr=stderr)
        try:
            report = trio.run(_fuzz, port, hub.pid, hub.poll, redis_server, seed)
        finally:
            if hub.poll() is None:
                hub.send_signal(signal.SIGTERM)
            try:
                returncode = hub.wait(timeout=30)
            except subprocess.TimeoutExpired:
                hub.kill()  # a hub that hangs is a failure, not a leftover process
                hub.wait()
                raise
            finally:
                stderr.seek(0)
                log = stderr.read().decode("utf-8", "replace")
                print(notable(log))
                redis_log = (redis_server.workdir / "redis.log").read_text(errors="replace")
                print("redis-server:\n" + "\n".join(redis_log.splitlines()[-10:]))
    print(report)
    not_json = []
    for line in log.splitlines():
        try:
            assert isinstance(json.loads(line), dict)
        except (ValueError, AssertionError):
            not_json.append(line)
    assert not not_json, f"seed {seed}: stderr lines that are not one JSON record: {not_json[:10]}"
    assert "Traceback" not in "".join(line[:20] for line in log.splitlines())
    assert returncode == 0, f"seed {seed}: the hub exited with {returncode}"


async def _fuzz(
    port: int, pid: int, exited: Callable[[], int | None], redis_server: RedisServer, seed: int
) -> str:
    await wait_port_ready(port, 20, exited=exited)
    problems = Problems()
    stats: Counter[str] = Counter()
    async with connect(port, "bystander") as bystander:
        rss_before = _rss_kib(pid)
        with trio.move_on_after(DURATION):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fuzz_broker, redis_server, random.Random(seed), stats)
                for w in range(6):
                    rng = random.Random(seed + 1 + w)
                    nursery.start_soon(fuzz_http, port, rng, stats, problems, False)
                for w in range(3):
                    rng = random.Random(seed + 100 + w)
                    nursery.start_soon(fuzz_http, port, rng, stats, problems, True)
        assert exited() is None, f"seed {seed}: the hub died"
        # Still serving: /health, and a message to the tab that was open all along.
        with trio.fail_after(10):
            health = await http(port, "GET", "/health")
        assert health.status == 200, f"seed {seed}: /health {health.status}"
        # Subscribed (again, if Redis dropped a hub that fell behind: then
        # the bystander is told to resync, the only other message it may get).
        await wait_port_ready(port, 10)
        marker = {"type": "notification", "payload": {"after": "fuzzing", "seed": seed}}
        assert redis_server.publish("bystander", marker) == 1
        try:
            with trio.fail_after(5):
                while (got := json.loads(await bystander.recv()))["type"] == "resync":
                    stats["resync notices to the bystander"] += 1
        except websockets.exceptions.ConnectionClosed as exc:
            raise AssertionError(f"seed {seed}: the bystander was closed: {exc}") from None
        assert got["payload"] == marker["payload"], f"seed {seed}: the bystander got {got}"
        page = (await http(port, "GET", "/metrics")).body.decode()
        rss_after = _rss_kib(pid)
    internal = metric_sum(page, "websocket_internal_errors_total")
    report = "\n".join(
        [
            f"fuzz seed {seed}: {DURATION:.0f} s",
            "sent: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())),
            "hub counted: "
            + ", ".join(
                f"{k.split('websocket_')[-1]} {v:.0f}"
                for k, v in sorted(
                    metric_samples(page, "websocket_broker_messages_invalid_total").items()
                    | metric_samples(page, "websocket_connections_rejected_total").items()
                    | metric_samples(page, "websocket_publish_requests_total").items()
                    | metric_samples(page, "websocket_connections_closed_total").items()
                    | metric_samples(page, "websocket_messages_sent_total").items()
                    | metric_samples(page, "websocket_subscriber_reconnects_total").items()
                )
            ),
            f"hub RSS {rss_before} -> {rss_after} KiB (+{rss_after - rss_before} KiB)",
        ]
    )
    assert not problems, f"seed {seed}: " + "\n".join(problems)
    assert internal == 0, f"seed {seed}: websocket_internal_errors_total {internal}"
    assert rss_after - rss_before < RSS_BOUND_KIB, report
    return report


async def test_escaped_quotes_cannot_hold_the_router(
    redis_hub: Server, redis_server: RedisServer
) -> None:
    """Brackets past the depth bound, then an unterminated string of escaped
    quotes: the depth scan rescanned the rest of the text from every quote,
    and one 64 KiB message held the hub (every tab, every request) for 90 s.
    Now it is dropped at once and the next message is delivered."""
    async with connect(redis_hub, "u1") as ws:
        await wait_connections(redis_hub, 1)
        attack = b"[" * 33 + b'"' + b'\\"' * 32_000
        assert len(attack) > 64_000
        redis_server.publish("u1", attack)
        redis_server.publish("u1", {"type": "notification", "payload": {"n": 1}})
        assert (await receive_json(ws))["payload"] == {"n": 1}
    reason = {"reason": "too_deep"}
    assert metric(redis_hub, "websocket_broker_messages_invalid_total", reason) == 1
