"""Files the hub serves as they are: the browser client and the demo page.

They ship inside the package (``smapws/static/``) and are read once.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Final

#: ``GET /smapws-client.js``: the browser client (an ES module).
CLIENT_JS: Final = "smapws-client.js"
CLIENT_JS_PATH: Final = "/" + CLIENT_JS
#: ``GET /demo`` (only under ``smapws demo`` / ``SMAPWS_DEMO=true``).
DEMO_HTML: Final = "demo.html"

JAVASCRIPT: Final = "application/javascript; charset=utf-8"
HTML: Final = "text/html; charset=utf-8"


@functools.cache
def read(name: str) -> bytes:
    """The bytes of ``smapws/static/<name>`` (read once, then kept)."""
    return (resources.files("smapws") / "static" / name).read_bytes()
