"""JWT verification (sans-IO: the time is an argument)."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smapws._core.auth import AuthConfig, AuthError, mint, token_key, usable_key, verify

KEY = "k" * 64
NOW = 1_800_000_000.0
CFG = AuthConfig(algorithms=("HS256",), key=KEY)


def test_valid_token_gives_the_user() -> None:
    claims = verify(mint("u1", key=KEY, now=NOW, ttl=60), CFG, now=NOW + 59)
    assert claims.user_id == "u1"
    assert claims.expires_at == NOW + 60


def test_expired_and_not_yet_valid() -> None:
    tok = mint("u1", key=KEY, now=NOW, ttl=60)
    with pytest.raises(AuthError) as info:
        verify(tok, CFG, now=NOW + 60)
    assert info.value.reason == "expired"
    leeway = AuthConfig(algorithms=("HS256",), key=KEY, leeway=5)
    assert verify(tok, leeway, now=NOW + 64).user_id == "u1"
    early = mint("u1", key=KEY, now=NOW, ttl=60, extra={"nbf": NOW + 30})
    with pytest.raises(AuthError, match="not_yet_valid"):
        verify(early, CFG, now=NOW + 10)


def test_exp_is_required() -> None:
    tok = jwt.encode({"sub": "u1"}, KEY, algorithm="HS256")
    with pytest.raises(AuthError, match="missing_claim"):
        verify(tok, CFG, now=NOW)


@pytest.mark.parametrize(
    ("tok", "reason"),
    [
        ("", "missing_token"),
        ("abc", "malformed"),
        ("a.b.c", "malformed"),
        (mint("u1", key="x" * 64, now=NOW), "bad_signature"),
        (jwt.encode({"sub": "u1", "exp": NOW + 60}, KEY, algorithm="HS512"), "bad_algorithm"),
    ],
)
def test_refusals(tok: str, reason: str) -> None:
    with pytest.raises(AuthError) as info:
        verify(tok, CFG, now=NOW)
    assert info.value.reason == reason
    assert tok not in str(info.value) or not tok


def test_alg_none_is_refused() -> None:
    tok = jwt.encode({"sub": "u1", "exp": NOW + 60}, None, algorithm="none")
    with pytest.raises(AuthError, match="bad_algorithm"):
        verify(tok, CFG, now=NOW)


def test_issuer_and_audience_checked_when_configured() -> None:
    cfg = AuthConfig(algorithms=("HS256",), key=KEY, issuer="smap", audience="ws")
    good = mint("u1", key=KEY, now=NOW, extra={"iss": "smap", "aud": "ws"})
    assert verify(good, cfg, now=NOW).user_id == "u1"
    with pytest.raises(AuthError, match="bad_issuer"):
        verify(mint("u1", key=KEY, now=NOW, extra={"iss": "x", "aud": "ws"}), cfg, now=NOW)
    with pytest.raises(AuthError, match="bad_audience"):
        verify(mint("u1", key=KEY, now=NOW, extra={"iss": "smap", "aud": "x"}), cfg, now=NOW)
    with pytest.raises(AuthError, match="missing_claim"):
        verify(mint("u1", key=KEY, now=NOW), cfg, now=NOW)


def test_user_claim_and_fallback() -> None:
    custom = AuthConfig(algorithms=("HS256",), key=KEY, user_claim="uid")
    tok = jwt.encode({"uid": 42, "exp": NOW + 60}, KEY, algorithm="HS256")
    assert verify(tok, custom, now=NOW).user_id == "42"
    fallback = jwt.encode({"user_id": "u9", "exp": NOW + 60}, KEY, algorithm="HS256")
    assert verify(fallback, CFG, now=NOW).user_id == "u9"
    for bad in ({"sub": ""}, {"sub": "x" * 300}, {"sub": ["a"]}, {"sub": True}):
        tok = jwt.encode({**bad, "exp": NOW + 60}, KEY, algorithm="HS256")
        with pytest.raises(AuthError, match="bad_user"):
            verify(tok, CFG, now=NOW)


def test_public_key_algorithms() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cfg = AuthConfig(algorithms=("ES256",), key=public_pem)
    tok = jwt.encode({"sub": "u1", "exp": NOW + 60}, private, algorithm="ES256")
    assert verify(tok, cfg, now=NOW).user_id == "u1"
    # An HS256 token "signed" with the public key text must not pass.
    forged = jwt.encode({"sub": "u1", "exp": NOW + 60}, "p" * 64, algorithm="HS256")
    with pytest.raises(AuthError, match="bad_algorithm"):
        verify(forged, cfg, now=NOW)


def test_repr_hides_the_key() -> None:
    assert KEY not in repr(CFG)


def test_verified_tokens_are_remembered_but_expire() -> None:
    from smapws._core.auth import VerifiedTokens

    tokens = VerifiedTokens(CFG, max_entries=2)
    a = mint("a", key=KEY, now=NOW, ttl=60)
    assert tokens.verify(a, now=NOW).user_id == "a"
    assert len(tokens) == 1
    assert tokens.verify(a, now=NOW + 30).user_id == "a"  # a hit
    with pytest.raises(AuthError, match="expired"):
        tokens.verify(a, now=NOW + 60)  # a hit still checks the expiry
    assert len(tokens) == 0
    # Failures are not remembered; one changed byte is another token.
    forged = a[:-2] + ("A" if a[-2] != "A" else "B") + a[-1]
    with pytest.raises(AuthError):
        tokens.verify(forged, now=NOW)
    assert len(tokens) == 0
    # Bounded: the least recently used goes.
    b, c = (mint(u, key=KEY, now=NOW, ttl=60) for u in "bc")
    tokens.verify(a, now=NOW)
    tokens.verify(b, now=NOW)
    tokens.verify(a, now=NOW)
    tokens.verify(c, now=NOW)
    assert len(tokens) == 2
    assert list(tokens._cache) == [token_key(a), token_key(c)]


def test_remembered_tokens_cost_the_same_whatever_their_length() -> None:
    """One valid token can be written many ways (PyJWT before 2.14, which
    pyproject allowed, took ``signature!!!!``), each up to the 16 KiB head
    limit: the cache keeps a digest, never the token, so 10,000 such
    variants cannot make it hold 160 MiB."""
    from smapws._core.auth import VerifiedTokens

    tokens = VerifiedTokens(CFG, max_entries=100)
    for i in range(100):
        long_token = mint("u", key=KEY, now=NOW, ttl=60, extra={"pad": f"{i:05d}" * 3000})
        assert tokens.verify(long_token, now=NOW).user_id == "u"
        assert tokens.verify(long_token, now=NOW + 1).user_id == "u"  # remembered
    assert len(tokens) == 100
    assert all(len(key) == 16 for key in tokens._cache)


def test_a_key_prepared_once_still_tells_keys_apart() -> None:
    """Each algorithm remembers the key it prepared last (PyJWT prepares it
    on every verification, a third of the cost): a token signed with
    another key, or a key that must not be an HMAC secret, is still refused
    every time, whichever key came before."""
    other = "o" * 64
    mine = mint("u1", key=KEY, now=NOW, ttl=60)
    theirs = mint("u1", key=other, now=NOW, ttl=60)
    other_cfg = AuthConfig(algorithms=("HS256",), key=other)
    for _ in range(2):
        assert verify(mine, CFG, now=NOW).user_id == "u1"
        with pytest.raises(AuthError) as info:
            verify(theirs, CFG, now=NOW)
        assert info.value.reason == "bad_signature"
        assert verify(theirs, other_cfg, now=NOW).user_id == "u1"
        with pytest.raises(AuthError) as info:
            verify(mine, other_cfg, now=NOW)
        assert info.value.reason == "bad_signature"
    # A public key given as an HMAC secret is refused (PyJWT's check of the
    # secret; the configuration refuses it before: usable_key), the second
    # time too.
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    pem_cfg = AuthConfig(algorithms=("HS256",), key=pem)
    assert not usable_key(("HS256",), pem) and usable_key(("HS256",), KEY)
    for _ in range(2):
        with pytest.raises(jwt.InvalidKeyError):
            verify(mine, pem_cfg, now=NOW)


def test_a_key_prepared_once_copies() -> None:
    """The wrapper in PyJWT's registry survives copy and deepcopy (which
    make it without __init__: its attribute lookup recursed until a
    RecursionError), and the copy verifies like the original."""
    import copy

    algorithm = jwt.get_algorithm_by_name("HS256")
    token = mint("u1", key=KEY, now=NOW, ttl=60)
    signing_input, _, signature = token.rpartition(".")
    sig = jwt.utils.base64url_decode(signature)
    for made in (copy.copy(algorithm), copy.deepcopy(algorithm)):
        key = made.prepare_key(KEY)
        assert made.verify(signing_input.encode(), key, sig)
        assert not made.verify(signing_input.encode() + b"x", key, sig)
