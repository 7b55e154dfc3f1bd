"""Sphinx configuration of smapws's documentation (``sphinx-build -W docs build/docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

from smapws._version import __version__  # noqa: E402

project = "smapws"
author = "the SMAP team"
copyright = "the SMAP team"  # noqa: A001
version = release = __version__
extensions = ["smapws_settings"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
# A reference to a missing page or label is an error (with -W, a failed build).
nitpicky = True
