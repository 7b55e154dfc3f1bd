"""Configuration from environment and flags, with one clear error line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smapws._config import ConfigError, load, option_names, redact_url

SECRET = "s" * 32


def test_defaults_and_embedded_broker() -> None:
    cfg = load({"JWT_SECRET": SECRET})
    assert (cfg.host, cfg.port) == ("0.0.0.0", 8081)
    assert cfg.broker == "memory"
    assert (cfg.ping_interval, cfg.pong_wait, cfg.write_wait) == (54.0, 60.0, 10.0)
    assert cfg.channel_prefix == "user_noti:"
    assert cfg.auth is not None and cfg.auth.algorithms == ("HS256",)


def test_seed_redis_names_build_a_url() -> None:
    cfg = load({"JWT_SECRET": SECRET, "REDIS_HOST": "redis", "REDIS_DB": "2",
                "REDIS_PASSWORD": "p@ss"})  # fmt: skip
    assert cfg.broker == "redis"
    assert cfg.redis_url == "redis://:p%40ss@redis:6379/2"
    assert "p%40ss" not in repr(cfg) and "p@ss" not in repr(cfg)
    assert cfg.redis_url_redacted == "redis://:***@redis:6379/2"
    # REDIS_URL wins over the parts.
    cfg = load({"JWT_SECRET": SECRET, "REDIS_HOST": "x", "REDIS_URL": "redis://y:1/0"})
    assert cfg.redis_url == "redis://y:1/0"


def test_flags_override_environment() -> None:
    cfg = load({"JWT_SECRET": SECRET, "SMAPWS_PORT": "9000"}, {"port": "9100"})
    assert cfg.port == 9100


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SMAPWS_PORT": "abc"}, "SMAPWS_PORT"),
        ({"SMAPWS_PORT": "70000"}, "SMAPWS_PORT"),
        ({"SMAPWS_PING_INTERVAL": "-1"}, "SMAPWS_PING_INTERVAL"),
        ({"SMAPWS_MAX_CONNECTIONS": "0"}, "SMAPWS_MAX_CONNECTIONS"),
        ({"JWT_ALGORITHMS": "HS256,RS256"}, "JWT_ALGORITHMS"),
        ({"JWT_ALGORITHMS": "none"}, "JWT_ALGORITHMS"),
        ({"JWT_SECRET": ""}, "JWT_SECRET"),
        ({"JWT_SECRET": "short"}, "JWT_SECRET"),
        ({"JWT_ALGORITHMS": "RS256"}, "JWT_PUBLIC_KEY_FILE"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"SMAPWS_LOG_FORMAT": "xml"}, "SMAPWS_LOG_FORMAT"),
        ({"SMAPWS_CHANNEL_PREFIX": "a*"}, "SMAPWS_CHANNEL_PREFIX"),
        ({"SMAPWS_CLOSE_ON_TOKEN_EXPIRY": "maybe"}, "SMAPWS_CLOSE_ON_TOKEN_EXPIRY"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"JWT_SECRET": SECRET, **env})
    assert str(info.value).startswith(named + ":")
    assert "\n" not in str(info.value)


def test_secret_values_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load({"JWT_SECRET": "tooshort-secret"})
    assert "tooshort-secret" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (" ", "expected a key, not whitespace"),
        ("\t\n", "expected a key, not whitespace"),
        ("k", "expected at least 16 characters"),
        ("  fifteen-chars-  ", "expected at least 16 characters"),
    ],
)
def test_an_api_key_no_one_can_use_or_anyone_can_guess_is_refused(raw: str, why: str) -> None:
    """Issue 16: a whitespace key turned on an API that no key opened (the
    bearer is stripped before it is compared), and a 1-character key was
    taken silently. Both fail at start-up, in one line that hides the key."""
    with pytest.raises(ConfigError) as info:
        load({"JWT_SECRET": SECRET, "SMAPWS_API_KEY": raw})
    message = str(info.value)
    assert message.startswith("SMAPWS_API_KEY: " + why)
    assert message.endswith("got (hidden)") and "\n" not in message
    if raw.strip():
        assert raw.strip() not in message
    # Surrounding whitespace (a secret file's newline) is not part of the key.
    key = "0123456789abcdef"
    assert load({"JWT_SECRET": SECRET, "SMAPWS_API_KEY": f" {key}\n"}).api_key == key
    assert load({"JWT_SECRET": SECRET, "SMAPWS_API_KEY": ""}).api_key is None


def test_public_key_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "pub.pem"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    cfg = load({"JWT_ALGORITHMS": "ES256", "JWT_PUBLIC_KEY_FILE": str(pub)})
    assert cfg.auth is not None and cfg.auth.key == pub.read_bytes()
    priv = tmp_path / "priv.pem"
    priv.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY_FILE: holds a private key"):
        load({"JWT_ALGORITHMS": "ES256", "JWT_PUBLIC_KEY_FILE": str(priv)})


def test_redact_url() -> None:
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_every_variable_is_in_the_readme() -> None:
    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    missing = [name for name in option_names() if name not in readme]
    assert not missing


def test_cli_reports_one_line_and_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "smapws", "serve"],
        env={"SMAPWS_PORT": "notaport", "JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "smapws: configuration error: SMAPWS_PORT: expected a port number 0-65535, got 'notaport'"
    ]


def test_readme_renders_without_warnings() -> None:
    import docutils.core

    text = (Path(__file__).parent.parent / "README.rst").read_text()
    docutils.core.publish_doctree(
        text, settings_overrides={"report_level": 2, "halt_level": 2, "warning_stream": False}
    )


def _readme() -> str:
    return (Path(__file__).parent.parent / "README.rst").read_text()


def test_the_readme_configuration_table_is_the_code() -> None:
    """Every row of the README's Configuration table names a setting the
    code has, with its flag and its default (the README may explain a
    default after it, ``unset (API off)``), and every setting has a row."""
    import re

    from smapws._config import OPTIONS, shown_default

    text = _readme()
    table = text[text.index(".. list-table::") : text.index("\nCommand line\n")]
    rows = re.findall(r"   \* - ``(\w+)``\n     - ``(--[\w-]+)``\n     - (.+)\n", table)
    readme = {env: (flag, default.replace("``", "")) for env, flag, default in rows}
    assert len(readme) == len(rows)
    assert set(readme) == {opt.env for opt in OPTIONS}
    for opt in OPTIONS:
        flag, default = readme[opt.env]
        assert flag == opt.flag, opt.env
        shown = shown_default(opt.default)
        # SMAPWS_INTERNAL_HOST is unset in the code and means SMAPWS_HOST.
        assert default in (shown, "SMAPWS_HOST") or default.startswith(f"{shown} ("), opt.env


def test_the_readme_metrics_table_is_the_registry() -> None:
    """Every ``websocket_*`` series the README's Metrics table names is one
    the hub registers, and the other way round."""
    import re

    from smapws.metrics import Metrics

    text = _readme()
    table = text[text.index("\nMetrics\n=======\n") : text.index("\nLogs\n====\n")]
    documented = {name.removesuffix("_total") for name in re.findall(r"``(websocket_\w+)", table)}
    families = Metrics().registry.collect()
    registered = {f.name for f in families if f.name.startswith("websocket_")}
    # The supervisor's own (SMAPWS_WORKERS > 1), registered when it starts.
    supervisor = (Path(__file__).parent.parent / "smapws/_io/supervisor.py").read_text()
    registered |= set(re.findall(r'"(websocket_\w+)"', supervisor))
    assert documented == registered
