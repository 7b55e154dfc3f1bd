"""What publishers send: the seed's message rules, checked as the hub checks them.

Sans-IO: these functions build and check bytes; :mod:`smapws_publisher` does
the I/O. A message that leaves here is one the hub delivers: it went through
:func:`~smapws_publisher._validate.check_message`, the check the hub's own
parser (``smapws._core.envelope.parse``) applies.

The seed's rules (``websocket-service-integration-guide.md``, Project service):

- channel ``{prefix}{user_id}`` (prefix ``user_noti:``);
- ``project_progress`` / ``project_completed`` carry ``project_id, status,
  total, done, errors, progress_percent`` with ``progress_percent = done /
  total * 100`` (a float; 0 when ``total`` is 0), and the type is
  ``project_completed`` exactly when ``status`` is ``DONE`` or ``FAILED``;
- ``notification`` carries ``title, message, level``; ``alert`` carries
  ``title, message, severity``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from smapws_publisher._validate import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_USER_ID_LENGTH,
    InvalidMessage,
    check_message,
    valid_user_id,
)

#: Statuses after which a project is finished (the seed's Go code compares
#: them exactly, so ``"done"`` is a progress status, as it is there).
FINAL_STATUSES: Final = frozenset({"DONE", "FAILED"})


def user_key(user_id: str | int) -> str:
    """The user id as the hub knows it (a token's ``sub``): a
    :func:`~smapws_publisher._validate.valid_user_id` (1-256 characters, no control
    character), or an integer. Raises :class:`ValueError` otherwise: no tab
    could ever be connected under such an id."""
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        return str(user_id)
    if not valid_user_id(user_id):
        raise ValueError(
            f"user_id: expected 1-{MAX_USER_ID_LENGTH} characters, none a control character"
        )
    return user_id


def channel(prefix: str, user_id: str | int) -> bytes:
    """The channel the hub reads ``user_id``'s messages from. Raises
    :class:`ValueError` for an id the hub could never serve."""
    return (prefix + user_key(user_id)).encode("utf-8")


def _count(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    return value


def _text(name: str, value: object, *, empty: bool = False) -> str:
    if not isinstance(value, str) or not (value or empty):
        raise ValueError(f"{name}: expected a {'' if empty else 'non-empty '}string")
    return value


def progress_message(
    *, project_id: str, status: str, total: int, done: int, errors: int
) -> tuple[str, dict[str, Any]]:
    """``(type, payload)`` of a Project-service progress callback, by the
    seed's rule. ``done`` above ``total`` is passed on as it is (the seed does
    not clamp either). Raises :class:`ValueError` for a missing id or status
    and for counts that are not integers >= 0."""
    _text("project_id", project_id)
    _text("status", status)
    total, done, errors = _count("total", total), _count("done", done), _count("errors", errors)
    percent = done / total * 100 if total > 0 else 0.0
    mtype = "project_completed" if status in FINAL_STATUSES else "project_progress"
    return mtype, {
        "project_id": project_id,
        "status": status,
        "total": total,
        "done": done,
        "errors": errors,
        "progress_percent": percent,
    }


def _titled(
    title: str, message: str, kind: str, value: str, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    payload = {
        "title": _text("title", title),
        "message": _text("message", message, empty=True),
        kind: _text(kind, value),
    }
    if extra:
        clash = sorted(set(extra) & set(payload))
        if clash:
            raise ValueError(f"extra: must not replace the seed's field {clash[0]!r}")
        payload.update(extra)
    return payload


def notification_payload(
    title: str, message: str, level: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The seed's ``notification`` payload (``title, message, level``), plus
    any ``extra`` fields. Raises :class:`ValueError` for an empty title or
    level, or an ``extra`` field that would replace one of the three."""
    return _titled(title, message, "level", level, extra)


def alert_payload(
    title: str, message: str, severity: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The seed's ``alert`` payload (``title, message, severity``), plus any
    ``extra`` fields; raises as :func:`notification_payload` does."""
    return _titled(title, message, "severity", severity, extra)


def encode(
    mtype: str, payload: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> bytes:
    """The broker message ``{"type": ..., "payload": ...}`` as compact UTF-8
    JSON, accepted by the hub's parser under ``max_bytes``.

    Raises :class:`InvalidMessage` (a :class:`ValueError`; ``reason`` as the
    hub counts it) for whatever the hub would drop, and :class:`TypeError` for
    a value JSON cannot hold. Nothing is filtered here beyond what
    :func:`~smapws_publisher._validate.check_message` decides: a lone surrogate is kept
    as is (``surrogatepass``) so that the parser refuses it.
    """
    if not isinstance(payload, Mapping):
        raise InvalidMessage("bad_payload", "payload must be a mapping")
    text = json.dumps(
        {"type": mtype, "payload": dict(payload)}, separators=(",", ":"), ensure_ascii=False
    )
    data = text.encode("utf-8", "surrogatepass")
    check_message(data, max_bytes=max_bytes)
    return data


def api_body(user_id: str | int, data: bytes) -> bytes:
    """The body of ``POST /api/publish`` for an already :func:`encode`\\ d
    message (kept byte for byte)."""
    user = json.dumps(user_key(user_id), ensure_ascii=False).encode("utf-8")
    return b'{"user_id":' + user + b',"message":' + data + b"}"


def api_result(status: int, body: bytes) -> tuple[int | None, str]:
    """Read the publish API's answer: ``(hubs, "")`` for ``202`` (``hubs``,
    or ``receivers`` from a hub before the rename), else
    ``(None, reason)`` with the hub's ``error`` word (``HTTP 401 bad_api_key``)
    or the start of an unexpected body, on one line."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if status == 202 and isinstance(obj, dict):
        hubs = obj.get("hubs", obj.get("receivers"))
        if isinstance(hubs, int):
            return hubs, ""
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        detail = obj["error"]
    else:
        detail = body[:100].decode("utf-8", "replace").strip()
        # A plain body that repeats the status line ("404 Not Found") once.
        detail = detail.removeprefix(f"{status} ")
    return None, one_line(f"HTTP {status} {detail}".strip())


#: What to do about each refusal of the publish API, by its ``error`` word.
_API_HINTS: Final = {
    "bad_api_key": "SMAPWS_API_KEY here is not the hub's",
    "publish_api_disabled": "the hub has no SMAPWS_API_KEY: set one there (the same here)",
    "broker_unavailable": "the hub cannot reach Redis; its /ready says since when",
    "too_large": "the message is larger than the hub's SMAPWS_MAX_MESSAGE_BYTES",
}


def api_hint(status: int, reason: str) -> str:
    """What to do about the refusal ``(status, reason)`` that
    :func:`api_result` returned, or ``""``. A 404 that is not the hub's
    own word means the address serves no publish API: with
    ``SMAPWS_INTERNAL_PORT`` set, a hub serves it on that port alone."""
    word = reason.rsplit(" ", 1)[-1]
    if word in _API_HINTS:
        return _API_HINTS[word]
    if status == 404:
        return (
            "no publish API at this address; a hub with SMAPWS_INTERNAL_PORT serves "
            "/api/publish only on that port: set SMAPWS_INTERNAL_PORT here to the hub's, "
            "or give that port's URL (--url)"
        )
    return ""


def one_line(text: str, limit: int = 200) -> str:
    """``text`` with runs of whitespace (newlines too) made one space, cut to ``limit``."""
    return " ".join(text.split())[:limit]


#: A ``password`` query argument's value (redis-py sends it as the password).
_QUERY_PASSWORD: Final = re.compile(r"([?&]password=)[^&#]*")


def authority_end(rest: str) -> int:
    """Where the authority of ``rest`` (a URL after its ``scheme://``) ends:
    at its first ``/``, ``?`` or ``#``, as urllib and redis-py read it (so
    one unescaped in a password ends it early), else at its end."""
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    return min(ends) if ends else len(rest)


def redact_url(url: str) -> str:
    """``url`` with every password redis-py would send replaced by ``***``
    (safe to log): the userinfo's, and a ``password`` query argument's.

    Read as text, not with :func:`~urllib.parse.urlsplit`, which raises for
    a port that is no number (with that text in its message) and ends the
    authority at the first ``/``, ``?`` or ``#``: a password holding one
    unescaped (``openssl rand -base64`` writes ``/``) was then no password,
    and the URL was shown whole. An ``@`` after that point hides everything
    between ``//`` and it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _QUERY_PASSWORD.sub(r"\1***", url)
    at = rest.rfind("@")
    if at >= authority_end(rest):
        rest = "***@" + rest[at + 1 :]
    elif at >= 0:
        user, colon, _ = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    return scheme + "://" + _QUERY_PASSWORD.sub(r"\1***", rest)
