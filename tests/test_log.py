"""Log hygiene (issue 8): one record is one line, whatever it carries."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smapws import _log
from smapws._log import RateLimitedLog, fields, logger

from .conftest import SECRET, token


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """Tests here reconfigure the smapws logger; put it back afterwards."""
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def _emit(fmt: str, emit: object) -> str:
    """What ``emit()`` logs, as ``smapws serve`` would write it in ``fmt``."""
    buf = io.StringIO()
    _log.configure("debug", fmt)
    logger.handlers[0].stream = buf  # type: ignore[attr-defined]
    emit()  # type: ignore[operator]
    return buf.getvalue()


NASTY = 'u1\r\nts=forged level=info msg="x"\x1b[31mred\x00nul\u2028ls\x85nel\ud800'


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_control_characters_never_break_a_line(fmt: str) -> None:
    out = _emit(fmt, lambda: logger.info("connection rejected", extra=fields(user=NASTY)))
    assert out.count("\n") == 1 and out.endswith("\n")
    line = out[:-1]
    for raw in ("\r", "\x1b", "\x00", "\u2028", "\x85"):
        assert raw not in line
    if fmt == "json":
        assert json.loads(line)["user"] == NASTY
    else:
        # The value is a JSON string: it reads back exactly.
        value = line.split(" user=", 1)[1]
        assert json.loads(value) == NASTY


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_exception_is_one_record_with_its_traceback(fmt: str) -> None:
    def emit() -> None:
        try:
            raise ValueError("boom with a token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl")
        except ValueError as exc:
            logger.error("internal error", exc_info=exc, extra=fields(where="route"))

    out = _emit(fmt, emit)
    assert out.count("\n") == 1
    assert "eyJ" not in out
    if fmt == "json":
        record = json.loads(out)
        assert record["exc"].startswith("Traceback (most recent call last):")
        assert "ValueError: boom" in record["exc"]
        assert record["where"] == "route"
    else:
        assert ' exc="Traceback (most recent call last):\\n' in out


@given(st.text())
def test_any_text_value_is_one_line_and_reads_back(value: str) -> None:
    rendered = _log._quote(value)
    assert "\n" not in rendered and "\r" not in rendered
    assert not any(0x80 <= ord(c) <= 0x9F or ord(c) < 0x20 for c in rendered)
    back = json.loads(rendered) if rendered.startswith('"') and rendered != value else rendered
    assert back == value


def test_rate_limited_log_counts_what_it_suppresses() -> None:
    log = RateLimitedLog(1.0)
    assert log.allow("a", 0.0) == 0
    assert log.allow("a", 0.5) is None
    assert log.allow("a", 0.9) is None
    assert log.allow("b", 0.9) == 0  # per key
    assert log.allow("a", 1.0) == 2
    assert log.allow("a", 1.5) is None


def test_serve_on_a_busy_port_is_one_line_and_exit_1() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for host, expect in (
            ("127.0.0.1", f"smapws: cannot listen on 127.0.0.1:{port}: "),
            ("no-such-host.invalid", f"smapws: cannot listen on no-such-host.invalid:{port}: "),
        ):
            proc = subprocess.run(
                [sys.executable, "-m", "smapws", "serve", "--host", host, "--port", str(port)],
                env={"JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 1, proc.stderr
            lines = proc.stderr.splitlines()
            assert len(lines) == 1, proc.stderr
            assert lines[0].startswith(expect), lines


def test_no_token_in_a_log_line_even_when_a_call_site_passes_one() -> None:
    tok = token("u1")
    for fmt in ("text", "json"):
        out = _emit(fmt, lambda: logger.info("x", extra=fields(access_token=tok, note=tok)))
        assert tok not in out
        # The record is written, each field there and redacted (a line
        # dropped whole would hold no token either).
        assert out.count("\n") == 1, out
        if fmt == "json":
            record = json.loads(out)
            assert (record["access_token"], record["note"]) == ("[redacted]", "[redacted]")
        else:
            assert " access_token=[redacted] note=[redacted]" in out
