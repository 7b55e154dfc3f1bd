"""Fuzzing the parsers at every way in, from the outside (issue 8, point 3):
what the fuzzing found, one test each."""

from __future__ import annotations

import pytest

from smapws._core.http import HttpError, origin_allowed, parse_head


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
