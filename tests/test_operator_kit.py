"""The operator's kit: ``deploy/grafana/smapws-dashboard.json`` and
``deploy/prometheus/alerts.yaml``.

The rules pass ``promtool check rules`` (Debian's ``prometheus`` package;
``bash .ci/run`` installs it) and fire on the series they are about
(``promtool test rules``), and every series either file names is one a live
group of hubs (two workers on Redis) serves on ``/metrics``, with labels the
hub gives it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from smapws.metrics import Metrics

from .conftest import RedisServer, free_port, http
from .test_workers import group_process, hub_env, wait_group_ready

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "smapws-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
#: Labels Prometheus adds to every scraped series, and the histogram's own.
SCRAPE_LABELS = frozenset({"instance", "job", "le"})
_NAME = re.compile(r"\b((?:websocket|process)_[a-z_]+)\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: run `bash .ci/run` (it installs Debian's prometheus)")
    return found


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def alert_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def test_the_rules_pass_promtool() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 11 rules found" in out.stdout


def test_the_alerts_fire_on_what_they_are_about(tmp_path: Path) -> None:
    """promtool's rule tests: a hub whose subscription is down for over a
    minute, one near its connection cap, one dropping messages; a healthy
    one raises nothing."""
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'websocket_subscriber_up{instance="a"}', "values": "1 0 0 0"},
                    {"series": 'websocket_subscriber_up{instance="b"}', "values": "1 1 1 1"},
                    {"series": 'websocket_active_connections{instance="a"}', "values": "9500x10"},
                    {"series": 'websocket_active_connections{instance="b"}', "values": "100x10"},
                    {
                        "series": 'websocket_broker_messages_dropped_total{instance="a"}',
                        "values": "0+60x10",
                    },
                    {
                        "series": 'websocket_broker_messages_dropped_total{instance="b"}',
                        "values": "0x10",
                    },
                    {"series": 'websocket_messages_failed_total{instance="a"}', "values": "0x10"},
                    {"series": 'websocket_messages_failed_total{instance="b"}', "values": "0x10"},
                ],
                "alert_rule_test": [
                    _fires("3m", "SmapwsSubscriptionDown", "critical"),
                    {"eval_time": "1m", "alertname": "SmapwsSubscriptionDown", "exp_alerts": []},
                    _fires("6m", "SmapwsNearCapacity", "warning", value="9.5k"),
                    _fires("10m", "SmapwsMessagesDropped", "warning", value="1"),
                ],
            }
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests))
    out = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _fires(at: str, alert: str, severity: str, value: str = "") -> dict[str, Any]:
    """A promtool expectation: ``alert`` fires at ``at`` for instance ``a`` alone."""
    expected = {
        "exp_labels": {"severity": severity, "instance": "a"},
        "exp_annotations": _annotations(alert, "a", value),
    }
    return {"eval_time": at, "alertname": alert, "exp_alerts": [expected]}


def _annotations(alert: str, instance: str, value: str = "") -> dict[str, str]:
    """The rule's annotations as Prometheus renders them for ``instance``."""
    doc = yaml.safe_load(ALERTS.read_text())
    rule = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert)
    out = {}
    for key, text in rule["annotations"].items():
        text = text.replace("{{ $labels.instance }}", instance)
        text = re.sub(r"\{\{ \$value \| humanize \}\}", value, text)
        out[key] = text
    return out


def _label_names() -> dict[str, set[str]]:
    """Each series name the hub serves -> the label names it can carry."""
    metrics = Metrics()
    labels = {
        getattr(m, "_name", ""): set(getattr(m, "_labelnames", ())) for m in vars(metrics).values()
    }
    names: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for family in metrics.registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names[family.name + suffix] = labels.get(family.name, set())
    return names


async def test_every_series_the_kit_names_is_served_by_a_live_group(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Names are checked against what a running group of two workers on
    Redis serves (the supervisor's websocket_workers among them), labels
    against those the hub's metrics carry."""
    exprs = dashboard_exprs() + alert_exprs()
    used = {name for expr in exprs for name in _NAME.findall(expr)}
    assert len(used) > 25  # the kit covers the hub, not a corner of it
    port, internal = free_port(), free_port()
    env = hub_env(redis_server, port, SMAPWS_INTERNAL_PORT=str(internal))
    async with group_process(env, tmp_path / "group.log") as proc:
        await wait_group_ready(port, proc)
        with trio.fail_after(10):
            text = (await http(internal, "GET", "/metrics")).body.decode()
    served = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        served |= (
            {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
        )
    assert not used - served, sorted(used - served)

    labels = _label_names()
    for expr in exprs:
        for name, selector in re.findall(r"\b((?:websocket|process)_[a-z_]+)\{([^}]*)\}", expr):
            given = set(re.findall(r"(\w+)\s*=~?", selector))
            assert given <= labels.get(name, set()) | SCRAPE_LABELS, (name, given)
        allowed = set().union(*(labels.get(n, set()) for n in _NAME.findall(expr)))
        for clause in re.findall(r"\bby \(([^)]*)\)", expr):
            grouped = {label.strip() for label in clause.split(",")}
            assert grouped <= allowed | SCRAPE_LABELS, (expr, grouped)
