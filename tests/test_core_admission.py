"""The upgrade decision (sans-IO, no trio): one row per outcome of
:meth:`Admission.decide`, then the order of its checks, which is what keeps
invalid upgrades and one user's churn from spending the others' budget.

The heads go through the real parser and the tokens through the real
verifier; the hub's load is a plain object (what the shell's ``App`` answers
about itself). tests/test_admission.py and tests/test_fairness.py hold the
same rules through real sockets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest

from smapws._core.admission import RETRY_AFTER_S, Accept, Admission, Refuse
from smapws._core.auth import AuthConfig, VerifiedTokens, mint
from smapws._core.history import Resume
from smapws._core.http import RequestHead, parse_head

KEY = "k" * 64
OTHER_KEY = "x" * 64
#: The wall clock (POSIX seconds) and the trio clock, which never agree.
WALL = 1_800_000_000.0
NOW = 500.0
AUTH = AuthConfig(algorithms=("HS256",), key=KEY, issuer="smap", audience="ws")
#: The shared budget: 10 a second, burst 10 (refilled in 1 s); each user's
#: share: 1 a second, burst 3 (its connection bound; refilled in 3 s).
RATE = 10.0
RATE_PER_USER = 1.0
MAX_PER_USER = 3
SINCE = "0123456789abcdef"
RETRY_LATER = (("Retry-After", str(RETRY_AFTER_S)),)


@dataclass
class Load:
    """The hub's state as the decision reads it, recording what was asked."""

    draining: bool = False
    full: bool = False
    held: dict[str, int] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def at_capacity(self) -> bool:
        self.asked.append("capacity")
        return self.full

    def user_at_limit(self, user_id: str) -> bool:
        self.asked.append(f"user_limit:{user_id}")
        return self.held.get(user_id, 0) >= MAX_PER_USER


def tok(user: Any = "u1", *, key: str = KEY, alg: str = "HS256", **claims: Any) -> str:
    """A token the hub accepts unless ``claims`` (None drops a claim),
    ``key`` or ``alg`` say otherwise."""
    body: dict[str, Any] = {"sub": user, "iss": "smap", "aud": "ws", "exp": WALL + 60}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg)


def head(
    cookie: str | None = None,
    *,
    query: str = "",
    version: str = "HTTP/1.1",
    drop: tuple[str, ...] = (),
    **extra: str,
) -> RequestHead:
    """A browser's upgrade, through the real parser: ``extra`` adds or
    replaces headers (``sec_websocket_version="12"``), ``drop`` removes them."""
    headers = {
        "host": "hub.example",
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version": "13",
        "origin": "http://hub.example",
    }
    if cookie is not None:
        headers["cookie"] = f"theme=dark; access_token={cookie}"
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    lines = [f"GET /ws{query} {version}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    return parse_head(("\r\n".join(lines) + "\r\n\r\n").encode())


def admission(origins: tuple[str, ...] = ()) -> Admission:
    return Admission(
        VerifiedTokens(AUTH),
        allowed_origins=origins,
        rate=RATE,
        rate_per_user=RATE_PER_USER,
        max_connections_per_user=MAX_PER_USER,
        now=NOW,
    )


def decide(
    adm: Admission,
    h: RequestHead,
    load: Load | None = None,
    *,
    key_ok: bool = True,
    now: float = NOW,
    jitter: float = 0.5,
) -> Accept | Refuse:
    return adm.decide(h, load or Load(), key_ok=key_ok, now=now, wall=WALL, jitter=jitter)


def reason(decision: Accept | Refuse) -> str | None:
    """The refusal's reason; None for an accept."""
    return decision.reason if isinstance(decision, Refuse) else None


def spend_shared(adm: Admission) -> None:
    """Accept the shared burst, one upgrade each for users who are not u1."""
    for i in range(int(RATE)):
        assert isinstance(decide(adm, head(tok(f"other{i}"))), Accept)


def spend_user(adm: Admission) -> None:
    """Accept u1's burst (3 of the shared 10)."""
    for _ in range(MAX_PER_USER):
        assert isinstance(decide(adm, head(tok())), Accept)


#: (id, the head, keyword arguments of ``decide``, a setup spending budget,
#: the expected refusal). The refusal's reason and headers are the log's and
#: the client's contract (docs/reference/endpoints.rst, logs.rst, metrics.rst).
REFUSALS: list[tuple[str, Any, dict[str, Any], Any, Refuse]] = [
    ("bad_since", lambda: head(tok(), query="?since=xyz"), {}, None, Refuse(400, "bad_since")),
    (
        "bad_since_age",
        lambda: head(tok(), query=f"?since={SINCE}&since_age=-1"),
        {},
        None,
        Refuse(400, "bad_since"),
    ),
    (
        "not_upgrade",
        lambda: head(tok(), drop=("upgrade",)),
        {},
        None,
        Refuse(426, "not_upgrade", (("Upgrade", "websocket"),)),
    ),
    (
        "not_upgrade_connection",
        lambda: head(tok(), connection="keep-alive"),
        {},
        None,
        Refuse(426, "not_upgrade", (("Upgrade", "websocket"),)),
    ),
    ("http_1_0", lambda: head(tok(), version="HTTP/1.0"), {}, None, Refuse(400, "bad_request")),
    # A body after an upgrade's head would be read as frames (review of issue 17).
    ("body_length", lambda: head(tok(), content_length="5"), {}, None, Refuse(400, "bad_request")),
    (
        "body_chunked",
        lambda: head(tok(), transfer_encoding="chunked"),
        {},
        None,
        Refuse(400, "bad_request"),
    ),
    (
        "bad_version",
        lambda: head(tok(), sec_websocket_version="8"),
        {},
        None,
        Refuse(426, "bad_version", (("Sec-WebSocket-Version", "13"),)),
    ),
    ("bad_key", lambda: head(tok()), {"key_ok": False}, None, Refuse(400, "bad_request")),
    (
        "draining",
        lambda: head(tok()),
        {"load": Load(draining=True)},
        None,
        Refuse(503, "draining", RETRY_LATER),
    ),
    (
        "capacity",
        lambda: head(tok()),
        {"load": Load(full=True)},
        None,
        Refuse(503, "capacity", RETRY_LATER),
    ),
    (
        "origin",
        lambda: head(tok(), origin="https://evil.example"),
        {},
        None,
        Refuse(403, "origin", detail=(("origin", "https://evil.example"),)),
    ),
    (
        "origin_cut_in_the_log",
        lambda: head(tok(), origin="https://" + "e" * 300),
        {},
        None,
        Refuse(403, "origin", detail=(("origin", ("https://" + "e" * 300)[:200]),)),
    ),
    (
        "origin_of_another_scheme",
        lambda: head(tok(), origin="http://hub.example", x_forwarded_proto="https"),
        {},
        None,
        Refuse(403, "origin", detail=(("origin", "http://hub.example"),)),
    ),
    ("missing_token", lambda: head(), {}, None, Refuse(401, "missing_token")),
    ("empty_cookie", lambda: head(""), {}, None, Refuse(401, "missing_token")),
    ("malformed", lambda: head("abc"), {}, None, Refuse(401, "malformed")),
    ("bad_signature", lambda: head(tok(key=OTHER_KEY)), {}, None, Refuse(401, "bad_signature")),
    ("bad_algorithm", lambda: head(tok(alg="HS512")), {}, None, Refuse(401, "bad_algorithm")),
    ("expired", lambda: head(tok(exp=WALL)), {}, None, Refuse(401, "expired")),
    ("not_yet_valid", lambda: head(tok(nbf=WALL + 30)), {}, None, Refuse(401, "not_yet_valid")),
    ("bad_issuer", lambda: head(tok(iss="other")), {}, None, Refuse(401, "bad_issuer")),
    ("bad_audience", lambda: head(tok(aud="other")), {}, None, Refuse(401, "bad_audience")),
    ("missing_claim", lambda: head(tok(exp=None)), {}, None, Refuse(401, "missing_claim")),
    ("missing_user", lambda: head(tok(None)), {}, None, Refuse(401, "missing_claim")),
    ("bad_user", lambda: head(tok("")), {}, None, Refuse(401, "bad_user")),
    (
        "query_token_refused_too",
        lambda: head(query="?token=abc"),
        {},
        None,
        Refuse(401, "malformed"),
    ),
    (
        "user_limit",
        lambda: head(tok()),
        {"load": Load(held={"u1": MAX_PER_USER})},
        None,
        Refuse(429, "user_limit", RETRY_LATER, (("user", "u1"),)),
    ),
    (
        # u1's share (burst 3, 1/s) is spent: its refill time, 3 s, spread by
        # half again: ceil(4.5).
        "user_rate_limited",
        lambda: head(tok()),
        {},
        spend_user,
        Refuse(503, "user_rate_limited", (("Retry-After", "5"),), (("user", "u1"),)),
    ),
    (
        "user_rate_limited_no_jitter",
        lambda: head(tok()),
        {"jitter": 0.0},
        spend_user,
        Refuse(503, "user_rate_limited", (("Retry-After", "3"),), (("user", "u1"),)),
    ),
    (
        # The shared budget (burst 10, 10/s) is spent: 1 s, spread: ceil(1.5).
        "rate_limited",
        lambda: head(tok()),
        {},
        spend_shared,
        Refuse(503, "rate_limited", (("Retry-After", "2"),)),
    ),
    (
        "rate_limited_most_jitter",
        lambda: head(tok()),
        {"jitter": 0.99},
        spend_shared,
        Refuse(503, "rate_limited", (("Retry-After", "2"),)),
    ),
    (
        "rate_limited_no_jitter",
        lambda: head(tok()),
        {"jitter": 0.0},
        spend_shared,
        Refuse(503, "rate_limited", (("Retry-After", "1"),)),
    ),
]


@pytest.mark.parametrize(
    ("make_head", "kwargs", "setup", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in REFUSALS],
)
def test_each_refusal(make_head: Any, kwargs: dict[str, Any], setup: Any, expected: Refuse) -> None:
    adm = admission()
    if setup is not None:
        setup(adm)
    h = make_head()
    got = decide(adm, h, **kwargs)
    assert got == expected
    # What is logged and answered holds no token: the cookie's (the header
    # is "theme=dark; access_token=<token>") nor the query's.
    crumbs = (c.strip().partition("=") for c in (h.header("cookie") or "").split(";"))
    sent = [h.query.get("token", "")] + [v for k, _, v in crumbs if k == "access_token"]
    secrets = [t for t in sent if t]
    assert secrets or expected.reason == "missing_token"
    for _, value in got.detail + got.headers:
        assert all(t not in value for t in secrets), (value, secrets)


ACCEPTS: list[tuple[str, Any, dict[str, Any], Accept]] = [
    ("cookie", lambda: head(tok()), {}, Accept("u1", WALL + 60, False, None)),
    (
        "resume",
        lambda: head(tok(), query=f"?since={SINCE}"),
        {},
        Accept("u1", WALL + 60, False, Resume(SINCE)),
    ),
    (
        "resume_with_age",
        lambda: head(tok(), query=f"?since={SINCE}&since_age=2.5"),
        {},
        Accept("u1", WALL + 60, False, Resume(SINCE, 2.5)),
    ),
    (
        "deprecated_query_token",
        lambda: head(query=f"?token={tok()}"),
        {},
        Accept("u1", WALL + 60, True, None),
    ),
    (
        "cookie_before_query_token",
        lambda: head(tok("u1"), query=f"?token={tok('u2')}"),
        {},
        Accept("u1", WALL + 60, False, None),
    ),
    (
        "no_origin_non_browser",
        lambda: head(tok(), drop=("origin",)),
        {},
        Accept("u1", WALL + 60, False, None),
    ),
    (
        "https_origin_behind_tls",
        lambda: head(tok(), origin="https://hub.example", x_forwarded_proto="https"),
        {},
        Accept("u1", WALL + 60, False, None),
    ),
    (
        "connection_token_list",
        lambda: head(tok(), connection="keep-alive, Upgrade", upgrade="WebSocket"),
        {},
        Accept("u1", WALL + 60, False, None),
    ),
    (
        "integer_user",
        lambda: head(tok(42)),
        {},
        Accept("42", WALL + 60, False, None),
    ),
    (
        "user_below_limit",
        lambda: head(tok()),
        {"load": Load(held={"u1": MAX_PER_USER - 1, "u2": MAX_PER_USER})},
        Accept("u1", WALL + 60, False, None),
    ),
]


@pytest.mark.parametrize(
    ("make_head", "kwargs", "expected"), [pytest.param(*row[1:], id=row[0]) for row in ACCEPTS]
)
def test_each_accept(make_head: Any, kwargs: dict[str, Any], expected: Accept) -> None:
    assert decide(admission(), make_head(), **kwargs) == expected


def test_a_listed_origin_is_accepted_and_others_refused() -> None:
    adm = admission(("https://app.example", "https://*.corp.example"))
    for origin in ("https://app.example", "https://a.corp.example"):
        assert isinstance(decide(adm, head(tok(), origin=origin)), Accept)
    assert decide(adm, head(tok(), origin="http://hub.example")) == Refuse(
        403, "origin", detail=(("origin", "http://hub.example"),)
    )


# -- the order -----------------------------------------------------------------


def test_the_checks_run_in_the_documented_order() -> None:
    """A head wrong in every way is refused for the first thing in the
    module's table; fixing each in turn gives the next."""
    load = Load(draining=True, full=True, held={"u1": MAX_PER_USER})
    adm = admission()
    steps: list[tuple[dict[str, Any], str]] = [
        ({"query": "?since=x", "version": "HTTP/1.0", "sec_websocket_version": "8"}, "bad_since"),
        ({"version": "HTTP/1.0", "sec_websocket_version": "8", "upgrade": "h2c"}, "not_upgrade"),
        ({"version": "HTTP/1.0", "sec_websocket_version": "8"}, "bad_request"),
        ({"sec_websocket_version": "8"}, "bad_version"),
        ({}, "bad_request"),  # the key
    ]
    for fields, reason in steps:
        cookie = tok(exp=WALL)
        got = decide(adm, head(cookie, origin="https://evil.example", **fields), load, key_ok=False)
        assert isinstance(got, Refuse) and got.reason == reason, fields
    assert load.asked == []  # the hub's state is not read for a bad request
    rest = [
        ("draining", lambda: setattr(load, "draining", False)),
        ("capacity", lambda: setattr(load, "full", False)),
        ("origin", None),
        ("expired", None),
        ("user_limit", None),
    ]
    origin, cookie = "https://evil.example", tok(exp=WALL)
    for reason, fix in rest:
        got = decide(adm, head(cookie, origin=origin), load)
        assert isinstance(got, Refuse) and got.reason == reason
        if fix is not None:
            fix()
        elif reason == "origin":
            origin = "http://hub.example"
        elif reason == "expired":
            cookie = tok()
    load.held.clear()
    assert isinstance(decide(adm, head(cookie, origin=origin), load), Accept)


def test_invalid_upgrades_never_spend_the_budget() -> None:
    """Upgrades refused for the request, the hub's state, the Origin, the
    token or the user's limit leave both buckets full: the burst still
    admits that many valid users at once."""
    adm = admission()
    invalid: list[tuple[RequestHead, Load]] = [
        (head("garbage"), Load()),
        (head(tok(key=OTHER_KEY)), Load()),
        (head(tok(exp=WALL)), Load()),
        (head(), Load()),
        (head(tok(), origin="https://evil.example"), Load()),
        (head(tok(), query="?since=nope"), Load()),
        (head(tok(), drop=("upgrade",)), Load()),
        (head(tok()), Load(draining=True)),
        (head(tok()), Load(full=True)),
        (head(tok()), Load(held={"u1": MAX_PER_USER})),
    ]
    for _ in range(20):
        for h, load in invalid:
            assert isinstance(decide(adm, h, load), Refuse)
    for i in range(int(RATE)):
        assert isinstance(decide(adm, head(tok(f"user{i}"))), Accept)
    assert reason(decide(adm, head(tok("late")))) == "rate_limited"


def test_an_invalid_token_never_spends_the_users_share() -> None:
    """A user whose tab retries with an expired token keeps its whole share
    for the fresh one."""
    adm = admission()
    for _ in range(50):
        assert decide(adm, head(tok(exp=WALL))) == Refuse(401, "expired")
    for i in range(MAX_PER_USER):
        assert isinstance(decide(adm, head(tok()), now=NOW + 10 * i), Accept)


def test_a_users_churn_spends_only_that_users_share() -> None:
    """One user reconnecting as fast as it can gets its burst (3), then is
    refused at its own share, which asks nothing of the shared bucket: the
    other users still get all of the shared burst the three left (7), and
    the user gets in again once its share has refilled one (1 s)."""
    adm = admission()
    got = [reason(decide(adm, head(tok("churn")))) for _ in range(100)]
    assert got == [None] * MAX_PER_USER + ["user_rate_limited"] * (100 - MAX_PER_USER)
    others = [reason(decide(adm, head(tok(f"other{i}")))) for i in range(int(RATE))]
    assert others == [None] * (int(RATE) - MAX_PER_USER) + ["rate_limited"] * MAX_PER_USER
    assert reason(decide(adm, head(tok("churn")), now=NOW + 1 / RATE_PER_USER)) is None


def test_a_user_refused_by_the_shared_bucket_has_spent_its_share() -> None:
    """The user's share is taken before the shared bucket is asked (so the
    user's churn is refused at its share first); the price is that a user
    refused by the shared bucket has used one of its own tokens."""
    adm = admission()
    spend_shared(adm)
    got = [reason(decide(adm, head(tok()))) for _ in range(MAX_PER_USER + 1)]
    assert got == ["rate_limited"] * MAX_PER_USER + ["user_rate_limited"]


def test_unlimited_rates_never_refuse_for_rate() -> None:
    adm = Admission(
        VerifiedTokens(AUTH),
        allowed_origins=(),
        rate=0,
        rate_per_user=0,
        max_connections_per_user=MAX_PER_USER,
        now=NOW,
    )
    for _ in range(200):
        assert isinstance(decide(adm, head(tok())), Accept)


def test_the_token_is_read_at_the_wall_time_given() -> None:
    """Expiry is judged on ``wall`` (POSIX seconds), not on the trio clock
    the buckets run on."""
    adm = admission()
    cookie = mint("u1", key=KEY, now=WALL, ttl=60, extra={"iss": "smap", "aud": "ws"})
    h = head(cookie)
    ok = adm.decide(h, Load(), key_ok=True, now=NOW, wall=WALL + 59, jitter=0.0)
    assert ok == Accept("u1", WALL + 60, False, None)
    late = adm.decide(h, Load(), key_ok=True, now=NOW + 1, wall=WALL + 60, jitter=0.0)
    assert late == Refuse(401, "expired")
