"""Process-wide settings a hub process applies once at start-up, whether it
is a lone hub (``smapws serve``) or a worker of a group (``SMAPWS_WORKERS``).

Both :mod:`smapws._cli` and :mod:`smapws._io.supervisor` call
:func:`tune_gc`; it lives here so that neither imports the other.
"""

from __future__ import annotations

import gc
from typing import Final

#: Young-generation threshold of the cyclic garbage collector. CPython's
#: default (700 allocations) runs a collection every few messages under
#: load; the hub's per-message objects are acyclic and freed by reference
#: counting, so collections find little and cost latency.
GC_GEN0_THRESHOLD: Final = 20_000


def tune_gc() -> None:
    """Make the cyclic GC cheap for a process that holds many long-lived
    objects: everything alive after start-up (modules, classes) is moved out
    of the collector's sight with ``gc.freeze()``, so full collections scan
    only what connections add, and young collections run less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
