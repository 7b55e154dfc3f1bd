"""The floor: one ``send()`` per delivery and as little else as a hub can do.

Not a hub anyone should run: the reference row of the benchmark, so that each
hub's figures read as a multiple of what the machine's system calls cost. One
thread, one ``epoll`` loop over raw non-blocking sockets:

- **Deliveries.** A raw socket to Redis, ``PSUBSCRIBE user_noti:*``, replies
  parsed by hiredis (C). For each ``pmessage`` the published bytes are framed
  once (a 2- or 4-byte header in front: no validation, no ``timestamp``) and
  written with one ``send()`` per connection of the user. Nothing is queued: a
  socket that does not take a whole frame at once is dropped (a ~250-byte frame
  never meets a full buffer at the benchmark's rates, so this never happens there).
- **Handshakes.** The request head is read until its blank line; the
  ``access_token`` cookie's HS256 signature is checked with ``hmac`` and its
  ``exp``/``sub`` read with ``json``; ``101`` is written. ``/ready`` and
  ``/health`` are answered and the socket closed.
- **Idle connections** are a socket and a dict entry; client frames are read
  and ignored, EOF closes.

Same environment as the other hubs: ``SMAPWS_HOST``, ``SMAPWS_PORT``,
``REDIS_URL``, ``JWT_SECRET``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import select
import socket
import struct
import time
import urllib.parse

import hiredis

PREFIX = b"user_noti:"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_IN = select.EPOLLIN


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def user_of(head: bytes, secret: bytes) -> bytes | None:
    """The ``sub`` of a valid HS256 ``access_token`` cookie in ``head``, or None."""
    start = head.find(b"access_token=")
    if start < 0:
        return None
    start += len(b"access_token=")
    end = len(head)
    for stop in (b";", b"\r\n"):
        i = head.find(stop, start)
        if 0 <= i < end:
            end = i
    parts = head[start:end].strip().split(b".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(_b64url(parts[0]))
        mac = hmac.new(secret, parts[0] + b"." + parts[1], hashlib.sha256).digest()
        if header.get("alg") != "HS256" or not hmac.compare_digest(mac, _b64url(parts[2])):
            return None
        claims = json.loads(_b64url(parts[1]))
    except (ValueError, AttributeError):
        return None
    exp, sub = claims.get("exp"), claims.get("sub")
    if not isinstance(exp, int | float) or exp <= time.time():
        return None
    return sub.encode() if isinstance(sub, str) and sub else None


def frame(payload: bytes) -> bytes:
    """One unmasked, final text frame."""
    n = len(payload)
    if n <= 125:
        return bytes((0x81, n)) + payload
    if n <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Floor:
    def __init__(self, host: str, port: int, redis_url: str, secret: bytes) -> None:
        self.secret = secret
        self.ep = select.epoll()
        self.listener = socket.create_server((host, port), backlog=1024)
        self.listener.setblocking(False)
        self.ep.register(self.listener.fileno(), _IN)
        url = urllib.parse.urlsplit(redis_url)
        self.redis = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379))
        self.redis.sendall(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$11\r\nuser_noti:*\r\n")
        self.redis.setblocking(False)
        self.ep.register(self.redis.fileno(), _IN)
        self.reader = hiredis.Reader()
        self.ready = False
        self.heads: dict[int, tuple[socket.socket, bytes]] = {}  # fd -> upgrading
        self.open: dict[int, tuple[socket.socket, bytes]] = {}  # fd -> (socket, user)
        self.users: dict[bytes, list[socket.socket]] = {}

    def run(self) -> None:
        listen_fd, redis_fd = self.listener.fileno(), self.redis.fileno()
        poll = self.ep.poll
        while True:
            for fd, _ in poll():
                if fd == redis_fd:
                    self.on_redis()
                elif fd == listen_fd:
                    self.on_accept()
                elif fd in self.open:
                    self.on_client(fd)
                else:
                    self.on_head(fd)

    def on_redis(self) -> None:
        data = self.redis.recv(1 << 20)
        if not data:
            raise SystemExit("Redis closed the subscription")
        self.reader.feed(data)
        users = self.users
        skip = len(PREFIX)
        while (msg := self.reader.gets()) is not False:
            if msg[0] == b"pmessage":
                conns = users.get(msg[2][skip:])
                if conns:
                    data = frame(msg[3])
                    size = len(data)
                    failed = None
                    for sock in conns:
                        try:
                            if sock.send(data) == size:
                                continue
                        except OSError:
                            pass
                        failed = [*(failed or ()), sock]
                    for sock in failed or ():
                        self.drop(sock.fileno())
            elif msg[0] == b"psubscribe":
                self.ready = True

    def on_accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.heads[sock.fileno()] = (sock, b"")
            self.ep.register(sock.fileno(), _IN)

    def on_head(self, fd: int) -> None:
        sock, head = self.heads[fd]
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.close_head(fd)
            return
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self.heads[fd] = (sock, head)
            return
        del self.heads[fd]
        path = head[: head.find(b"\r\n")].split(b" ")[1] if b" " in head else b""
        if path == b"/ws":
            user = user_of(head[:end], self.secret)
            key = _header(head[:end], b"sec-websocket-key")
            if user is not None and key:
                accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
                sock.send(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
                self.open[fd] = (sock, user)
                self.users.setdefault(user, []).append(sock)
                return
            self.answer(fd, sock, b"401 Unauthorized", b"unauthorized\n")
        elif path == b"/ready":
            status = b"200 OK" if self.ready else b"503 Service Unavailable"
            self.answer(fd, sock, status, b"ready\n" if self.ready else b"not ready\n")
        elif path == b"/health":
            body = {"status": "ok", "websocket": {"active_connections": len(self.open),
                                                  "active_users": len(self.users)}}  # fmt: skip
            self.answer(fd, sock, b"200 OK", json.dumps(body).encode())
        else:
            self.answer(fd, sock, b"404 Not Found", b"not found\n")

    def answer(self, fd: int, sock: socket.socket, status: bytes, body: bytes) -> None:
        head = b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
            status,
            len(body),
        )
        with contextlib.suppress(OSError):
            sock.send(head + body)
        self.ep.unregister(fd)
        sock.close()

    def close_head(self, fd: int) -> None:
        sock, _ = self.heads.pop(fd)
        self.ep.unregister(fd)
        sock.close()

    def on_client(self, fd: int) -> None:
        sock, _ = self.open[fd]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or data[0] & 0x0F == 0x8:  # EOF or a close frame: hang up
            self.drop(fd)

    def drop(self, fd: int) -> None:
        entry = self.open.pop(fd, None)
        if entry is None:
            return
        sock, user = entry
        conns = self.users.get(user, [])
        if sock in conns:
            conns.remove(sock)
        if not conns:
            self.users.pop(user, None)
        self.ep.unregister(fd)
        sock.close()


def _header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b""


def main() -> None:
    Floor(
        os.environ.get("SMAPWS_HOST", "0.0.0.0"),
        int(os.environ.get("SMAPWS_PORT", "8081")),
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        os.environ["JWT_SECRET"].encode(),
    ).run()


if __name__ == "__main__":
    main()
