"""Settings: precedence of flags > environment > config file > defaults, and errors naming field and source."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from nexus.config import ConfigError, Settings, load_settings
from nexus.detect import DEFAULT_RULES
from nexus.provider import ProviderSettings

HERE = Path(__file__).resolve().parent


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "nexus.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_without_any_source() -> None:
    """With no file, environment or flags, the settings are the dataclass defaults."""
    settings = load_settings(None, {}, {})

    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.grpc_port == 50051
    assert settings.stream_timeout == 1800.0
    assert settings.streaming_rules == list(DEFAULT_RULES)
    assert settings.handler_config == {}


def test_every_field_can_be_set_from_the_environment() -> None:
    """Each Settings field has a NEXUS_<FIELD> variable that load_settings reads."""
    env = {
        "NEXUS_HOST": "0.0.0.0",
        "NEXUS_GRPC_PORT": "1",
        "NEXUS_WS_PORT": "2",
        "NEXUS_GATEWAY": "off",
        "NEXUS_WS_MAX_FRAME_BYTES": "4096",
        "NEXUS_WS_MAX_FRAMES_PER_S": "50",
        "NEXUS_WS_ALLOWED_ORIGINS": "https://app.example.com, http://localhost:*",
        "NEXUS_TLS_CERT_FILE": __file__,
        "NEXUS_TLS_KEY_FILE": __file__,
        "NEXUS_JWT_SECRET": "k" * 32,
        "NEXUS_JWT_PUBLIC_KEY_FILE": __file__,
        "NEXUS_JWT_AUDIENCE": "nexus",
        "NEXUS_JWT_ISSUER": "https://id.example.com",
        "NEXUS_JWT_LEEWAY_S": "3",
        "NEXUS_ALLOW_ANONYMOUS": "yes",
        "NEXUS_BUS": "nats://127.0.0.1:4222",
        "NEXUS_HEARTBEAT_INTERVAL": "0.5",
        "NEXUS_STREAM_TIMEOUT": "60",
        "NEXUS_BUFFER_SIZE": "3",
        "NEXUS_HISTORY_SIZE": "4",
        "NEXUS_HISTORY_MAX_BYTES": "4096",
        "NEXUS_DEDUPE_WINDOW_S": "0",
        "NEXUS_MAX_PAYLOAD_BYTES": "5",
        "NEXUS_MAX_EVENT_BYTES": "4000",
        "NEXUS_MAX_PAYLOAD_DEPTH": "7",
        "NEXUS_MAX_METADATA_ENTRIES": "8",
        "NEXUS_SUBSCRIBER_QUEUE": "6",
        "NEXUS_MAX_PATTERNS_PER_SUBSCRIPTION": "9",
        "NEXUS_MAX_PATTERNS_PER_CONNECTION": "10",
        "NEXUS_MAX_SUBSCRIPTIONS_PER_CONNECTION": "11",
        "NEXUS_MAX_REQUESTS_PER_CONNECTION": "12",
        "NEXUS_PUBLISH_RATE_PER_S": "13.5",
        "NEXUS_PUBLISH_BURST": "14",
        "NEXUS_NATS_STREAM": "EVENTS",
        "NEXUS_NATS_SUBJECT_PREFIX": "acme.events",
        "NEXUS_NATS_RETENTION": "interest",
        "NEXUS_NATS_REPLICAS": "3",
        "NEXUS_NATS_STORAGE": "memory",
        "NEXUS_NATS_MAX_AGE_S": "86400",
        "NEXUS_NATS_ACK_TIMEOUT_S": "0.5",
        "NEXUS_NATS_PUBLISH_WINDOW": "16",
        "NEXUS_NATS_NODE_HEARTBEAT_S": "0.25",
        "NEXUS_HANDLERS": "pkg.a:A, pkg.b:Outer.B",
        "NEXUS_LOAD_ENTRY_POINTS": "0",
        "NEXUS_EXCLUDE_HANDLERS": "countdown,echo",
        "NEXUS_LOG_FORMAT": "JSON",
        "NEXUS_LOG_LEVEL": "debug",
        "NEXUS_STREAMING_RULES": "action_prefix:live_,contains::chunks:",
        "NEXUS_SHUTDOWN_GRACE_S": "2.5",
        "NEXUS_WORKER_PING_INTERVAL_S": "0.2",
        "NEXUS_WORKER_TIMEOUT_S": "0.9",
        "NEXUS_WORKER_GRACE_S": "0",
        "NEXUS_WORKER_POOLS": "demo:echo, demo:stream_ticks:v2",
        "NEXUS_WORKER_LOCAL_IN_FLIGHT": "3",
        "NEXUS_MAX_WORKERS": "17",
        "NEXUS_SSE_KEEPALIVE_S": "7.5",
        "NEXUS_SSE_RETRY_MS": "500",
        "NEXUS_LOG_DIR": str(HERE),
        "NEXUS_DATA_DIR": str(HERE / "no-such-dir-yet"),
        "NEXUS_KV_BUCKET": "plugin_state",
        "NEXUS_KV_MAX_VALUE_BYTES": "2048",
        "NEXUS_KV_MAX_KEYS": "15",
        "NEXUS_HANDLER_CONFIG": '{"countdown": {"max_n": 7}}',
        "NEXUS_METRICS": "false",
        "NEXUS_METRICS_PORT": "9464",
        "NEXUS_METRICS_PUBLIC": "true",
        "NEXUS_TRACING": "false",
        "NEXUS_LOOP": "UVLOOP",
    }
    assert {name.removeprefix("NEXUS_").lower() for name in env} == {
        field.name for field in dataclasses.fields(Settings)
    }

    settings = load_settings(None, env, {})

    assert settings == Settings(
        host="0.0.0.0",
        grpc_port=1,
        ws_port=2,
        gateway=False,
        loop="uvloop",
        tracing=False,
        ws_max_frame_bytes=4096,
        ws_max_frames_per_s=50.0,
        ws_allowed_origins=["https://app.example.com", "http://localhost:*"],
        tls_cert_file=str(Path(__file__).resolve()),
        tls_key_file=str(Path(__file__).resolve()),
        jwt_secret="k" * 32,
        jwt_public_key_file=str(Path(__file__).resolve()),
        jwt_audience="nexus",
        jwt_issuer="https://id.example.com",
        jwt_leeway_s=3.0,
        allow_anonymous=True,
        bus="nats://127.0.0.1:4222",
        heartbeat_interval=0.5,
        stream_timeout=60.0,
        buffer_size=3,
        history_size=4,
        history_max_bytes=4096,
        dedupe_window_s=0.0,
        max_payload_bytes=5,
        max_event_bytes=4000,
        max_payload_depth=7,
        max_metadata_entries=8,
        subscriber_queue=6,
        max_patterns_per_subscription=9,
        max_patterns_per_connection=10,
        max_subscriptions_per_connection=11,
        max_requests_per_connection=12,
        publish_rate_per_s=13.5,
        publish_burst=14,
        nats_stream="EVENTS",
        nats_subject_prefix="acme.events",
        nats_retention="interest",
        nats_replicas=3,
        nats_storage="memory",
        nats_max_age_s=86400.0,
        nats_ack_timeout_s=0.5,
        nats_publish_window=16,
        nats_node_heartbeat_s=0.25,
        handlers=["pkg.a:A", "pkg.b:Outer.B"],
        load_entry_points=False,
        exclude_handlers=["countdown", "echo"],
        log_format="json",
        log_level="debug",
        streaming_rules=["action_prefix:live_", "contains::chunks:"],
        shutdown_grace_s=2.5,
        worker_ping_interval_s=0.2,
        worker_timeout_s=0.9,
        worker_grace_s=0.0,
        worker_pools=["demo:echo", "demo:stream_ticks:v2"],
        worker_local_in_flight=3,
        max_workers=17,
        sse_keepalive_s=7.5,
        sse_retry_ms=500,
        log_dir=str(HERE),
        data_dir=str(HERE / "no-such-dir-yet"),
        kv_bucket="plugin_state",
        kv_max_value_bytes=2048,
        kv_max_keys=15,
        handler_config={"countdown": {"max_n": 7}},
        metrics=False,
        metrics_port=9464,
        metrics_public=True,
    )


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    """Each field takes its value from the highest source that sets it; None flags count as not given."""
    path = write_config(
        tmp_path,
        """
        [nexus]
        grpc_port = 1001
        ws_port = 1002
        heartbeat_interval = 3
        handlers = ["file.mod:FileHandler"]
        """,
    )
    env = {"NEXUS_WS_PORT": "2002", "NEXUS_HEARTBEAT_INTERVAL": "30", "NEXUS_HANDLERS": "env.mod:EnvHandler"}
    overrides: dict[str, Any] = {"heartbeat_interval": 300.0, "grpc_port": None, "handlers": ["flag.mod:Flag"]}

    settings = load_settings(path, env, overrides)

    assert settings.grpc_port == 1001  # file
    assert settings.ws_port == 2002  # environment over file
    assert settings.heartbeat_interval == 300.0  # flag over environment and file
    assert settings.handlers == ["flag.mod:Flag"]  # a flag replaces the list
    assert settings.buffer_size == Settings().buffer_size  # default


def test_config_path_from_nexus_config_env(tmp_path: Path) -> None:
    """Without a config_path argument, NEXUS_CONFIG names the file; the argument wins over it."""
    env_path = write_config(tmp_path, "[nexus]\ngrpc_port = 7001\n")
    other = tmp_path / "other.toml"
    other.write_text("[nexus]\ngrpc_port = 7002\n", encoding="utf-8")

    assert load_settings(None, {"NEXUS_CONFIG": env_path}, {}).grpc_port == 7001
    assert load_settings(str(other), {"NEXUS_CONFIG": env_path}, {}).grpc_port == 7002


def test_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    """An empty NEXUS_* variable leaves the file's value in place."""
    path = write_config(tmp_path, "[nexus]\ngrpc_port = 7001\n")

    assert load_settings(path, {"NEXUS_GRPC_PORT": " "}, {}).grpc_port == 7001


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("Off", False)],
)
def test_boolean_environment_values(text: str, expected: bool) -> None:
    """NEXUS_LOAD_ENTRY_POINTS accepts true/false, 1/0, yes/no and on/off in any case."""
    assert load_settings(None, {"NEXUS_LOAD_ENTRY_POINTS": text}, {}).load_entry_points is expected


@pytest.mark.parametrize("source", ["file", "env", "flag"])
@pytest.mark.parametrize("value", ["none", "None", "0", 0, 0.0])
def test_stream_timeout_zero_or_none_means_no_timeout(tmp_path: Path, source: str, value: str | float) -> None:
    """stream_timeout given as 0 or 'none' from any source becomes None (no timeout)."""
    if source == "env" and not isinstance(value, str):
        value = str(value)
    path = None
    env: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    if source == "file":
        literal = f'"{value}"' if isinstance(value, str) and value.lower() == "none" else str(value)
        path = write_config(tmp_path, f"[nexus]\nstream_timeout = {literal}\n")
    elif source == "env":
        env["NEXUS_STREAM_TIMEOUT"] = str(value)
    else:
        overrides["stream_timeout"] = value

    assert load_settings(path, env, overrides).stream_timeout is None


def test_stream_timeout_none_flag_is_not_given() -> None:
    """A flag passed as Python None is 'not given', so the default timeout stays."""
    assert load_settings(None, {}, {"stream_timeout": None}).stream_timeout == 1800.0


def test_handler_sections_become_handler_config(tmp_path: Path) -> None:
    """[handlers.<name>] tables become handler_config[name], merged key by key with env and flags."""
    path = write_config(
        tmp_path,
        """
        [nexus]
        grpc_port = 1

        [handlers.countdown]
        max_n = 10
        label = "file"

        [handlers."pkg.mod:Echo"]
        prefix = ">"
        nested = { a = 1 }
        """,
    )
    env = {"NEXUS_HANDLER_CONFIG": '{"countdown": {"label": "env"}}'}
    overrides = {"handler_config": {"countdown": {"max_n": 99}, "extra": {"on": True}}}

    settings = load_settings(path, env, overrides)

    assert settings.handler_config == {
        "countdown": {"max_n": 99, "label": "env"},
        "pkg.mod:Echo": {"prefix": ">", "nested": {"a": 1}},
        "extra": {"on": True},
    }


def test_flags_given_as_strings_are_parsed() -> None:
    """String flag values are parsed like environment values (ports, booleans, comma lists)."""
    settings = load_settings(None, {}, {"grpc_port": "0", "gateway": "false", "exclude_handlers": "a,b"})

    assert (settings.grpc_port, settings.gateway, settings.exclude_handlers) == (0, False, ["a", "b"])


def test_bus_accepts_memory_and_nats_urls() -> None:
    """The bus is 'memory', a nats:// or tls:// URL, or several of them comma-separated."""
    for bus in ("memory", "nats://127.0.0.1:4222", "tls://nats.example:4222", "nats://a:1,nats://b:2"):
        assert load_settings(None, {"NEXUS_BUS": bus}, {}).bus == bus


FILE = "config file"


@pytest.mark.parametrize(
    ("toml", "env", "flags", "field", "source", "detail"),
    [
        ("grpc_prot = 1", {}, {}, "grpc_prot", FILE, "did you mean 'grpc_port'"),
        ('grpc_port = "50051"', {}, {}, "grpc_port", FILE, "must be an integer"),
        ("grpc_port = true", {}, {}, "grpc_port", FILE, "must be an integer"),
        ("", {"NEXUS_GRPC_PORT": "70000"}, {}, "grpc_port", "environment variable NEXUS_GRPC_PORT", "65535"),
        ("", {"NEXUS_GRPC_PORT": "fast"}, {}, "grpc_port", "environment variable NEXUS_GRPC_PORT", "integer"),
        ("", {}, {"ws_port": -1}, "ws_port", "flag --ws-port", "from 0 to 65535"),
        ("ws_port = 65536", {}, {}, "ws_port", FILE, "from 0 to 65535"),
        ("", {"NEXUS_HEARTBEAT_INTERVAL": "0"}, {}, "heartbeat_interval", "NEXUS_HEARTBEAT_INTERVAL", "positive"),
        ("heartbeat_interval = -1", {}, {}, "heartbeat_interval", FILE, "positive"),
        ("", {}, {"heartbeat_interval": float("nan")}, "heartbeat_interval", "flag --heartbeat-interval", "finite"),
        ("stream_timeout = -5", {}, {}, "stream_timeout", FILE, "'none' for no timeout"),
        ('stream_timeout = "soon"', {}, {}, "stream_timeout", FILE, "'none' for no timeout"),
        ("", {}, {"buffer_size": 0}, "buffer_size", "flag --buffer-size", "at least 1"),
        ("", {"NEXUS_DEDUPE_WINDOW_S": "-1"}, {}, "dedupe_window_s", "NEXUS_DEDUPE_WINDOW_S", "0 or more"),
        ("", {}, {"bus": "redis://127.0.0.1"}, "bus", "flag --bus", "scheme 'redis'"),
        ("", {"NEXUS_BUS": "nats://"}, {}, "bus", "environment variable NEXUS_BUS", "no host"),
        ('bus = "127.0.0.1:4222"', {}, {}, "bus", FILE, "nats://"),
        ('log_format = "xml"', {}, {}, "log_format", FILE, "auto, json, console"),
        ("", {"NEXUS_LOG_LEVEL": "loud"}, {}, "log_level", "environment variable NEXUS_LOG_LEVEL", "debug"),
        ("", {"NEXUS_LOAD_ENTRY_POINTS": "maybe"}, {}, "load_entry_points", "NEXUS_LOAD_ENTRY_POINTS", "true"),
        ("gateway = 1", {}, {}, "gateway", FILE, "true or false"),
        ('handlers = "pkg.mod:Cls"', {}, {}, "handlers", FILE, "list of strings"),
        ("handlers = [1]", {}, {}, "handlers", FILE, "must be a string"),
        ("", {"NEXUS_HANDLERS": "pkg.mod"}, {}, "handlers", "environment variable NEXUS_HANDLERS", "module:Class"),
        ("", {}, {"streaming_rules": ["bogus"]}, "streaming_rules", "flag --streaming-rules", "invalid streaming"),
        ('host = ""', {}, {}, "host", FILE, "host name"),
        ("handler_config = {}", {}, {}, "handler_config", FILE, "[handlers.<name>]"),
        ("", {"NEXUS_HANDLER_CONFIG": "[1]"}, {}, "handler_config", "NEXUS_HANDLER_CONFIG", "handler names"),
        ("", {}, {"grpc_prot": 1}, "grpc_prot", "flag --grpc-prot", "did you mean 'grpc_port'"),
        ('nats_stream = "a.b"', {}, {}, "nats_stream", FILE, "stream name"),
        ("", {"NEXUS_NATS_SUBJECT_PREFIX": "a.>"}, {}, "nats_subject_prefix", "NEXUS_NATS_SUBJECT_PREFIX", "prefix"),
        ("", {}, {"nats_retention": "workqueue"}, "nats_retention", "flag --nats-retention", "no overlapping"),
        ("nats_replicas = 7", {}, {}, "nats_replicas", FILE, "from 1 to 5"),
        ("", {}, {"nats_storage": "disk"}, "nats_storage", "flag --nats-storage", "file, memory"),
        ("", {"NEXUS_NATS_ACK_TIMEOUT_S": "0"}, {}, "nats_ack_timeout_s", "NEXUS_NATS_ACK_TIMEOUT_S", "positive"),
        ('data_dir = ""', {}, {}, "data_dir", FILE, "directory path"),
        ("", {"NEXUS_DATA_DIR": __file__}, {}, "data_dir", "NEXUS_DATA_DIR", "got the file"),
        ('kv_bucket = "a.b"', {}, {}, "kv_bucket", FILE, "letters, digits"),
        ("kv_max_value_bytes = 0", {}, {}, "kv_max_value_bytes", FILE, "from 1"),
        ("", {}, {"kv_max_keys": 0}, "kv_max_keys", "flag --kv-max-keys", "at least 1"),
    ],
)
def test_validation_errors_name_field_and_source(
    tmp_path: Path,
    toml: str,
    env: dict[str, str],
    flags: dict[str, Any],
    field: str,
    source: str,
    detail: str,
) -> None:
    """A bad value raises ConfigError whose message names the field, the source and what is expected."""
    path = write_config(tmp_path, f"[nexus]\n{toml}\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, env, flags)

    error = caught.value
    assert error.field == field
    assert source in error.source
    message = str(error)
    assert field in message
    assert source in message
    assert detail in message
    if error.source.startswith(FILE):
        assert path in message


def test_config_error_is_a_value_error() -> None:
    """ConfigError subclasses ValueError, so callers that catch ValueError also see it."""
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("text", "field", "detail"),
    [
        ("[server]\nport = 1\n", "server", "unknown top-level key"),
        ("nexus = 1\n", "nexus", "must be a table"),
        ("[handlers]\ncountdown = 1\n", "handlers", "'countdown' must be a table"),
        ("[nexus\n", None, "not valid TOML"),
    ],
)
def test_file_structure_errors(tmp_path: Path, text: str, field: str | None, detail: str) -> None:
    """Unknown tables, non-table sections and TOML syntax errors name the file."""
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError, match="config file") as caught:
        load_settings(path, {}, {})

    assert caught.value.field == field
    assert detail in str(caught.value)
    assert path in str(caught.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    """A config path that does not exist raises ConfigError naming it."""
    missing = str(tmp_path / "absent.toml")

    with pytest.raises(ConfigError, match="no such file") as caught:
        load_settings(None, {"NEXUS_CONFIG": missing}, {})

    assert missing in str(caught.value)


def test_provider_settings_carry_the_stream_fields() -> None:
    """provider_settings() copies the fields that drive handlers into ProviderSettings."""
    settings = Settings(
        heartbeat_interval=0.25,
        stream_timeout=None,
        buffer_size=7,
        max_payload_bytes=2048,
        streaming_rules=["action:tail"],
        shutdown_grace_s=1.5,
    )

    assert settings.provider_settings() == ProviderSettings(
        heartbeat_interval=0.25,
        stream_timeout=None,
        buffer_size=7,
        max_payload_bytes=2048,
        streaming_rules=("action:tail",),
        shutdown_grace_s=1.5,
    )
