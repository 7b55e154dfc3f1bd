"""The signals a hub process acts on.

SIGTERM and SIGINT stop it: the first drains (``on_stop(name, 1)``), a
second stops it now (``on_stop(name, 2)``, and so on). SIGHUP is logged and
ignored: smapws has no reload (its settings are read once, at start; a
restart applies new ones, and a drain makes that lossless for the tabs), and
a hub started from a terminal must not die of that terminal's hangup,
dropping every tab without a close frame (1006). A lone hub and a
supervisor of workers use this alike, and so do the workers (a hangup
reaches the whole process group)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Final

import trio

from smapws._log import fields, logger


async def watch(
    on_stop: Callable[[str, int], object],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_stop(name, n)`` for the n-th SIGTERM or SIGINT, and log
    each SIGHUP, until cancelled. Started (``task_status``) once the signals
    are caught."""
    received = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                logger.warning(
                    "signal ignored: smapws has no reload; restart it to apply new settings",
                    extra=fields(signal=name),
                )
                continue
            received += 1
            on_stop(name, received)


#: What a process done with its drain ignores from then on: one of these
#: sent to the whole process group (Ctrl-C, a hangup, systemd's
#: KillMode=control-group) may arrive after the drain, and must not turn
#: exit 0 into "killed".
LATE_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
