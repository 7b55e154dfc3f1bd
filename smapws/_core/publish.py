"""What publishers send: the seed's message rules (re-exported).

They live in :mod:`smapws_publisher._messages`, one copy shared by the hub
and the publishers' own distribution (``publisher/``, ``smapws-publisher``).
"""

from __future__ import annotations

from smapws_publisher._messages import (
    FINAL_STATUSES,
    alert_payload,
    api_body,
    api_hint,
    api_result,
    channel,
    encode,
    notification_payload,
    one_line,
    progress_message,
    user_key,
)

__all__ = [
    "FINAL_STATUSES",
    "alert_payload",
    "api_body",
    "api_hint",
    "api_result",
    "channel",
    "encode",
    "notification_payload",
    "one_line",
    "progress_message",
    "user_key",
]
