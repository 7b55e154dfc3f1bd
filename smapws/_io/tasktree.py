"""What the trio run holds: tasks and nurseries, counted by walking the task
tree from the root task with trio's public ``lowlevel`` API.

Used at scrape time by ``websocket_tasks`` (a leak of tasks shows there
before it shows in memory; ``python -m bench.soak`` watches it) and by the
tests that pin what one idle connection costs.
"""

from __future__ import annotations

from typing import NamedTuple

import trio


class TaskTree(NamedTuple):
    tasks: int
    nurseries: int


def task_tree() -> TaskTree:
    """Tasks and nurseries of the current trio run (both 0 outside one).
    O(tasks): a few milliseconds for 10,000 connections."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return TaskTree(0, 0)
    if root is None:
        return TaskTree(0, 0)
    tasks = nurseries = 0
    stack = [root]
    while stack:
        task = stack.pop()
        tasks += 1
        for nursery in task.child_nurseries:
            nurseries += 1
            stack.extend(nursery.child_tasks)
    return TaskTree(tasks, nurseries)
