"""Fuzzing the parsers at every way in, from the outside (issue 8, point 3):
what the fuzzing found, one test each."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Final

import pytest

from smapws._core.auth import AuthConfig, AuthError, verify
from smapws._core.http import HttpError, origin_allowed, parse_head

from .conftest import SECRET


@pytest.mark.parametrize("target", [b"//[", b"//[abc]/", b"//[::1/x", b"//[1.2.3.4]"])
def test_a_target_urlsplit_refuses_is_a_400(target: bytes) -> None:
    """urlsplit raises ValueError for these authorities: it left parse_head
    (a 500 from the connection's barrier, an internal error)."""
    with pytest.raises(HttpError) as err:
        parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert err.value.status == 400


@pytest.mark.parametrize("origin", ["http://[", "http://[abc]", "https://[::1"])
@pytest.mark.parametrize("allowed", [(), ("https://*.example.com",)])
def test_an_origin_urlsplit_refuses_is_not_allowed(origin: str, allowed: tuple[str, ...]) -> None:
    """Any browser-less client can send one: it was a 500 and an internal
    error for each upgrade."""
    assert origin_allowed(origin, "h", allowed) is False


#: Long enough for HS512 (PyJWT warns below 64 bytes, and warnings are errors here).
KEY: Final = SECRET * 2
CONFIGS: Final = [AuthConfig(algorithms=("HS256",), key=KEY)]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_raw(header: bytes, payload: bytes, alg: str = "HS256") -> str:
    """A token whose signature is right, over header and payload bytes that
    may be anything: what only a holder of the key can make."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    sig = hmac.new(KEY.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(sig)}"


@pytest.mark.parametrize(
    "claims",
    [
        b'{"sub":"u1","exp":1' + b"0" * 400 + b"}",  # an int no float holds
        b'{"sub":"u1","exp":NaN}',  # never "in the future"
        b'{"sub":"u1","exp":1e999}',
        b'{"sub":"u1","exp":1900000000,"nbf":NaN}',
    ],
)
def test_a_signed_token_with_an_absurd_date_is_malformed(claims: bytes) -> None:
    token = sign_raw(b'{"alg":"HS256","typ":"JWT"}', claims)
    with pytest.raises(AuthError) as err:
        verify(token, CONFIGS[0], now=time.time())
    assert err.value.reason == "malformed"
