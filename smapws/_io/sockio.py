"""Socket reads and writes of the front door and the connections, without
trio's scheduling round trip when the kernel can answer at once.

``trio.SocketStream``'s ``receive_some`` and ``send_all`` go through the
scheduler on every call, even when the bytes are already there (a
checkpoint after the system call, in an async context manager). An
upgrade made five such round trips between ``accept()`` and its 101
(accept, the head, two checkpoints of the hub's own and the 101), and
they were the largest part of a handshake's cost after the system calls
themselves (``python -m bench.profile --storm``). These helpers make the
system call first, on the stream's socket's file descriptor, and wait
(``trio.lowlevel.wait_readable``/``wait_writable``, the only awaits here)
only when it would block; a stream without a socket (the in-memory
streams of the tests) goes through its own methods.

What they do not give: a checkpoint when no wait was needed. Callers read
a bounded amount before they wait again (a request head is at most
``MAX_HEAD_BYTES``; a connection waits for readability before each read),
so no peer can hold the event loop.
Errors are the stream's: :class:`trio.BrokenResourceError` when the peer
is gone (reset, broken pipe), :class:`trio.ClosedResourceError` when the
socket was closed meanwhile.
"""

from __future__ import annotations

import errno
import os
import socket

import trio


def fd_of(stream: trio.abc.Stream) -> int:
    """The file descriptor of ``stream``'s socket (trio made it
    non-blocking), or -1: not a socket stream, or already closed."""
    if not isinstance(stream, trio.SocketStream):
        return -1
    try:
        return stream.socket.fileno()
    except OSError:
        return -1


def receive_now(fd: int, max_bytes: int) -> bytes | None:
    """What the socket ``fd`` holds now (b"" at its end), or None when it
    holds nothing yet or ``fd`` is -1; never waits."""
    if fd < 0:
        return None
    try:
        return os.read(fd, max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _mapped(exc) from exc


async def receive_some(stream: trio.abc.Stream, fd: int, max_bytes: int) -> bytes | bytearray:
    """What ``stream.receive_some(max_bytes)`` returns (b"" at the end of
    the stream), read from ``fd`` (:func:`fd_of`) when it is >= 0."""
    if fd < 0:
        return await stream.receive_some(max_bytes)
    while (data := receive_now(fd, max_bytes)) is None:
        await trio.lowlevel.wait_readable(fd)
    return data


def send_now(fd: int, data: bytes | memoryview) -> int:
    """Write what the socket ``fd`` takes of ``data`` now: how many bytes
    (0 when ``fd`` is -1 or the socket is full); never waits."""
    if fd < 0:
        return 0
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise _mapped(exc) from exc


async def send_all(stream: trio.abc.Stream, fd: int, data: bytes | bytearray) -> None:
    """``stream.send_all(data)``, written to ``fd`` (:func:`fd_of`) when it
    is >= 0. The caller is the socket's one writer meanwhile."""
    if fd < 0:
        await stream.send_all(data)
        return
    view = memoryview(data)
    try:
        while view:
            sent = send_now(fd, view)
            if sent:
                view = view[sent:]
            else:
                await trio.lowlevel.wait_writable(fd)
    finally:
        view.release()


async def send_eof(stream: trio.abc.Stream, fd: int) -> None:
    """``stream.send_eof()`` (a half-close), without a round trip through
    the scheduler for a socket."""
    if fd < 0:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        return
    assert isinstance(stream, trio.SocketStream)
    try:
        stream.socket.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise _mapped(exc) from exc


def _mapped(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """The stream's exception for what a system call on its socket raised."""
    if exc.errno == errno.EBADF:  # closed meanwhile
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket error: {exc.strerror or type(exc).__name__}")
