"""Configuration from environment and flags, with one clear error line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from smapws._config import ConfigError, load, redact_url

SECRET = "s" * 32
DOCS = Path(__file__).parent.parent / "docs"


def _extension() -> ModuleType:
    """docs/_ext/smapws_settings.py, the Sphinx extension that writes the table."""
    spec = importlib.util.spec_from_file_location(
        "smapws_settings", DOCS / "_ext/smapws_settings.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


settings = _extension()


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


def test_a_key_file_larger_than_any_public_key_is_refused_unread(tmp_path: Path) -> None:
    """A key file was read whole: JWT_PUBLIC_KEY_FILE=/dev/zero (or a log
    file) ended start-up in a MemoryError traceback, or the machine out of
    memory first. Not tested on /dev/zero itself: without the bound, the
    test would take the machine's memory."""
    big = tmp_path / "key.pem"
    big.write_bytes(b"-----BEGIN PUBLIC KEY-----\n" + b"A" * (1 << 20))
    with pytest.raises(ConfigError) as info:
        load({"JWT_ALGORITHMS": "RS256", "JWT_PUBLIC_KEY_FILE": str(big)})
    assert str(info.value) == (
        f"JWT_PUBLIC_KEY_FILE: {big} is larger than a PEM public key (65536 bytes at most)"
    )


def test_a_key_pyjwt_would_refuse_at_every_upgrade_is_refused_at_start_up(
    tmp_path: Path,
) -> None:
    """PyJWT refuses, at each verification, an HMAC secret that reads as a
    public key (or an SSH key, a JWK) and a public key it cannot load for
    the algorithm: each upgrade then failed as an internal error (500)
    instead of the hub refusing to start. The message hides the secret."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    ssh = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
    with pytest.raises(ConfigError) as info:
        load({"JWT_SECRET": ssh})
    assert str(info.value).startswith("JWT_SECRET: PyJWT refuses it as an HMAC secret")
    assert "AAAAC3" not in str(info.value)
    rsa_pem = tmp_path / "rsa.pem"
    rsa_pem.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    assert load({"JWT_ALGORITHMS": "RS256", "JWT_PUBLIC_KEY_FILE": str(rsa_pem)}).auth is not None
    for algorithms, path in (("ES256", rsa_pem), ("RS256,ES256", rsa_pem)):
        with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY_FILE: .* is not a PEM public key"):
            load({"JWT_ALGORITHMS": algorithms, "JWT_PUBLIC_KEY_FILE": str(path)})
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY_FILE: .* is not a PEM public key"):
        load({"JWT_ALGORITHMS": "ES256", "JWT_PUBLIC_KEY_FILE": str(garbage)})


def test_a_public_key_on_a_curve_cryptography_does_not_know_is_a_config_error(
    tmp_path: Path,
) -> None:
    """cryptography raises its own UnsupportedAlgorithm (not a ValueError)
    for an EC key on a curve it cannot load: a ConfigError, not a traceback
    at start-up. (secp112r1, made with openssl ecparam -name secp112r1.)"""
    pem = tmp_path / "secp112r1.pem"
    pem.write_text(
        "-----BEGIN PUBLIC KEY-----\n"
        "MDIwEAYHKoZIzj0CAQYFK4EEAAYDHgAEAmkJq096DtrRFm25jQIZQ6h1KKanb69c\n"
        "GyU4Fw==\n"
        "-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY_FILE: .* is not a PEM public key"):
        load({"JWT_ALGORITHMS": "ES256", "JWT_PUBLIC_KEY_FILE": str(pem)})


def test_redact_url() -> None:
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://:p%40w@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("unix://:pw@/run/redis.sock?db=1") == "unix://:***@/run/redis.sock?db=1"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # redis-py sends a password given as a query argument: it was shown whole.
        ("redis://h:1/0?password=s3cret", "redis://h:1/0?password=***"),
        ("redis://h:1/0?db=1&password=s3cret&x=1", "redis://h:1/0?db=1&password=***&x=1"),
        # An unescaped '/', '?' or '#' in the password ends the authority
        # there for urllib (and redis-py): no password found, the URL was
        # shown whole, or ('s3cr' taken for the port) .port raised with it.
        ("redis://:1234/s3cret@h:1/0", "redis://***@h:1/0"),
        ("redis://:s3cr/et@h:1/0", "redis://***@h:1/0"),
        ("redis://u:s3cr?et@h:1/0", "redis://***@h:1/0"),
        ("redis://u:s3cr#et@h:1/0", "redis://***@h:1/0"),
    ],
)
def test_redact_url_hides_every_password_redis_py_would_use(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cr/et@h:6379/0",
        "redis://:1234/s3cret@h:6379/0",
        "redis://:s3cr#et@h:6379/0",
        "redis://:s3cret@h:notaport/0",
        "redis://:s3cret@h:99999/0",
        "redis://:s3cret@[::1/0",
    ],
)
def test_a_redis_url_urllib_misreads_is_refused_without_its_password(url: str) -> None:
    # These crashed serve with a traceback (ValueError at SplitResult.port,
    # "...as 's3cr'": the password's start), or were taken with the
    # password for a path and logged whole, connecting to localhost:1234.
    with pytest.raises(ConfigError) as info:
        load({"JWT_SECRET": SECRET, "REDIS_URL": url})
    assert str(info.value).startswith("REDIS_URL: ")
    assert "s3cr" not in str(info.value) and "1234" not in str(info.value)
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (" redis://:s3cret@h:6379/0", "must not contain spaces, newlines or control characters"),
        ("redis://:s3cret@h:6379/0\n", "must not contain spaces, newlines or control characters"),
        ("redis://:s3cret@h:6379/zero", "expected a database number as the path"),
        ("redis://:s3cret@h:6379/0?db=s3cr", "invalid value for the query argument 'db'"),
        ("redis://:s3cret@h:6379/0?socket_timeout=s3cr", "invalid value for the query argument"),
        ("redis://:s3cret@h:6379/0?timeuot=1", "'timeuot' is not a query argument redis-py"),
        ("redis://:s3cret@h:6379/0?retry=3", "'retry' is not a query argument redis-py"),
        ("redis://:s3cret@h:6379/0?ssl_cert_reqs=none", "'ssl_cert_reqs' is not a query"),
    ],
)
def test_a_redis_url_redis_py_cannot_use_is_refused_at_start(url: str, reason: str) -> None:
    """A leading space passed urllib (it strips one) and crashed serve with
    redis-py's traceback; so did a query value redis-py cannot parse; an
    argument redis-py has no parameter for (a typo) made every connect a
    TypeError, the hub retrying 'internal error' forever; a path that is no
    number was database 0. Each is one line at start, without the password."""
    with pytest.raises(ConfigError) as info:
        load({"JWT_SECRET": SECRET, "REDIS_URL": url})
    message = str(info.value)
    assert message.startswith("REDIS_URL: ") and reason in message, message
    assert "s3cr" not in message and "\n" not in message
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379",
        "redis://h:6379/",
        "redis://h:6379/3?client_name=hub&socket_keepalive=true&max_connections=8",
        "rediss://u:pw@h:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false",
        "unix:///run/redis.sock?db=2",
    ],
)
def test_redis_urls_redis_py_takes_are_taken(url: str) -> None:
    assert load({"JWT_SECRET": SECRET, "REDIS_URL": url}).redis_url == url


def serve_exits(**env: str) -> tuple[int, list[str]]:
    """``smapws serve`` run with ``env`` (JWT_SECRET and PATH added): its
    exit status and the lines of its standard error."""
    proc = subprocess.run(
        [sys.executable, "-m", "smapws", "serve"],
        env={"JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode, proc.stderr.strip().splitlines()


def test_a_redis_url_with_a_leading_space_is_exit_2_not_a_traceback() -> None:
    assert serve_exits(REDIS_URL=" redis://127.0.0.1:1/0") == (
        2,
        [
            "smapws: configuration error: REDIS_URL: must not contain spaces, newlines or "
            "control characters"
        ],
    )


@pytest.mark.parametrize("name", ["SMAPWS_HOST", "SMAPWS_INTERNAL_HOST", "REDIS_HOST"])
@pytest.mark.parametrize("raw", [" 127.0.0.1", "redis\n", "a b"])
def test_a_host_with_a_space_or_newline_is_refused(name: str, raw: str) -> None:
    """REDIS_HOST='redis\\n' (a value read from a file) was retried for ever,
    'Name or service not known', and SMAPWS_HOST=' 127.0.0.1' failed to
    listen with exit 1: neither named the setting."""
    env = {"JWT_SECRET": SECRET, name: raw, "SMAPWS_INTERNAL_PORT": "9100"}
    with pytest.raises(ConfigError) as info:
        load(env)
    assert str(info.value) == (
        f"{name}: expected a host name or address, without spaces or newlines, got {raw!r}"
    )


@pytest.mark.parametrize("raw", ["::1", "[::1]"])
def test_an_ipv6_host_is_taken_bare_or_in_brackets(raw: str) -> None:
    """SMAPWS_HOST=[::1] (as a URL writes it) failed to listen, exit 1; and
    REDIS_HOST=::1 made redis://::1:6379/0, which redis-py reads as no host."""
    from redis.asyncio.connection import parse_url

    cfg = load({"JWT_SECRET": SECRET, "SMAPWS_HOST": raw, "REDIS_HOST": raw})
    assert cfg.host == "::1"
    assert cfg.redis_url == "redis://[::1]:6379/0"
    assert cfg.redis_url is not None and parse_url(cfg.redis_url)["host"] == "::1"


def test_every_variable_is_in_the_configuration_page() -> None:
    """The page's table is generated from OPTIONS (docs/_ext/smapws_settings.py):
    every setting has a row with its flag and default, and the page uses it."""
    page = (DOCS / "reference" / "configuration.rst").read_text()
    assert ".. smapws-settings::" in page
    from smapws._config import OPTIONS, shown_default

    table = "\n".join(settings.table_rst(settings.notes_of(_settings_content(page))))
    for opt in OPTIONS:
        row = (
            f"   * - ``{opt.env}``\n     - ``{opt.flag}``\n     - ``{shown_default(opt.default)}``"
        )
        assert row in table, opt.env
    assert table.count("   * - ``") == len(OPTIONS)


def test_a_note_for_no_setting_fails_the_docs_build() -> None:
    with pytest.raises(ValueError, match="SMAPWS_PROT"):
        settings.notes_of(["SMAPWS_PROT", "   a note for a misspelt setting"])


def test_cli_reports_one_line_and_exit_2() -> None:
    assert serve_exits(SMAPWS_PORT="notaport") == (
        2,
        [
            "smapws: configuration error: SMAPWS_PORT: expected a port number 0-65535, "
            "got 'notaport'"
        ],
    )


def test_readme_renders_without_warnings() -> None:
    import docutils.core

    text = (Path(__file__).parent.parent / "README.rst").read_text()
    docutils.core.publish_doctree(
        text, settings_overrides={"report_level": 2, "halt_level": 2, "warning_stream": False}
    )


def _settings_content(page: str) -> list[str]:
    """The content of the page's ``smapws-settings`` directive (its notes)."""
    after = page.split(".. smapws-settings::\n", 1)[1]
    lines = []
    for line in after.splitlines():
        if line and not line.startswith("   "):
            break
        lines.append(line[3:])
    return lines


def test_the_metrics_page_is_the_registry() -> None:
    """Every ``websocket_*`` series the Metrics page (docs/reference/metrics.rst) names is one
    the hub registers, and the other way round."""
    import re

    from smapws.metrics import Metrics

    table = (DOCS / "reference" / "metrics.rst").read_text()
    documented = {name.removesuffix("_total") for name in re.findall(r"``(websocket_\w+)", table)}
    families = Metrics().registry.collect()
    registered = {f.name for f in families if f.name.startswith("websocket_")}
    # The supervisor's own (SMAPWS_WORKERS > 1), registered when it starts.
    supervisor = (Path(__file__).parent.parent / "smapws/_io/supervisor.py").read_text()
    registered |= set(re.findall(r'"(websocket_\w+)"', supervisor))
    assert documented == registered


@pytest.mark.parametrize(
    ("origins", "hint"),
    [
        ("localhost:5173", "http://localhost:5173"),
        ("http://ok.example, app.example.com", "http://app.example.com"),
        ("https://app.example.com/path", "https://app.example.com"),
        ("//app.example.com", "http://app.example.com"),
    ],
)
def test_an_origin_without_a_scheme_is_refused(origins: str, hint: str) -> None:
    """No browser sends ``Origin: localhost:5173``: such an entry would make
    every browser's upgrade a 403, so the hub refuses to start."""
    with pytest.raises(ConfigError) as info:
        load({"JWT_SECRET": SECRET, "SMAPWS_ALLOWED_ORIGINS": origins})
    assert str(info.value) == (
        "SMAPWS_ALLOWED_ORIGINS: expected scheme://host[:port] as a browser sends it "
        f"(e.g. {hint}), * or null, got {origins!r}"
    )


def test_origins_as_browsers_send_them_are_taken() -> None:
    value = "http://localhost:5173, https://*.example.com, https://a.example:8443/, *, null"
    cfg = load({"JWT_SECRET": SECRET, "SMAPWS_ALLOWED_ORIGINS": value})
    assert cfg.allowed_origins == (
        "http://localhost:5173", "https://*.example.com", "https://a.example:8443/", "*", "null",
    )  # fmt: skip


@pytest.mark.parametrize("name", ["SMAPWS_HOST", "JWT_USER_CLAIM", "SMAPWS_CHANNEL_PREFIX"])
def test_an_empty_value_with_a_default_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: must not be empty \\(unset it for"):
        load({"JWT_SECRET": SECRET, name: " "})


def test_settings_the_rest_makes_unused_are_refused(tmp_path: Path) -> None:
    """A value that would be silently ignored is refused, naming what to do."""
    with pytest.raises(ConfigError, match=r"^REDIS_PASSWORD: not used with REDIS_URL; put it"):
        load({"JWT_SECRET": SECRET, "REDIS_URL": "redis://h:6379/0", "REDIS_PASSWORD": "pw"})
    # With Sentinel, REDIS_PASSWORD is the master's: taken.
    load({"JWT_SECRET": SECRET, "REDIS_SENTINELS": "s:26379", "REDIS_SENTINEL_MASTER": "m",
          "REDIS_URL": "redis://h:6379/0", "REDIS_PASSWORD": "pw"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY_FILE: not used with JWT_ALGORITHMS="):
        load({"JWT_SECRET": SECRET, "JWT_PUBLIC_KEY_FILE": str(tmp_path / "k.pem")})
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "k.pem").write_bytes(pem)
    env = {"JWT_ALGORITHMS": "ES256", "JWT_PUBLIC_KEY_FILE": str(tmp_path / "k.pem")}
    assert load(env).auth is not None
    with pytest.raises(ConfigError) as info:
        load({**env, "JWT_SECRET": SECRET})
    assert str(info.value).startswith("JWT_SECRET: not used with JWT_ALGORITHMS=ES256")
    assert SECRET not in str(info.value)


def test_ignored_variables_name_the_closest_setting() -> None:
    from smapws._config import ignored_variables

    assert ignored_variables(
        {
            "SMAPWS_PROT": "9000",
            "SMAPWS_REDIS_URL": "redis://x",
            "SMAPWS_PORT": "1",
            "REDIS_URLX": "ignored: not ours",
            "SMAPWS_PYTHON2": "/usr/bin/python2",
        }
    ) == [
        "SMAPWS_PROT is not a setting and is ignored (did you mean SMAPWS_PORT?)",
        "SMAPWS_REDIS_URL is not a setting and is ignored (did you mean REDIS_URL?)",
    ]


def test_the_seeds_redis_settings_beside_a_redis_url_are_named_as_ignored() -> None:
    # REDIS_URL wins over them (configuration.rst): they were ignored
    # without a word, while REDIS_PASSWORD there is refused.
    from smapws._config import ignored_variables

    env = {"REDIS_URL": "redis://r:6379/0", "REDIS_HOST": "other", "REDIS_DB": "3"}
    assert ignored_variables(env) == [
        "REDIS_HOST is ignored: REDIS_URL is set, and wins over it",
        "REDIS_DB is ignored: REDIS_URL is set, and wins over it",
    ]
    assert ignored_variables({"REDIS_HOST": "other", "REDIS_DB": "3"}) == []
    cfg = load({"JWT_SECRET": SECRET, **env})
    assert cfg.redis_url == "redis://r:6379/0"


#: Settings that are not a Config field of their own: folded into
#: ``redis_url`` (REDIS_HOST, REDIS_PORT) or into ``auth`` (the JWT_* ones).
FOLDED = frozenset(
    {
        "redis_host",
        "redis_port",
        "jwt_secret",
        "jwt_public_key_file",
        "jwt_algorithms",
        "jwt_issuer",
        "jwt_audience",
        "jwt_user_claim",
        "jwt_leeway",
    }
)


def test_config_takes_each_default_from_options() -> None:
    import ast
    import dataclasses
    import inspect

    from smapws import _config
    from smapws._config import OPTIONS, Config

    fields = {f.name: f for f in dataclasses.fields(Config)}
    options = {opt.field: opt for opt in OPTIONS}
    assert len(options) == len(OPTIONS)  # one entry per field name
    assert options.keys() - fields.keys() == FOLDED
    assert fields.keys() - options.keys() == {"auth"}
    blank = Config()
    for name in fields.keys() - {"auth"}:
        opt = options[name]
        assert getattr(blank, name) == opt.default, name
        assert fields[name].repr is not opt.secret, name
    # Written once: every field's default in the class body is
    # ``_setting("<its name>")``, no literal beside it.
    tree = ast.parse(inspect.getsource(Config))
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            if name == "auth":
                continue
            value = node.value
            assert isinstance(value, ast.Call), name
            assert ast.unparse(value) == f"_setting({name!r})", name
    assert _config._OPTION_OF["port"].default == 8081  # the contract's default port


def test_core_limits_defaults_are_the_settings_defaults() -> None:
    """The ``_core`` bounds have defaults of their own (tests and benches
    build them bare): they are the settings' defaults, the same values."""
    from smapws._config import Config
    from smapws._core.auth import AuthConfig
    from smapws._core.history import HistoryLimits
    from smapws._core.outbox import OutboxLimits
    from smapws._core.snapshot import SnapshotLimits

    c = Config()
    assert OutboxLimits() == OutboxLimits(
        c.send_queue_high_water, c.send_queue_messages, c.send_queue_bytes
    )
    assert HistoryLimits() == HistoryLimits(
        c.history_ttl, c.history_per_user, c.history_max_bytes, c.history_per_user_bytes
    )
    assert SnapshotLimits() == SnapshotLimits(
        c.snapshot_ttl,
        c.snapshot_completed_ttl,
        c.snapshot_per_user,
        c.snapshot_max_entries,
        c.snapshot_per_user_bytes,
        c.snapshot_max_bytes,
    )
    auth = load({"JWT_SECRET": "k" * 32}).auth
    assert auth == AuthConfig(algorithms=("HS256",), key="k" * 32)
