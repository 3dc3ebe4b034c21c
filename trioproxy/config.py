"""One frozen ``Settings`` object, from defaults, an optional TOML file, ``TRIOPROXY_*``
environment variables and CLI flags (later sources win, in that order).

Every option is an attrs field whose metadata carries its help text; the environment
variable is ``TRIOPROXY_<FIELD NAME IN UPPER CASE>``, the TOML key is the field name and
the CLI flag is ``--field-name``. The README documents each one (a test enforces it).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from trioproxy.protocol.requests import parse_aliases

ENV_PREFIX = "TRIOPROXY_"
#: the HTTP servers ``serve`` can run the proxy on (``server.py``)
SERVERS = ("trioproxy", "hypercorn")


class ConfigError(ValueError):
    """A configuration value could not be used; the message names the option."""


def _opt(default: Any, help: str) -> Any:
    return attrs.field(default=default, metadata={"help": help})


@attrs.frozen
class Settings:
    """Process-wide configuration. Build it with :func:`load_settings`."""

    host: str = _opt("127.0.0.1", "Address to listen on.")
    port: int = _opt(2455, "Port to listen on.")
    server: str = _opt(
        "trioproxy",
        "HTTP server: trioproxy (its own HTTP/1.1 + WebSocket server, fastest) or hypercorn (adds TLS, HTTP/2 and h2c).",
    )
    certfile: str = _opt(
        "", "TLS certificate chain (PEM) to serve https; needs server hypercorn and keyfile."
    )
    keyfile: str = _opt("", "Private key (PEM) of certfile.")
    data_dir: Path = _opt(Path("./var"), "Folder for the embedded store, keys and other state.")
    database_url: str = _opt(
        "", "SQLAlchemy URL of the store; empty means SQLite at DATA_DIR/trioproxy.db."
    )
    model_aliases: str = _opt(
        "",
        "Model names of your own, comma-separated NAME=MODEL or NAME=MODEL:EFFORT: a request for NAME (on every route) goes upstream for MODEL, with that reasoning effort when given.",
    )
    replica_name: str = _opt(
        "",
        "Name of this process among replicas sharing one database (its budget counters and leases are kept under it); empty means the host name.",
    )
    lease_term: float = _opt(
        15.0,
        "With PostgreSQL: seconds a replica's lease on the jobs one replica does for all (usage polling, model lists, alerts) lasts; renewed every third of it, taken over within 4/3 of it when its holder dies.",
    )
    durable_chain_ttl: float = _opt(
        86400.0,
        "With PostgreSQL: seconds a conversation's response chain is kept in the database after its last turn, so another replica can re-anchor it; 0 turns durable chains off.",
    )
    durable_chain_max_bytes: int = _opt(
        16 * 1024 * 1024,
        "With PostgreSQL: compressed bytes of one conversation's chain kept in the database (oldest turns dropped first).",
    )
    durable_chain_total_max_bytes: int = _opt(
        2 * 1024 * 1024 * 1024,
        "With PostgreSQL: compressed bytes of all conversations' chains kept in the database (least recently used conversations dropped first).",
    )
    upstream_base_url: str = _opt(
        "https://chatgpt.com/backend-api",
        "ChatGPT backend base URL; the proxy appends /codex/responses, /codex/models, /wham/usage.",
    )
    auth_base_url: str = _opt(
        "https://auth.openai.com",
        "OAuth server; token refresh is POST {AUTH_BASE_URL}/oauth/token.",
    )
    login_callback_port: int = _opt(
        1455,
        "Loopback port of a browser login's callback listener (the Codex CLI's; the auth server only redirects to the ports it knows). 0 picks a free port.",
    )
    login_timeout: float = _opt(
        900.0,
        "Seconds a login (device or browser) may stay unfinished before it expires (at most 900, the device code's life).",
    )
    secret_key: str = _opt(
        "",
        "Key that encrypts tokens at rest; empty means one generated into DATA_DIR/secret.key (mode 0600).",
    )
    routing_strategy: str = _opt(
        "headroom",
        "Account choice: headroom (most quota left, sticky by session), reset_drain (soonest window reset first, sticky), round_robin, fill_first.",
    )
    max_failover_attempts: int = _opt(
        3, "Accounts tried for one request before the client gets the last upstream error."
    )
    upstream_connect_timeout: float = _opt(
        10.0, "Seconds to connect to upstream (HTTP or WebSocket)."
    )
    upstream_read_timeout: float = _opt(
        600.0, "Longest upstream silence tolerated inside a stream, seconds."
    )
    upstream_max_connections: int = _opt(2000, "Pooled upstream HTTP connections (all accounts).")
    keepalive_interval: float = _opt(
        15.0,
        "Seconds of upstream silence before response.created after which SSE keep-alives are sent.",
    )
    preamble_hold: float = _opt(
        7.5,
        "Longest time upstream's preamble (response.created, response.in_progress, rate limits) is held back waiting for the first output event, so that an error in its place fails over to another account; at most half keepalive_interval; 0: never held (such errors are relayed).",
    )
    max_body_bytes: int = _opt(
        128 * 1024 * 1024, "Largest request body or WebSocket message accepted, bytes."
    )
    ws_idle_timeout: float = _opt(
        120.0,
        "Seconds a downstream WebSocket may stay without a request in flight before it is closed.",
    )
    upstream_ws_max_age: float = _opt(
        3300.0,
        "Seconds after which an upstream WebSocket is replaced between turns (upstream closes at 60 min).",
    )
    reanchor_max_bytes: int = _opt(
        16 * 1024 * 1024,
        "Conversation kept per session for re-anchoring, bytes of memory held (oldest turns forgotten first).",
    )
    reanchor_total_max_bytes: int = _opt(
        256 * 1024 * 1024,
        "Conversation memory for re-anchoring across all sessions, bytes of memory held (least recently used conversations forget first).",
    )
    account_max_streams: int = _opt(
        0, "Responses in flight at once per account (HTTP and WebSocket); 0 means no cap."
    )
    account_max_creates: int = _opt(
        0,
        "response.create requests per account waiting for response.created at once; 0 means no cap.",
    )
    account_cap_wait: float = _opt(
        5.0,
        "Seconds a turn waits for a slot of a capped account when no other account can take it; 0 fails fast.",
    )
    bridge_max_sessions: int = _opt(
        256,
        "HTTP bridge sessions (pooled upstream WebSockets for HTTP conversations) kept at once; 0 turns the bridge off.",
    )
    bridge_queue_limit: int = _opt(
        4, "HTTP requests that may wait for their turn on one bridge session."
    )
    bridge_idle_ttl: float = _opt(
        300.0, "Seconds a bridge session may stay without a request before it is closed."
    )
    usage_flush_interval: float = _opt(
        1.0,
        "Seconds between writes of usage and key budget counters to the store (a process killed outright loses at most this much counting).",
    )
    prices: str = _opt(
        "",
        "Price entries added to (or replacing) the shipped table, model=input/cached_input/output in US dollars per million tokens, comma-separated.",
    )
    request_log_retention_days: float = _opt(
        30.0,
        "Days the raw request log is kept (hourly usage is kept); 0 keeps it forever.",
    )
    refresh_cooldown: float = _opt(
        30.0, "Seconds a transient token-refresh failure is remembered before trying again."
    )
    stalled_client_timeout: float = _opt(
        60.0, "Seconds after which a client that stops reading (but keeps its socket) is cut off."
    )
    request_memory_limit: int = _opt(
        0,
        "Request bodies (and what parsing them costs) and WebSocket messages held in memory at once, bytes; past it requests get 429 (0: an eighth of the memory available, at most 1 GiB).",
    )
    head_timeout: float = _opt(
        10.0,
        "Seconds a client has to send a whole request head (or WebSocket handshake); past it 408.",
    )
    body_min_rate: int = _opt(
        1024,
        "Slowest request body accepted, bytes per second on average after body_min_rate_grace; slower gets 408 (0: no floor).",
    )
    body_min_rate_grace: float = _opt(
        10.0, "Seconds a request body may take before body_min_rate applies."
    )
    max_header_count: int = _opt(100, "Most headers a request may have; more gets 431.")
    ws_ping_interval: float = _opt(
        20.0,
        "Seconds a downstream WebSocket may be silent before the proxy pings it (0: never).",
    )
    ws_ping_timeout: float = _opt(
        20.0, "Seconds a pinged downstream WebSocket has to answer before it is closed (1011)."
    )
    drain_timeout: float = _opt(
        30.0, "On SIGTERM, seconds in-flight requests get to finish before they are closed."
    )
    drain_grace: float = _opt(
        0.0,
        "On SIGTERM, seconds between readiness going false and the drain proper (new requests refused, sessions closed after their turn, the listener closed); requests are served as usual meanwhile (for load balancers).",
    )
    allow_remote_without_keys: bool = _opt(
        False, "Listen on a non-loopback address even when no API key exists (anyone may use it)."
    )
    allowed_hosts: str = _opt(
        "",
        "Host names clients may address (comma list, besides the loopback names and the listen address); * accepts any.",
    )
    allowed_origins: str = _opt(
        "",
        "Browser origins allowed to call the proxy (comma list of scheme://host[:port], besides the proxy's own); * accepts any.",
    )
    trusted_proxies: str = _opt(
        "",
        "Reverse proxies whose Forwarded / X-Forwarded-For / X-Forwarded-Proto headers are believed (comma list of addresses or networks).",
    )
    lane_proxy_http_limit: int = _opt(
        1000, "Concurrent proxied HTTP requests; more are answered 429 proxy_overloaded."
    )
    lane_proxy_http_wait: float = _opt(
        0.0, "Seconds a proxied HTTP request waits for a slot before 429 (0: at once)."
    )
    lane_proxy_websocket_limit: int = _opt(
        500, "Concurrent downstream WebSocket sessions; more upgrades get 429 before the handshake."
    )
    lane_proxy_websocket_wait: float = _opt(
        0.0, "Seconds an upgrade waits for a WebSocket slot before 429."
    )
    lane_compact_limit: int = _opt(
        32, "Concurrent compaction requests (POST .../responses/compact)."
    )
    lane_compact_wait: float = _opt(
        0.0, "Seconds a compaction request waits for a slot before 429."
    )
    lane_dashboard_limit: int = _opt(
        32,
        "Concurrent management API requests (a lane of their own, reachable while proxy lanes are full).",
    )
    lane_dashboard_wait: float = _opt(
        2.0, "Seconds a management request waits for a slot before 429."
    )
    work_refresh_limit: int = _opt(4, "Concurrent token refreshes (all accounts).")
    work_connect_limit: int = _opt(32, "Concurrent upstream WebSocket connects (all accounts).")
    work_create_limit: int = _opt(
        256,
        "Requests sent upstream and not yet answered by their first event, all accounts together.",
    )
    overload_retry_after: int = _opt(2, "Retry-After seconds of a 429 proxy_overloaded answer.")
    usage_poll_interval: float = _opt(
        300.0,
        "Seconds between polls of each account's GET /wham/usage (jittered; 0 turns polling off).",
    )
    usage_poll_concurrency: int = _opt(4, "Usage polls in flight at once (all accounts).")
    usage_poll_max_cooldown: float = _opt(
        3600.0, "Longest pause of an account's usage polls after repeated 401s, seconds."
    )
    models_refresh_interval: float = _opt(
        900.0, "Seconds between refreshes of the model registry from GET /codex/models."
    )
    alert_webhook_url: str = _opt(
        "",
        "URL that receives a JSON POST per alert (account/pool exhausted, recovered, ...); empty: none.",
    )
    alert_timeout: float = _opt(5.0, "Seconds one alert delivery attempt may take.")
    alert_queue_size: int = _opt(
        256, "Alerts kept while the webhook is slow or down; the oldest are dropped beyond it."
    )
    log_level: str = _opt("info", "Log level: debug, info, warning, error.")
    log_format: str = _opt(
        "auto", "Log format: json, console, or auto (console on a terminal, json otherwise)."
    )

    @property
    def resolved_replica_name(self) -> str:
        """This process's name among replicas (``replica_name``, else the host name)."""
        return self.replica_name or socket.gethostname()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'trioproxy.db').resolve()}"


def option_names() -> list[str]:
    return [f.name for f in attrs.fields(Settings)]


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper()


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in attrs.fields(Settings)}


def _convert(option: str, raw: object) -> object:
    kind = attrs.fields_dict(Settings)[option].type
    try:
        if kind in (int, "int"):
            if isinstance(raw, bool):
                raise ValueError("a boolean is not an integer")
            return int(raw)  # type: ignore[call-overload]
        if kind in (float, "float"):
            return float(raw)  # type: ignore[arg-type]
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind in (Path, "Path"):
            return Path(str(raw))
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"option {option} ({env_name(option)}): {exc}") from None


def _validate(settings: Settings) -> None:
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"option port: {settings.port} is not a TCP port")
    if not 0 <= settings.login_callback_port <= 65535:
        raise ConfigError(
            f"option login_callback_port: {settings.login_callback_port} is not a TCP port"
        )
    if not 0 < settings.login_timeout <= 900:
        raise ConfigError("option login_timeout: must be more than 0 and at most 900 seconds")
    if settings.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"option log_level: unknown level {settings.log_level!r}")
    if settings.routing_strategy not in ("headroom", "reset_drain", "round_robin", "fill_first"):
        raise ConfigError(
            f"option routing_strategy: unknown strategy {settings.routing_strategy!r}"
        )
    if not 0.05 <= settings.usage_flush_interval <= 60:
        raise ConfigError("option usage_flush_interval: must be from 0.05 to 60 seconds")
    try:
        parse_aliases(settings.model_aliases)
    except ValueError as exc:
        raise ConfigError(f"option model_aliases: {exc}") from None
    if not 1.0 <= settings.lease_term <= 600:
        raise ConfigError("option lease_term: must be from 1 to 600 seconds")
    for option in ("durable_chain_ttl", "durable_chain_max_bytes", "durable_chain_total_max_bytes"):
        if getattr(settings, option) < 0:
            raise ConfigError(f"option {option}: must be >= 0")
    if settings.request_log_retention_days < 0:
        raise ConfigError("option request_log_retention_days: must be >= 0")
    if settings.max_failover_attempts < 1:
        raise ConfigError("option max_failover_attempts: must be at least 1")
    if settings.usage_poll_concurrency < 1:
        raise ConfigError("option usage_poll_concurrency: must be at least 1")
    if settings.alert_queue_size < 1:
        raise ConfigError("option alert_queue_size: must be at least 1")
    if settings.alert_webhook_url and not settings.alert_webhook_url.startswith(
        ("http://", "https://")
    ):
        raise ConfigError("option alert_webhook_url: must be an http:// or https:// URL")
    if settings.account_max_streams < 0 or settings.account_max_creates < 0:
        raise ConfigError("options account_max_streams and account_max_creates must be >= 0")
    if settings.bridge_max_sessions < 0 or settings.bridge_queue_limit < 1:
        raise ConfigError(
            "options bridge_max_sessions (>= 0) and bridge_queue_limit (>= 1) out of range"
        )
    if settings.log_format not in ("auto", "json", "console"):
        raise ConfigError(f"option log_format: unknown format {settings.log_format!r}")
    if settings.server not in SERVERS:
        raise ConfigError(
            f"option server: unknown server {settings.server!r} (one of {', '.join(SERVERS)})"
        )
    if bool(settings.certfile) != bool(settings.keyfile):
        raise ConfigError("options certfile and keyfile: TLS needs both")
    if settings.certfile and settings.server != "hypercorn":
        raise ConfigError(
            "option certfile: TLS needs --server hypercorn (trioproxy's own server speaks plain "
            "HTTP/1.1; or terminate TLS in a reverse proxy in front of it)"
        )
    for network in split_list(settings.trusted_proxies):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"option trusted_proxies: {network!r} is not an address or network"
            ) from None
    for origin in split_list(settings.allowed_origins):
        if origin != "*" and "://" not in origin:
            raise ConfigError(
                f"option allowed_origins: {origin!r} is not an origin (scheme://host[:port])"
            )


def split_list(value: str) -> list[str]:
    """The items of a comma-separated option."""
    return [item.strip() for item in value.split(",") if item.strip()]


def load_settings(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Merge defaults < TOML file < environment < explicit overrides (CLI flags).

    Unknown TOML keys and unknown ``TRIOPROXY_*`` variables are errors, so a typo is never
    silently ignored.
    """
    environ = os.environ if environ is None else environ
    names = set(option_names())
    values: dict[str, object] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        section = data.get("trioproxy", data)
        for key, raw in section.items():
            if key not in names:
                raise ConfigError(f"config file {config_file}: unknown option {key!r}")
            values[key] = _convert(key, raw)
    known_env = {env_name(n): n for n in names}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        if var not in known_env:
            if var in _NON_SETTING_ENV:
                continue
            raise ConfigError(f"unknown environment variable {var}")
        values[known_env[var]] = _convert(known_env[var], raw)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in names:
            raise ConfigError(f"unknown option {key!r}")
        values[key] = _convert(key, raw)
    settings = Settings(**values)  # type: ignore[arg-type]
    _validate(settings)
    return settings


# Variables with the prefix that are not Settings fields (read by other parts, e.g. tests).
_NON_SETTING_ENV = frozenset({"TRIOPROXY_CODEX_CACHE"})
