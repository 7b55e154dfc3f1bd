# Reproduce: .venv/bin/python -m bench.micro_parse
"""parse() of a seed progress message, fast path (orjson) vs the careful
(standard library) path, alternated in one run."""

import json
import statistics
import timeit

from smapws._core import envelope

raw = json.dumps(
    {
        "type": "project_progress",
        "payload": {
            "project_id": "proj_123",
            "status": "CRAWLING",
            "total": 1000,
            "done": 150,
            "errors": 2,
            "progress_percent": 15.0,
        },
    }
).encode()
fast = envelope.loads_strict


def careful(r: bytes, max_depth: int = 32) -> object:
    return envelope._loads_careful(r, max_depth)


res = {"careful": [], "fast": []}
n = 50000
for _ in range(5):
    for name, fn in (("careful", careful), ("fast", fast)):
        envelope.loads_strict = fn
        res[name].append(
            timeit.timeit(lambda: envelope.parse(raw, wall_time=1.7e9, received_at=0.0), number=n)
            / n
            * 1e6
        )
envelope.loads_strict = fast
c, f = statistics.median(res["careful"]), statistics.median(res["fast"])
print(
    f"parse() of a {len(raw)} B seed message: careful {c:.2f} us, fast {f:.2f} us, "
    f"fast/careful {f / c:.2f}x"
)
