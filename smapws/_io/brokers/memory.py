"""The embedded broker: single node, in process, nothing to connect to."""

from __future__ import annotations

from typing import Any

import trio
from trio_util import AsyncValue

from smapws._io.brokers import BrokerError, Item


class MemoryBroker:
    """Publishing hands the message straight to the router's queue."""

    backend = "memory"
    channels = None

    def __init__(self) -> None:
        self._sink: trio.MemorySendChannel[Item] | None = None
        self.status_value: AsyncValue[str] = AsyncValue("connecting")

    @property
    def status(self) -> str:
        return str(self.status_value.value)

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "status": self.status}

    async def run(
        self,
        sink: trio.MemorySendChannel[Item],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._sink = sink
        self.status_value.value = "connected"
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._sink = None
            self.status_value.value = "connecting"

    async def publish(self, channel: bytes, data: bytes) -> int:
        await trio.lowlevel.checkpoint()
        if self._sink is None:
            raise BrokerError("in-process broker is not running")
        try:
            self._sink.send_nowait((channel, data))
        except trio.WouldBlock as exc:
            raise BrokerError("router queue full") from exc
        return 1
