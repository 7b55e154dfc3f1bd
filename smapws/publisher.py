"""Publish to smapws from Python (re-exported from :mod:`smapws_publisher`).

The publisher is its own distribution, ``smapws-publisher`` (``publisher/``
in the repository: redis and orjson only), which the hub's package includes;
``from smapws.publisher import Publisher`` and ``from smapws_publisher import
Publisher`` are the same class. See :mod:`smapws_publisher._publisher`.
"""

from __future__ import annotations

from smapws_publisher import *  # noqa: F403 (the same names, the same objects)
from smapws_publisher import __all__ as __all__
