"""smapws as of another git revision, importable beside the working tree in
one process: an in-process micro benchmark can then alternate before and
after rounds, so that the noise of a shared machine hits both alike.

:func:`smapws_as` exports the ``smapws`` package of ``REV`` (``git
archive``, as ``bench.ab`` does for whole hubs) under another package name,
with its own imports of ``smapws`` renamed, and imports it. Its modules are
separate objects (their classes and module state are not the working
tree's); ``smapws_publisher`` is shared.
"""

from __future__ import annotations

import importlib
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from bench.peers import smapws_at

#: ``smapws`` as the first part of a module name in an import statement
#: (not ``smapws_publisher``, not a word inside a string).
_IMPORT = re.compile(r"^(\s*(?:from|import)\s+)smapws(?=[.\s])", re.MULTILINE)


def smapws_as(rev: str, name: str = "smapws_base") -> ModuleType:
    """Import ``smapws`` as of git revision ``rev`` as the package ``name``
    (its submodules as ``name.<module>``)."""
    root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    smapws_at(rev, root)
    package = root / name
    (root / "smapws").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(_IMPORT.sub(rf"\1{name}", text))
    sys.path.insert(0, str(root))
    return importlib.import_module(name)
