"""The demo's simulated Project service publishes what a real one does: its
messages are built by the publishers' rule (smapws._core.publish), so they
cannot drift from it (they had: the demo rounded progress_percent)."""

from __future__ import annotations

import json
import random

from smapws._core.envelope import parse
from smapws._core.publish import FINAL_STATUSES, progress_message
from smapws._io import demo


def _project(**kw: object) -> demo._Project:
    fields: dict[str, object] = {
        "project_id": "proj_001",
        "total": 3,
        "rate": 1,
        "fails": False,
    }
    fields.update(kw)
    return demo._Project(**fields)  # type: ignore[arg-type]


def test_progress_is_the_publishers_message() -> None:
    p = _project(done=1, status="CRAWLING")
    sent = json.loads(demo.progress_message(p))
    mtype, payload = progress_message(
        project_id="proj_001", status="CRAWLING", total=3, done=1, errors=0
    )
    assert sent == {"type": mtype, "payload": payload}
    # The seed's rule, unrounded: done / total x 100.
    assert sent["payload"]["progress_percent"] == 1 / 3 * 100


def test_a_simulated_project_publishes_only_what_the_hub_accepts() -> None:
    rng = random.Random(7)
    for fails in (False, True):
        p = _project(total=400, rate=30, fails=fails)
        seen: list[str] = []
        for _ in range(100):
            for data in demo._step(p, rng):
                parse(
                    data, wall_time=0.0, received_at=0.0
                )  # raises InvalidMessage for what the hub would drop
                msg = json.loads(data)
                seen.append(msg["type"])
                if msg["type"].startswith("project_"):
                    pl = msg["payload"]
                    assert (msg["type"], pl) == progress_message(
                        project_id=pl["project_id"],
                        status=pl["status"],
                        total=pl["total"],
                        done=pl["done"],
                        errors=pl["errors"],
                    )
            if p.status in FINAL_STATUSES:
                break
        assert seen[-2:] == (
            ["project_completed", "alert"] if fails else ["project_completed", "notification"]
        )
