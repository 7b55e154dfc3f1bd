"""One line per event, as ``key=value`` text or JSON (``SMAPWS_LOG_FORMAT``).

Call sites pass fixed, greppable event words as the message (``connection
rejected``, ``Redis connected``, ``Routed message``) and data as fields::

    log.info("connection rejected", extra=fields(reason="expired", remote=peer))

Nothing here knows about tokens: call sites never pass one. The formatter
also refuses to print any field whose name looks like a secret.

Every record is one line, whatever it carries: in the text format, control
characters (CR, LF, ESC, NUL, ...) in any value are escaped, so a user id or
a channel cannot forge a line or a terminal sequence; an exception is one
record with its traceback in the ``exc`` field (escaped in text, a string in
JSON).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from typing import Any, Final

logger: Final = logging.getLogger("smapws")

_SECRET_WORDS: Final = ("token", "cookie", "secret", "password", "authorization", "key")


def fields(**kv: Any) -> dict[str, Any]:
    """The ``extra`` mapping for a log call."""
    return {"smapws_fields": kv}


#: Anything shaped like a JWT (three base64url parts, the first a JSON
#: object): redacted wherever it appears, exception texts included.
_JWT: Final = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*")


def _safe(name: str, value: Any) -> Any:
    low = name.lower()
    if any(w in low for w in _SECRET_WORDS) and not low.endswith(("_used", "_source")):
        return "[redacted]"
    if isinstance(value, str) and "eyJ" in value:
        return _JWT.sub("[redacted]", value)
    return value


#: What forces a text value into quotes: separators, quotes, backslashes and
#: every C0/C1 control character, DEL and the Unicode line separators.
_NEEDS_QUOTES: Final = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f\u2028\u2029]')


def _quote(v: Any) -> str:
    s = str(v)
    if s == "" or _NEEDS_QUOTES.search(s):
        # JSON string escaping: \n, \r, \u001b, \u0000 ... and, with
        # ensure_ascii, lone surrogates as \udXXX rather than an encoding error.
        return json.dumps(s)
    return s


class RateLimitedLog:
    """At most one record per key per ``interval`` seconds; the rest are
    counted and the count is given to the next record that is let through.

    Time is what the caller passes (``trio.current_time()`` in the hub)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def allow(self, key: str, now: float) -> int | None:
        """``None`` to suppress this record, else how many records of
        ``key`` were suppressed since the last one allowed."""
        last, suppressed = self._last.get(key, (-1e18, 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return None
        self._last[key] = (now, 0)
        return suppressed


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool, context: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.as_json = as_json
        self.context = context or {}

    def format(self, record: logging.LogRecord) -> str:
        kv: dict[str, Any] = getattr(record, "smapws_fields", {})
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        data: dict[str, Any] = {
            "ts": ts,
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            **self.context,
        }
        data.update((k, _safe(k, v)) for k, v in kv.items())
        if record.exc_info and record.exc_info[0] is not None:
            error = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
            exc = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            data["error"] = _JWT.sub("[redacted]", error)
            data["exc"] = _JWT.sub("[redacted]", exc)
        if self.as_json:
            return json.dumps(data, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in data.items())


def configure(
    level: str = "info", fmt: str = "text", context: dict[str, Any] | None = None
) -> None:
    """Send smapws's log lines to stderr in ``fmt`` at ``level``; each line
    carries the fields of ``context`` after its message (``worker=2`` in
    the workers of a group)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt == "json", context))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
