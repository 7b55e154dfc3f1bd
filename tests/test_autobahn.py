"""WebSocket conformance: Autobahn|Testsuite's fuzzingclient, every case,
against an echo endpoint built from smapws's own WebSocket layer
(``tests/autobahn``; the same run as ``python -m tests.autobahn.run``).

The suite is installed on first use into a Python 2.7 virtualenv in the
cache directory (see ``tests/autobahn/run.py``); that takes a minute or two
once, the run about half a minute. ``pytest -m "not autobahn"`` leaves
it out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.autobahn import run

pytestmark = pytest.mark.autobahn

#: Every group of the suite: framing, pings, reserved bits, opcodes,
#: fragmentation, UTF-8, closing, limits/performance, misc, and the two of
#: permessage-deflate.
GROUPS = {"1", "2", "3", "4", "5", "6", "7", "9", "10", "12", "13"}
#: permessage-deflate: the hub negotiates no extension (nor does the echo).
EXTENSION_GROUPS = {"12", "13"}


@pytest.fixture(scope="session")
def autobahn_python() -> Path:
    try:
        return run.install()
    except run.InstallError as exc:
        pytest.fail(f"{exc}\n(pytest -m 'not autobahn' leaves this test out)", pytrace=False)


async def test_fuzzingclient_finds_no_failed_case(autobahn_python: Path, tmp_path: Path) -> None:
    result = await run.run_suite(autobahn_python, tmp_path, timeout=900)
    print(run.report(result))
    assert {case_id.split(".")[0] for case_id in result.cases} == GROUPS
    unimplemented = {
        case_id.split(".")[0]
        for case_id, case in result.cases.items()
        if case["behavior"] == "UNIMPLEMENTED"
    }
    assert unimplemented <= EXTENSION_GROUPS
    assert result.failed() == [], run.report(result)
