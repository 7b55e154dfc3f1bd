"""The upgrade decision: a ``GET /ws`` request head in, :class:`Accept` or
:class:`Refuse` out (sans-IO: the clocks, the jitter and the hub's load are
arguments; no socket, no clock read, no random draw).

The checks run in this order, each refusal with its status and the reason
that names it in the log line and in ``connections_rejected{reason}``:

1. 400 ``bad_since``: ``?since=`` is not an id or ``since_age`` not an age;
2. 426 ``not_upgrade``: no ``Upgrade: websocket`` with ``Connection: upgrade``;
3. 400 ``bad_request``: not HTTP/1.1, or with a body (a ``Transfer-Encoding``,
   or a ``Content-Length`` other than 0): an upgrade has none, and the bytes
   after its head would be read as WebSocket frames (a smuggling shape);
4. 426 ``bad_version``: not ``Sec-WebSocket-Version: 13``;
5. 400 ``bad_request``: the ``Sec-WebSocket-Key`` is not a 16-byte nonce;
6. 503 ``draining`` (``Retry-After: 5``): the hub is draining;
7. 503 ``capacity`` (``Retry-After: 5``): ``SMAPWS_MAX_CONNECTIONS`` reached;
8. 403 ``origin``: the ``Origin`` is not allowed (the log names it);
9. 401 with the :class:`~smapws._core.auth.AuthError` reason
   (``missing_token``, ``malformed``, ``expired``...): the token;
10. 429 ``user_limit`` (``Retry-After: 5``): the user holds
    ``SMAPWS_MAX_CONNECTIONS_PER_USER`` connections;
11. 503 ``user_rate_limited``: the user's share of the accept rate is spent
    (``Retry-After``: its bucket's refill time, spread by the jitter);
12. 503 ``rate_limited``: the shared accept rate is spent (idem).

The order is the contract: the request itself first, then what costs
nothing (draining, capacity), then Origin and token, and only then the
accept-rate budgets, so that only upgrades that would be served spend them
(a flood of invalid ones is refused under its own reasons and cannot starve
valid users); the user's share before the shared one, so that one user's
churn, refused at its share, spends none of the budget the others need.

The method and the path are the router's (a ``/ws`` that is not ``GET`` is
405 ``bad_method`` before this is asked), as is everything before the head
is parsed (408, 431, ``address_limit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

from smapws._core.auth import AuthError, VerifiedTokens
from smapws._core.history import Resume, parse_resume
from smapws._core.http import RequestHead, origin_allowed, parse_cookies, request_scheme
from smapws._core.ratelimit import KeyedBuckets, TokenBucket

#: Seconds a client refused for the hub's state (draining, capacity, its
#: connection limit) is told to wait, so reconnect storms spread.
RETRY_AFTER_S: Final = 5
#: Longest refused ``Origin`` written in the log line.
ORIGIN_LOG_CHARS: Final = 200

Headers: TypeAlias = tuple[tuple[str, str], ...]

_RETRY_LATER: Final[Headers] = (("Retry-After", str(RETRY_AFTER_S)),)


class HubLoad(Protocol):
    """What the decision reads of the hub's state (the shell's ``App`` is
    one). Read lazily, in the order above: a refused request asks no more."""

    @property
    def draining(self) -> bool: ...

    def at_capacity(self) -> bool:
        """Whether open plus upgrading connections reach the bound."""
        ...

    def user_at_limit(self, user_id: str) -> bool:
        """Whether ``user_id`` holds its bound of connections, open or
        upgrading."""
        ...


@dataclass(frozen=True, slots=True)
class Accept:
    """An upgrade to serve: whose it is, its token's expiry (POSIX seconds),
    whether the deprecated ``?token=`` carried it, and what the tab saw last."""

    user_id: str
    expires_at: float
    query_token_used: bool
    resume: Resume | None


@dataclass(frozen=True, slots=True)
class Refuse:
    """An upgrade refused before the 101: answer ``status`` with ``headers``;
    log and count ``reason``. ``detail`` holds more fields for the log line
    (the refused origin, the user id), never a token or a cookie."""

    status: int
    reason: str
    headers: Headers = ()
    detail: tuple[tuple[str, str], ...] = ()


Decision: TypeAlias = Accept | Refuse

_NOT_UPGRADE: Final = Refuse(426, "not_upgrade", (("Upgrade", "websocket"),))
_BAD_REQUEST: Final = Refuse(400, "bad_request")
_BAD_SINCE: Final = Refuse(400, "bad_since")
_BAD_VERSION: Final = Refuse(426, "bad_version", (("Sec-WebSocket-Version", "13"),))
_DRAINING: Final = Refuse(503, "draining", _RETRY_LATER)
_CAPACITY: Final = Refuse(503, "capacity", _RETRY_LATER)


def _has_body(head: RequestHead) -> bool:
    """Whether the head announces a body (RFC 9112 §6.3)."""
    if head.header("transfer-encoding") is not None:
        return True
    length = head.header("content-length")
    return length is not None and length.strip() != "0"


class Admission:
    """The upgrade decision of one hub, with what it keeps between requests:
    the verified-token memory and the accept-rate buckets (the shared one,
    ``rate`` a second with as much burst, and each user's share,
    ``rate_per_user`` a second with a burst of as many as the user may hold,
    a browser restoring every tab at once). A rate ``<= 0`` is unlimited."""

    __slots__ = ("accept_bucket", "allowed_origins", "tokens", "user_buckets")

    def __init__(
        self,
        tokens: VerifiedTokens,
        *,
        allowed_origins: tuple[str, ...],
        rate: float,
        rate_per_user: float,
        max_connections_per_user: int,
        now: float,
    ) -> None:
        self.tokens = tokens
        self.allowed_origins = allowed_origins
        self.accept_bucket = TokenBucket(rate, rate, now=now)
        self.user_buckets = KeyedBuckets(
            rate_per_user, max(rate_per_user, max_connections_per_user)
        )

    def decide(
        self,
        head: RequestHead,
        load: HubLoad,
        *,
        key_ok: bool,
        now: float,
        wall: float,
        jitter: float,
    ) -> Decision:
        """Judge one upgrade, in the order of the module's table.

        ``key_ok``: whether the head's ``Sec-WebSocket-Key`` is a valid nonce
        (the WebSocket layer's judgement); ``now``: the trio clock, for the
        buckets; ``wall``: POSIX seconds, for the token; ``jitter`` in [0, 1):
        spreads a bucket's ``Retry-After``. A bucket is spent only by an
        upgrade that is accepted or refused at that bucket. Raises nothing."""
        try:
            resume = parse_resume(head.query)
        except ValueError:
            return _BAD_SINCE
        upgrade = (head.header("upgrade") or "").lower()
        if upgrade != "websocket" or not head.has_token("connection", "upgrade"):
            return _NOT_UPGRADE
        if head.version != "HTTP/1.1" or _has_body(head):
            return _BAD_REQUEST
        if head.header("sec-websocket-version") != "13":
            return _BAD_VERSION
        if not key_ok:
            return _BAD_REQUEST
        if load.draining:
            return _DRAINING
        if load.at_capacity():
            return _CAPACITY
        origin = head.header("origin")
        if not origin_allowed(
            origin, head.header("host"), self.allowed_origins, request_scheme(head)
        ):
            return Refuse(403, "origin", detail=(("origin", (origin or "")[:ORIGIN_LOG_CHARS]),))
        token = parse_cookies(head.header("cookie")).get("access_token")
        query_used = False
        if not token:
            token = head.query.get("token")
            query_used = bool(token)
        try:
            claims = self.tokens.verify(token or "", now=wall)
        except AuthError as exc:
            return Refuse(401, exc.reason)
        user = claims.user_id
        if load.user_at_limit(user):
            return Refuse(429, "user_limit", _RETRY_LATER, (("user", user),))
        if not self.user_buckets.take(user, now):
            wait = self.user_buckets.retry_after(jitter)
            headers = (("Retry-After", str(wait)),)
            return Refuse(503, "user_rate_limited", headers, (("user", user),))
        if not self.accept_bucket.take(now):
            wait = self.accept_bucket.retry_after(jitter)
            return Refuse(503, "rate_limited", (("Retry-After", str(wait)),))
        return Accept(user, claims.expires_at, query_used, resume)
