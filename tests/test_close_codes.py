"""Close codes are written once (smapws._core.closecodes.CloseCode): the
browser client's ``CloseCode`` (its JS and its type declarations) and the
close-codes page are held to the enum."""

from __future__ import annotations

import re
from pathlib import Path

from smapws._core.closecodes import CloseCode
from smapws._io import connection, listen

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "smapws" / "static"


def _object(text: str, opening: str) -> dict[str, int]:
    """``{NAME: number}`` of the object literal that starts at ``opening``."""
    body = text.split(opening, 1)[1].split("}", 1)[0]
    pairs = re.findall(r"^\s*([A-Z_]+):\s*(\d+)\s*[,;]", body, flags=re.MULTILINE)
    assert pairs, f"no entries after {opening!r}"
    return {name: int(code) for name, code in pairs}


def test_the_js_client_close_codes_are_the_enum() -> None:
    js = _object(
        (STATIC / "smapws-client.js").read_text(), "export const CloseCode = Object.freeze({"
    )
    dts = _object(
        (STATIC / "smapws-client.d.ts").read_text(),
        "export declare const CloseCode: Readonly<{",
    )
    assert js == dts
    # What the client names is the enum's (the enum may hold more).
    assert js == {name: CloseCode[name].value for name in js}
    # The ones a client must act on are there.
    assert {"GOING_AWAY", "POLICY", "TOO_BIG", "TRY_AGAIN_LATER", "ABNORMAL"} <= js.keys()


def test_the_close_codes_page_lists_every_code() -> None:
    page = (ROOT / "docs" / "reference" / "close-codes.rst").read_text()
    listed = {int(code) for code in re.findall(r"^(\d{4})\s{2,}\S", page, flags=re.MULTILINE)}
    assert listed == {int(code) for code in CloseCode}


def test_the_shell_uses_the_enum() -> None:
    assert connection.TRY_AGAIN_LATER is CloseCode.TRY_AGAIN_LATER
    assert connection.INTERNAL is CloseCode.INTERNAL
    assert set(listen.NORMAL_CLOSES) == {CloseCode.NORMAL, CloseCode.GOING_AWAY}


def test_no_close_code_is_written_as_a_number_elsewhere() -> None:
    import ast

    # 1000 is also a millisecond factor and a rate: the other codes are not.
    codes = {int(code) for code in CloseCode} - {1000}
    found = []
    for path in sorted((ROOT / "smapws").rglob("*.py")):
        # closecodes.py defines them; ws.py is deleted by the WebSocket rewrite.
        if path.name in ("closecodes.py", "ws.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value in codes:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}")
    assert found == []
