"""JWT verification: a token string in, :class:`Claims` or :class:`AuthError` out.

Sans-IO: the caller passes ``now`` (POSIX seconds); PyJWT's own clock checks
are switched off and done here, so that tests decide the time.

Error messages and reasons never contain the token or the key.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, Final

import jwt

from smapws._errors import SmapwsError
from smapws_publisher._validate import MAX_USER_ID_LENGTH as MAX_USER_ID_LENGTH
from smapws_publisher._validate import valid_user_id as valid_user_id

#: Symmetric (MAC) algorithms; never accepted together with public-key ones,
#: so a public key can never be abused as an HMAC secret.
MAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class _KeyPreparedOnce(jwt.algorithms.Algorithm):
    """One of PyJWT's algorithms, remembering the key it prepared last.

    PyJWT prepares the key on every verification: for an HMAC secret that
    is a JSON parse and three format checks of the secret (is it PEM, an
    SSH key, DER: refused then, so that a public key is never an HMAC
    secret), a third of what a verification cost (28.4 against 19.2 us per
    HS256 token). The hub verifies with one key for its life, so the
    preparation of the same key object is reused; any other key object is
    prepared, and checked, in full. The rest is PyJWT's own."""

    def __init__(self, inner: jwt.algorithms.Algorithm) -> None:
        self._inner = inner
        self._last: tuple[object, Any] = (None, None)

    def prepare_key(self, key: Any) -> Any:
        last, prepared = self._last
        if key is last and key is not None:
            return prepared
        prepared = self._inner.prepare_key(key)
        self._last = (key, prepared)
        return prepared

    def sign(self, msg: bytes, key: Any) -> bytes:
        return self._inner.sign(msg, key)

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:
        return self._inner.verify(msg, key, sig)

    def check_key_length(self, key: Any) -> str | None:
        return self._inner.check_key_length(key)

    def check_crypto_key_type(self, key: Any) -> None:
        self._inner.check_crypto_key_type(key)

    def compute_hash_digest(self, bytestr: bytes) -> bytes:
        return self._inner.compute_hash_digest(bytestr)

    def to_jwk(self, key_obj: Any, as_dict: bool = False) -> Any:  # type: ignore[override]
        return self._inner.to_jwk(key_obj, as_dict)  # type: ignore[call-overload]

    def from_jwk(self, jwk: Any) -> Any:  # type: ignore[override]
        return self._inner.from_jwk(jwk)

    def __getattr__(self, name: str) -> Any:
        # Only what is not found on the wrapper comes here; a copy made
        # without __init__ (copy.copy, pickle) asks for _inner before it has
        # one, which must fail, not recurse.
        if name in ("_inner", "_last"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def _prepare_keys_once() -> None:
    """Put :class:`_KeyPreparedOnce` around each algorithm the hub accepts,
    in PyJWT's own registry (its public ``register_algorithm``): what
    ``jwt.decode`` and ``jwt.encode`` use. Algorithms PyJWT cannot run here
    (public-key ones without ``cryptography``) are left as they are."""
    for name in sorted(MAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS):
        try:
            inner = jwt.get_algorithm_by_name(name)
        except NotImplementedError:
            continue
        if not isinstance(inner, _KeyPreparedOnce):
            jwt.unregister_algorithm(name)
            jwt.register_algorithm(name, _KeyPreparedOnce(inner))


_prepare_keys_once()


def usable_key(algorithms: tuple[str, ...], key: str | bytes) -> bool:
    """Whether PyJWT takes ``key`` for each of ``algorithms`` (it refuses,
    at every verification, an HMAC secret that reads as a public key, a
    certificate, an SSH key or a JWK, and a public key it cannot load): for
    the configuration to say so at start-up, not each upgrade. Any
    exception is a no: the key loaders raise more than PyJWT's own (e.g.
    cryptography's ``UnsupportedAlgorithm`` for an EC key on a curve it
    does not know)."""
    for name in algorithms:
        try:
            jwt.get_algorithm_by_name(name).prepare_key(key)
        except Exception:
            return False
    return True


class AuthError(SmapwsError):
    """A token was refused. ``reason`` is a short fixed word (a metric label):
    ``missing_token``, ``malformed``, ``bad_signature``, ``bad_algorithm``,
    ``expired``, ``not_yet_valid``, ``bad_issuer``, ``bad_audience``,
    ``missing_claim``, ``bad_user``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """What a valid token looks like. ``key`` is the HMAC secret or the PEM
    public key; it is kept out of ``repr``."""

    algorithms: tuple[str, ...]
    key: str | bytes = field(repr=False)
    issuer: str | None = None
    audience: str | None = None
    user_claim: str = "sub"
    leeway: float = 0.0


@dataclass(frozen=True, slots=True)
class Claims:
    """The parts of a verified token the hub uses."""

    user_id: str
    expires_at: float


def verify(token: str, config: AuthConfig, *, now: float) -> Claims:
    """Verify ``token`` against ``config`` at time ``now``.

    Guarantees: the signature is valid for one of ``config.algorithms`` (the
    header's ``alg`` is never trusted beyond that list); ``exp`` is present, a
    finite number and in the future (``nbf`` respected when present, and
    finite too); ``iss``/``aud`` match when configured; the user id
    (``config.user_claim``, falling back to ``user_id``) is a
    :func:`valid_user_id`, or an integer (taken as its decimal string).

    Raises :class:`AuthError`.
    """
    if not token:
        raise AuthError("missing_token")
    options: Any = {
        "require": ["exp"],
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_aud": config.audience is not None,
        # PyJWT (>= 2.10) refuses a non-string ``sub``; the user claim is
        # checked below instead, where an integer id is accepted as its
        # decimal string (backends with numeric user ids mint such tokens).
        "verify_sub": False,
        "verify_iss": config.issuer is not None,
    }
    # The causes are not chained (``from None``): PyJWT's messages may quote
    # the token's decoded header or payload ("Invalid header string: ..."),
    # and its traceback's frames hold the token and the key. The reason is
    # all a log or a metric needs.
    try:
        claims = jwt.decode(
            token,
            config.key,
            algorithms=list(config.algorithms),
            options=options,
            audience=config.audience,
            issuer=config.issuer,
        )
    except jwt.InvalidAlgorithmError:
        raise AuthError("bad_algorithm") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad_signature") from None
    except jwt.MissingRequiredClaimError:
        raise AuthError("missing_claim") from None
    except jwt.InvalidIssuerError:
        raise AuthError("bad_issuer") from None
    except jwt.InvalidAudienceError:
        raise AuthError("bad_audience") from None
    except jwt.exceptions.InvalidSubjectError:
        raise AuthError("bad_user") from None
    except jwt.InvalidTokenError:
        # DecodeError and friends: not three base64 parts, bad JSON, bad key.
        raise AuthError("malformed") from None

    exp = _numeric_date(claims.get("exp"))
    if now >= exp + config.leeway:
        raise AuthError("expired")
    nbf = claims.get("nbf")
    if nbf is not None and now + config.leeway < _numeric_date(nbf):
        raise AuthError("not_yet_valid")

    user = claims.get(config.user_claim)
    if user is None and config.user_claim != "user_id":
        user = claims.get("user_id")
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)
    if user is None:
        raise AuthError("missing_claim")
    if not valid_user_id(user):
        raise AuthError("bad_user")
    return Claims(user_id=user, expires_at=exp + config.leeway)


def _numeric_date(value: object) -> float:
    """A NumericDate claim (RFC 7519 §2) as a finite float; ``malformed``
    otherwise: not a number, a bool, NaN, infinite (``1e999``), or an integer
    no float holds (``1`` and 400 zeros), which the key's holder can sign."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AuthError("malformed")
    try:
        seconds = float(value)
    except OverflowError as exc:  # "int too large to convert to float": no claim in it
        raise AuthError("malformed") from exc
    if not math.isfinite(seconds):
        raise AuthError("malformed")
    return seconds


def mint(
    user_id: str,
    *,
    key: str | bytes,
    algorithm: str = "HS256",
    now: float,
    ttl: float = 3600.0,
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign a development token for ``user_id`` valid from ``now`` for ``ttl`` s.

    Used by ``smapws token`` and the tests; production tokens come from the
    API gateway.
    """
    claims: dict[str, Any] = {"sub": user_id, "iat": int(now), "exp": int(now + ttl)}
    if extra:
        claims.update(extra)
    return jwt.encode(claims, key, algorithm=algorithm)


def token_key(token: str) -> bytes:
    """What :class:`VerifiedTokens` remembers a token by: a 128-bit BLAKE2b
    digest of its exact text (16 bytes, however long the token)."""
    return blake2b(token.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class VerifiedTokens:
    """A bounded memory of tokens already verified, so that a reconnect storm
    (every tab of every user coming back with the same cookie) does not pay
    for the signature again: on a hit only the expiry is checked against
    ``now``. (``nbf`` needs no second look: it passed once, time only moves
    on.) Tokens that fail are never remembered. Least recently used first
    out; at most ``max_entries`` (about 0.3 KiB each, whatever the tokens'
    length).

    Sound because the key is a digest of the exact token string
    (:func:`token_key`): a token whose claims or signature differ in any byte
    is a different key and is verified in full. The token itself is not
    kept: one valid token can be written many ways (PyJWT before 2.14
    ignored characters outside base64url in the signature), each up to the
    16 KiB request head, so entries the size of the tokens let one user
    fill ``max_entries`` x 16 KiB.
    """

    __slots__ = ("_cache", "config", "max_entries")

    def __init__(self, config: AuthConfig, max_entries: int = 10_000) -> None:
        self.config = config
        self.max_entries = max_entries
        self._cache: OrderedDict[bytes, Claims] = OrderedDict()

    def verify(self, token: str, *, now: float) -> Claims:
        """As :func:`verify`, remembering successes. Raises :class:`AuthError`."""
        cache = self._cache
        key = token_key(token)
        claims = cache.get(key)
        if claims is not None:
            if now >= claims.expires_at:
                del cache[key]
                raise AuthError("expired")
            cache.move_to_end(key)
            return claims
        claims = verify(token, self.config, now=now)
        if self.max_entries > 0:
            cache[key] = claims
            if len(cache) > self.max_entries:
                cache.popitem(last=False)
        return claims

    def __len__(self) -> int:
        return len(self._cache)


def mint_for(config: AuthConfig, user_id: str, *, now: float, ttl: float) -> str:
    """A token for ``user_id`` that ``config`` accepts: signed with its first
    algorithm, with its ``iss``/``aud`` when it requires them, and the user
    id also in its user claim when that is not ``sub``. For ``smapws token``
    and the demo's login; production tokens come from the gateway."""
    extra: dict[str, Any] = {}
    if config.issuer:
        extra["iss"] = config.issuer
    if config.audience:
        extra["aud"] = config.audience
    if config.user_claim != "sub":
        extra[config.user_claim] = user_id
    return mint(
        user_id, key=config.key, algorithm=config.algorithms[0], now=now, ttl=ttl, extra=extra
    )
