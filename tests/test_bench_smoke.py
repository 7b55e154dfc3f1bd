"""The benchmark suite (``bench/``) still works end to end: a seconds-long smoke run.

Each case runs ``python -m bench.run --quick`` against one hub (20 connections, a few
hundred messages) exactly as a person would, and checks that the tooling produced a
results file whose figures are present and plausible. It asserts nothing about speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _run_quick(module: str, out: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Run ``python -m <module> --quick`` as a person would; its stdout and report."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", *args, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr}"
    files = list(out.glob("*-quick.json"))
    assert len(files) == 1, proc.stdout
    return proc.stdout, json.loads(files[0].read_text())


# The Go, Centrifuge and Node peers are installed (apt-get, npm ci) and built by the
# run itself, as on a fresh machine: the first of these cases may take a minute longer.
@pytest.mark.parametrize("hub", ["smapws", "baseline", "floor", "go", "centrifuge", "node"])
def test_quick_benchmark_runs_end_to_end(hub: str, tmp_path: Path) -> None:
    stdout, report = _run_quick("bench.run", tmp_path, "--hubs", hub)

    assert {"schema", "timestamp", "machine", "plan", "hubs", "summary"} <= report.keys()
    assert isinstance(report["machine_was_quiet"], bool)
    assert {"nproc", "cpu_model", "python"} <= report["machine"].keys()
    result = report["hubs"][hub]
    assert result["ok"] is True and result["error"] is None

    connections = report["plan"]["connections"]
    storm = result["w4_connect"]
    assert storm["ok"] == connections and storm["failed"] == 0
    assert _finite(storm["handshakes_per_s"]) and storm["handshakes_per_s"] > 0

    memory = result["w3_idle_memory"]
    assert memory["open_after_settle"] == connections
    assert memory["rss_n_bytes"] > 0 and _finite(memory["kib_per_connection"])

    fanout = result["w2_fanout"]
    assert fanout["runs"] and fanout["paused_runs"]
    for run in fanout["runs"] + fanout["paused_runs"]:
        assert run["received"] == run["expected"] == connections
        assert _finite(run["last_tab_ms"]) and run["last_tab_ms"] >= run["p50_ms"] > 0
    assert all(run["clients_paused"] for run in fanout["paused_runs"])

    routed = result["w1_routed"]
    assert routed["steps"], "no W1 step ran"
    for step in routed["steps"]:
        assert step["received"] > 0 and step["lost"] == 0 and step["extra"] == 0
        for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "hub_cpu_pct"):
            assert _finite(step[key]), (key, step)
        assert 0 < step["p50_ms"] <= step["p99_ms"] <= step["max_ms"]

    cost = routed["cost_step"]
    assert cost["offered_per_s"] == report["plan"]["cost_rate"]
    assert _finite(cost["hub_cpu_us_per_delivery"]) and cost["hub_cpu_us_per_delivery"] >= 0

    summary = report["summary"]
    # (Whether a W1 step passed its latency budget depends on the machine's load:
    # only its presence is checked.)
    assert "w1_max_delivered_per_s" in summary
    for key in (
        "w1_p99_at_cost_ms",
        "w2_last_tab_ms",
        "w3_kib_per_connection",
        "w4_handshakes_per_s",
    ):
        assert _finite(summary[key][hub]), (key, summary[key])
    assert [t["target"] for t in report["targets"]] == [
        "hub CPU per delivery <= 0.8x baseline",
        "hub CPU per delivery <= 1.0x go",
        "hub CPU per delivery < 1.0x centrifuge",
        "p99 at the cost rate <= 10 ms",
        "handshakes/s >= 0.6x go",
        "idle RSS per connection <= 10 KiB",
    ]
    assert "W1 deliveries/s" in stdout and "targets" in stdout  # the printed tables


def test_a_failed_step_names_what_limited_it() -> None:
    from bench.run import _first_failure, limited_by

    steps = [
        {"offered_per_s": 100, "kept_up": True, "hub_cpu_pct": 40.0, "core1_busy_pct": 30.0},
        {"offered_per_s": 200, "kept_up": False, "hub_cpu_pct": 99.0, "core1_busy_pct": 50.0},
        {"offered_per_s": 300, "kept_up": False, "hub_cpu_pct": 60.0, "core1_busy_pct": 97.0},
    ]
    assert limited_by(_first_failure(steps, lambda s: s["kept_up"])) == "hub"
    assert limited_by(_first_failure(steps[2:], lambda s: s["kept_up"])) == "clients"
    assert limited_by(_first_failure(steps[:1], lambda s: s["kept_up"])) == "not reached"
    assert limited_by({"hub_cpu_pct": 10.0, "core1_busy_pct": 20.0}) == "unclear"


def test_a_hub_name_may_carry_smapws_settings() -> None:
    """``smapws+SMAPWS_X=V`` runs smapws with that setting (to measure it
    doing what a peer does); settings of another kind, or on a peer, are
    refused rather than ignored."""
    from bench import peers

    argv, env = peers.prepare("smapws+SMAPWS_HISTORY_TTL=0+SMAPWS_FLEET_HISTORY=off")
    assert argv[1:] == ["-m", "smapws", "serve"]
    assert env == {"SMAPWS_HISTORY_TTL": "0", "SMAPWS_FLEET_HISTORY": "off"}
    assert peers.valid_name("smapws@HEAD~1+SMAPWS_HISTORY_TTL=0")
    for bad in ("go+SMAPWS_HISTORY_TTL=0", "smapws+JWT_SECRET=x", "smapws+SMAPWS_X", "nope"):
        assert not peers.valid_name(bad), bad
    with pytest.raises(ValueError):
        peers.prepare("smapws+PATH=/tmp")


# -- the load generator's sans-IO pieces (no sockets, no hub) ----------------------


def test_frame_parser_reassembles_split_reads_and_reads_marks() -> None:
    from bench.publisher import encode_message
    from bench.wsclient import OP_PING, OP_TEXT, bench_mark, parse_frames

    message = encode_message(7, 42, 123_456_789)
    text = bytes([0x81, 126]) + len(message).to_bytes(2, "big") + message
    ping = bytes([0x89, 2]) + b"hi"
    stream = text + ping + text
    frames, rest = parse_frames(stream[:100])
    assert frames == [] and rest == stream[:100]
    frames, rest = parse_frames(rest + stream[100:])
    assert rest == b""
    assert [(fin, op) for fin, op, _ in frames] == [
        (True, OP_TEXT),
        (True, OP_PING),
        (True, OP_TEXT),
    ]
    assert bench_mark(frames[0][2]) == (7, 42, 123_456_789)
    # A hub may re-encode the JSON with other spacing and key order.
    assert bench_mark(b'{"payload": {"x": 1, "bench": "1:2:3"}, "type": "t"}') == (1, 2, 3)
    assert bench_mark(b'{"type": "t", "payload": {}}') is None


def test_handshake_checks_the_accept_value() -> None:
    from bench.wsclient import ProtocolError, handshake_request, parse_handshake_response

    request, accept = handshake_request("127.0.0.1", 8081, "/ws", "tok")
    assert b"Cookie: access_token=tok\r\n" in request and b"Origin" not in request
    ok = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: " + accept
    assert parse_handshake_response(ok, accept) == 101
    assert parse_handshake_response(b"HTTP/1.1 401 Unauthorized\r\nX: y", accept) == 401
    with pytest.raises(ProtocolError):
        parse_handshake_response(ok.replace(accept, b"wrong"), accept)


def test_percentiles_count_missing_deliveries_as_late() -> None:
    from bench.run import percentiles

    complete = percentiles([i * 1_000_000 for i in range(1, 101)], expected=100)
    assert (complete["p50_ms"], complete["p99_ms"], complete["max_ms"]) == (50.0, 99.0, 100.0)
    lossy = percentiles([1_000_000] * 98, expected=100)
    assert lossy["lost"] == 2 and lossy["p50_ms"] == 1.0 and lossy["p99_ms"] is None


def test_centrifuge_frames_are_counted_by_message() -> None:
    """Centrifuge batches the pushes queued for a connection into one frame,
    newline-delimited: each is one delivery (and its connect reply none)."""
    import multiprocessing

    from bench.loadgen import _Client, _Worker
    from bench.publisher import encode_message
    from bench.wsclient import centrifuge_connect_reply

    assert centrifuge_connect_reply(b'{"id":1,"result":{"client":"c","version":"0.15"}}')
    assert not centrifuge_connect_reply(b'{"id":1,"error":{"code":101,"message":"unauthorized"}}')
    assert not centrifuge_connect_reply(b'{"result":{"channel":"user_noti:u","data":{}}}')
    assert not centrifuge_connect_reply(b"not json")

    def push(seq: int) -> bytes:
        data = encode_message(3, seq, 1_000)
        return b'{"result":{"channel":"user_noti:bench1","data":{"data":' + data + b"}}}\n"

    ctl, other = multiprocessing.Pipe()
    try:
        worker = _Worker(ctl)
        worker._record = worker._record_batched
        client = _Client(0)
        batch = push(1) + push(2) + push(3)
        # Padded so that the frame's length ends in a newline byte (0x0a): the
        # header must not be read as a message boundary.
        batch = batch[:-1] + b" " * ((10 - len(batch)) % 256) + b"\n"
        single = push(4)[:-1]  # a lone push, without the trailing newline

        def frame(payload: bytes) -> bytes:
            return bytes([0x81, 126]) + len(payload).to_bytes(2, "big") + payload

        assert frame(batch)[3] == 0x0A
        worker._on_data(client, frame(batch) + frame(single), now=5_000)
        # The fast path hands the frame over with its header still on.
        worker._record(frame(batch), 6_000)
    finally:
        ctl.close()
        other.close()
    samples = list(worker.samples[3])
    assert samples[0::2] == [1_000] * 7  # publish stamps
    assert samples[1::2] == [4_000] * 4 + [5_000] * 3  # latencies
    assert worker.stats == {"frames with several messages": 2}


def test_workers_comparison_runs_end_to_end(tmp_path: Path) -> None:
    """``python -m bench.workers --quick``: smapws with one worker, then two, measured
    with the whole process group (supervisor and workers) as the hub."""
    stdout, report = _run_quick("bench.workers", tmp_path)
    one, two = report["summary"]
    assert (one["workers"], two["workers"]) == (1, 2)
    # One process, then a supervisor and its two workers.
    assert (one["hub_processes"], two["hub_processes"]) == (1, 3)
    for row in (one, two):
        assert row["ok"] is True
        assert _finite(row["handshakes_per_s"]) and row["handshakes_per_s"] > 0
        assert _finite(row["published_per_s_kept_up"]) and row["published_per_s_kept_up"] > 0
        assert _finite(row["handshakes_x_first"]) and _finite(row["published_x_first"])
    run = report["runs"]["smapws-2w"]
    workers = run["w3_idle_memory"]["hub_health"]["workers"]
    assert workers["count"] == 2 and workers["ready"] == 2
    assert run["w4_connect"]["ok"] == report["plan"]["connections"]
    assert "W1 published msg/s kept up" in stdout


def test_soak_runs_end_to_end_and_judges_growth(tmp_path: Path) -> None:
    """``python -m bench.soak`` for 20 seconds with 60 tabs: calibrates, churns, samples
    RSS/fds/tasks and writes its verdict (issue 16). Nothing about speed is asserted;
    that no message went missing without a resync, and that nothing grew, is its own
    pass/fail, and a 20-second run of a hub that leaks nothing passes it."""
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench.soak", "--minutes", "0.34", "--tabs", "60"),
            *("--lifetime", "3", "--out", str(tmp_path)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"bench.soak failed:\n{proc.stdout}\n{proc.stderr}"
    (path,) = tmp_path.glob("soak-*.json")
    report = json.loads(path.read_text())
    assert report["passed"] is True and report["final"]["gaps"] == 0
    assert report["capacity_deliveries_per_s"] > 0 and report["rate_published_per_s"] > 0
    assert len(report["samples"]) >= 6
    assert report["final"]["connects"] > 60 and report["final"]["resumes"] > 0  # churned
    for row in report["samples"]:
        assert row["rss_MiB"] > 0 and row["fds"] > 0 and row["tasks"] > 0
    assert set(report["verdict"]) == {"rss_MiB", "fds", "tasks"}


def test_soak_growth_rule() -> None:
    from bench.soak import growing

    times = [float(t) for t in range(0, 600, 10)]
    flat = [100.0 + (t % 30) / 10 for t in times]  # noise, no trend
    assert not growing("rss_MiB", times, flat)[0]
    leak = [100.0 + t / 20 for t in times]  # +30 MiB over the run
    assert growing("rss_MiB", times, leak)[0]
    step = [100.0] * 30 + [100.5] * 30  # one small step: under the margin
    assert not growing("rss_MiB", times, step)[0]
    assert growing("tasks", times, [1000.0 + t for t in times])[0]
