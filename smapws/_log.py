"""One line per event, as ``key=value`` text or JSON (``SMAPWS_LOG_FORMAT``).

Call sites pass fixed, greppable event words as the message (``connection
rejected``, ``Redis connected``, ``Routed message``) and data as fields::

    log.info("connection rejected", extra=fields(reason="expired", remote=peer))

Nothing here knows about tokens: call sites never pass one. The formatter
also refuses to print any field whose name looks like a secret.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final

logger: Final = logging.getLogger("smapws")

_SECRET_WORDS: Final = ("token", "cookie", "secret", "password", "authorization", "key")


def fields(**kv: Any) -> dict[str, Any]:
    """The ``extra`` mapping for a log call."""
    return {"smapws_fields": kv}


def _safe(name: str, value: Any) -> Any:
    low = name.lower()
    if any(w in low for w in _SECRET_WORDS) and not low.endswith(("_used", "_source")):
        return "[redacted]"
    return value


def _quote(v: Any) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return json.dumps(s)
    return s


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        kv: dict[str, Any] = getattr(record, "smapws_fields", {})
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        data: dict[str, Any] = {
            "ts": ts,
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        data.update((k, _safe(k, v)) for k, v in kv.items())
        if record.exc_info and record.exc_info[0] is not None:
            data["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        if self.as_json:
            return json.dumps(data, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in data.items())


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send smapws's log lines to stderr in ``fmt`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt == "json"))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
