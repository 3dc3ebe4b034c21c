"""Install and drive the real Codex CLI (`@openai/codex`) from the test suite.

This is a support module, not a test file. It provides:

* `codex_binary()` - the native `codex` executable of `@openai/codex@CODEX_VERSION`, installed
  with npm into a cache folder on first use (``$TRIOPROXY_CODEX_CACHE`` or
  ``<repo>/.cache/codex-cli``).
* `write_codex_home()` plus `builtin_config()` / `custom_provider_config()` - a throwaway
  ``CODEX_HOME`` pointing the CLI at a local server, with everything that would reach another
  host (update check, analytics, feedback, OTEL/statsig, plugin and app discovery) switched off.
* `fake_auth_json()` / `fake_chatgpt_tokens()` / `unsigned_jwt()` - ChatGPT-mode credentials
  the CLI accepts without any signature check.
* `run_codex_exec()` - ``codex exec`` under `trio.run_process`, returning a `CodexResult`.

Theory of operation
-------------------
The npm package is only a JS shim that finds the platform binary in an optional dependency
(``@openai/codex-linux-x64`` ...). On Node < 22 the shim *spawns* the binary instead of
``execve``-ing it, so killing the shim on a timeout would orphan the real process. We therefore
run the native binary directly; it finds its bundled resources (bubblewrap, rg) next to itself.

The built-in provider (`builtin_config`) is the first-party code path: WebSocket first, zstd request
bodies, workspace routing through ``{chatgpt_base_url}/wham/accounts/check``. Its retry budget
is fixed (4 request retries x 5 stream retries): ``[model_providers.openai]`` is rejected by
0.169.0. A custom provider (`custom_provider_config`) takes ``request_max_retries`` /
``stream_max_retries``; naming it ``"OpenAI"`` turns on the first-party behaviour as well.

Every config key written here was checked against 0.169.0 with ``codex exec --strict-config``.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from tests.npm_support import install_lock, npm_install

__all__ = [
    "CODEX_VERSION",
    "CodexResult",
    "CodexTimeoutError",
    "builtin_config",
    "codex_binary",
    "codex_binary_async",
    "codex_cache_dir",
    "custom_provider_config",
    "fake_auth_json",
    "fake_chatgpt_tokens",
    "hermetic_config",
    "run_codex_exec",
    "unsigned_jwt",
    "write_codex_home",
]

CODEX_VERSION = "0.169.0"
CODEX_PACKAGE = "@openai/codex"

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Refresh/revoke go to auth.openai.com unless overridden; point them at a closed loopback port so
# a test can never leave the machine by accident (pass your own value in ``env`` to test refresh).
DEAD_LOOPBACK_URL = "http://127.0.0.1:9/unreachable"

# (sys.platform, machine) -> (npm optional-dependency alias, Rust target triple)
_PLATFORM_PACKAGES: dict[tuple[str, str], tuple[str, str]] = {
    ("linux", "x86_64"): ("@openai/codex-linux-x64", "x86_64-unknown-linux-musl"),
    ("linux", "amd64"): ("@openai/codex-linux-x64", "x86_64-unknown-linux-musl"),
    ("linux", "aarch64"): ("@openai/codex-linux-arm64", "aarch64-unknown-linux-musl"),
    ("linux", "arm64"): ("@openai/codex-linux-arm64", "aarch64-unknown-linux-musl"),
    ("darwin", "x86_64"): ("@openai/codex-darwin-x64", "x86_64-apple-darwin"),
    ("darwin", "arm64"): ("@openai/codex-darwin-arm64", "aarch64-apple-darwin"),
}

# Environment variables of the developer's shell that would change what the CLI does.
_STRIPPED_ENV_PREFIXES = ("CODEX_", "OPENAI_")
_STRIPPED_ENV_NAMES = frozenset(
    {
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "RUST_LOG", "RUST_BACKTRACE",
    }
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Installation


def codex_cache_dir() -> pathlib.Path:
    """The npm prefix holding the CLI: ``$TRIOPROXY_CODEX_CACHE`` or ``<repo>/.cache/codex-cli``."""
    override = os.environ.get("TRIOPROXY_CODEX_CACHE")
    if override:
        return pathlib.Path(override).expanduser().resolve()
    return REPO_ROOT / ".cache" / "codex-cli"


def _native_binary_path(cache: pathlib.Path) -> pathlib.Path | None:
    key = (sys.platform, platform.machine().lower())
    if key not in _PLATFORM_PACKAGES:
        return None
    package, triple = _PLATFORM_PACKAGES[key]
    return cache / "node_modules" / package / "vendor" / triple / "bin" / "codex"


def _shim_path(cache: pathlib.Path) -> pathlib.Path:
    return cache / "node_modules" / ".bin" / "codex"


def _reported_version(binary: pathlib.Path) -> str | None:
    """``codex --version`` output (``codex-cli 0.169.0``), or None if it does not run."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip()


def _usable_binary(cache: pathlib.Path) -> pathlib.Path | None:
    """The installed binary if it reports exactly CODEX_VERSION; native binary preferred."""
    expected = f"codex-cli {CODEX_VERSION}"
    native = _native_binary_path(cache)
    for candidate in (native, _shim_path(cache)):
        if (
            candidate is not None
            and candidate.is_file()
            and _reported_version(candidate) == expected
        ):
            return candidate
    return None


def _npm_install(cache: pathlib.Path) -> None:
    npm_install(cache, CODEX_PACKAGE, CODEX_VERSION, what="Codex CLI")


def _install_locked(cache: pathlib.Path) -> pathlib.Path:
    """Install under an exclusive file lock, so parallel test processes install once."""
    with install_lock(cache):
        binary = _usable_binary(cache)
        if binary is None:
            _npm_install(cache)
            binary = _usable_binary(cache)
        if binary is None:
            found = [
                f"{p}: {_reported_version(p)!r}"
                for p in (_native_binary_path(cache), _shim_path(cache))
                if p is not None and p.exists()
            ]
            raise RuntimeError(
                f"npm installed {CODEX_PACKAGE}@{CODEX_VERSION} into {cache}, but no executable "
                f"there reports 'codex-cli {CODEX_VERSION}' (found: {found or 'nothing'}; "
                f"platform {sys.platform}/{platform.machine()})."
            )
        return binary


_binary_lock = threading.Lock()
_binary_cache: dict[pathlib.Path, pathlib.Path] = {}


def codex_binary() -> pathlib.Path:
    """Path of the Codex CLI ``CODEX_VERSION`` executable, installing it with npm if missing.

    Prefers the native binary over the ``node_modules/.bin/codex`` JS shim. The result is cached
    per cache folder for the life of the process, so calling this often is cheap.

    Error handling: raises `RuntimeError` (with npm's output) when npm is missing, the install
    fails, or the installed binary reports another version. Tests should let it propagate and
    fail; they must not skip.

    Blocking (runs npm): from async code prefer `codex_binary_async`.
    """
    cache = codex_cache_dir()
    with _binary_lock:
        binary = _binary_cache.get(cache)
        if binary is None:
            binary = _usable_binary(cache) or _install_locked(cache)
            _binary_cache[cache] = binary
        return binary


async def codex_binary_async() -> pathlib.Path:
    """`codex_binary` in a worker thread, so a first-time npm install does not block trio."""
    return await trio.to_thread.run_sync(codex_binary)


# --------------------------------------------------------------------------------------------
# Credentials


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# 0.169.0 rejects a JWT whose third segment is empty ("invalid credential JSON" for the whole
# auth.json, after which `codex exec` silently runs with no auth), so the fake carries a dummy one.
_FAKE_SIGNATURE = _b64url(b"not-a-signature")


def unsigned_jwt(claims: Mapping[str, object]) -> str:
    """A JWT nobody checks: ``alg: none`` header, ``claims`` payload, dummy signature segment.

    The CLI parses the payload without verifying anything, but requires three non-empty segments.
    """
    header = {"alg": "none", "typ": "JWT"}
    parts = (json.dumps(part, separators=(",", ":")).encode() for part in (header, claims))
    return ".".join([*(_b64url(p) for p in parts), _FAKE_SIGNATURE])


def fake_chatgpt_tokens(
    *,
    account_id: str,
    email: str = "codex-test@example.com",
    plan_type: str = "plus",
    user_id: str = "user-fake-1",
    issued_at: int | None = None,
    expires_in: int = 3600,
) -> dict[str, str]:
    """``id_token`` and ``access_token`` JWTs with the claims the CLI reads (protocol doc, s. 5).

    ``issued_at`` is a Unix time in seconds (default: now, wall clock - the CLI compares ``exp``
    with its own wall clock); both tokens expire ``expires_in`` seconds later. An ``exp`` in the
    past makes the CLI call the refresh URL (see `codex_env`) before requests; if that fails it
    still sends the expired token.
    Returns a dict with ``id_token``, ``access_token``, ``refresh_token``, ``account_id``.
    """
    if issued_at is None:
        issued_at = int(time.time())
    auth_claims = {
        "chatgpt_account_id": account_id,
        "chatgpt_plan_type": plan_type,
        "chatgpt_user_id": user_id,
        "user_id": user_id,
    }
    common = {"iss": "https://auth.openai.com", "iat": issued_at, "exp": issued_at + expires_in}
    id_token = unsigned_jwt(
        {
            **common,
            "aud": ["app_EMoamEEZ73f0CkXaXp7hrann"],
            "sub": user_id,
            "email": email,
            "email_verified": True,
            "https://api.openai.com/auth": auth_claims,
        }
    )
    access_token = unsigned_jwt(
        {
            **common,
            "aud": ["https://api.openai.com/v1"],
            "sub": user_id,
            "https://api.openai.com/auth": auth_claims,
            "https://api.openai.com/profile": {"email": email, "email_verified": True},
        }
    )
    return {
        "id_token": id_token,
        "access_token": access_token,
        "refresh_token": f"rt-fake-{account_id}",
        "account_id": account_id,
    }


def fake_auth_json(
    *,
    access_token: str,
    refresh_token: str,
    id_token: str,
    account_id: str,
    last_refresh: str | None = None,
) -> dict[str, object]:
    """The ``$CODEX_HOME/auth.json`` document of a ChatGPT login (protocol doc, s. 5).

    ``last_refresh`` is an RFC 3339 UTC time (``2026-11-21T09:44:06.123456Z``); the CLI refreshes
    proactively when it is more than 8 days old, so leave it None only if the access token's
    ``exp`` alone should decide (None is written as JSON null).
    """
    return {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": id_token,
            "access_token": access_token,
            "refresh_token": refresh_token,
            "account_id": account_id,
        },
        "last_refresh": last_refresh,
    }


# --------------------------------------------------------------------------------------------
# CODEX_HOME and config.toml


def _toml_str(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def hermetic_config() -> str:
    """config.toml lines that keep the CLI on loopback and quick to start.

    * ``check_for_update_on_startup`` - no release check.
    * ``[analytics]``, ``[feedback]`` - no analytics/feedback uploads.
    * ``[otel]`` exporters ``none`` - no OTEL or statsig export.
    * ``[history] persistence = "none"`` - no history.jsonl.
    * ``allow_login_shell = false`` - model shell commands run as ``bash -c``, not ``bash -lc``,
      so the developer's login profile does not leak into command output.
    * ``[features]``: no plugin/app/connector discovery (``plugins``, ``apps``, ``remote_plugin``,
      ``tool_suggest``), no shell snapshot at startup, and ``unbounded_connection_retries = false``
      so an unreachable server fails the run instead of waiting "for network" forever.
    """
    return "\n".join(
        [
            "check_for_update_on_startup = false",
            "allow_login_shell = false",
            "",
            "[analytics]",
            "enabled = false",
            "",
            "[feedback]",
            "enabled = false",
            "",
            "[otel]",
            'exporter = "none"',
            'trace_exporter = "none"',
            'metrics_exporter = "none"',
            "",
            "[history]",
            'persistence = "none"',
            "",
            "[features]",
            "plugins = false",
            "apps = false",
            "remote_plugin = false",
            "tool_suggest = false",
            "shell_snapshot = false",
            "unbounded_connection_retries = false",
            "",
        ]
    )


def builtin_config(base_url: str, chatgpt_base_url: str, model: str = "gpt-5.5") -> str:
    """config.toml re-pointing the built-in ``openai`` provider (the first-party code path).

    ``base_url`` is the provider base, e.g. ``http://127.0.0.1:P/backend-api/codex``; the CLI
    uses ``{base_url}/responses`` (WebSocket first) and ``{base_url}/models``.
    ``chatgpt_base_url`` (``http://127.0.0.1:Q/backend-api/``) must be on a *different origin*
    than ``base_url``: workspace routing rewrites a provider on the chatgpt_base_url origin to the
    ``workspace_backend_origin`` from ``wham/accounts/check`` (protocol doc, s. 6.3). That
    endpoint must answer, or every turn fails. Retry counts cannot be changed for this provider.
    """
    if _origin(base_url) == _origin(chatgpt_base_url):
        raise ValueError(
            f"base_url {base_url!r} and chatgpt_base_url {chatgpt_base_url!r} share an origin; "
            "workspace routing would rewrite the provider URL to https://chatgpt.com"
        )
    top = "\n".join(
        [
            f"model = {_toml_str(model)}",
            f"openai_base_url = {_toml_str(base_url)}",
            f"chatgpt_base_url = {_toml_str(chatgpt_base_url)}",
            'cli_auth_credentials_store = "file"',
        ]
    )
    return top + "\n" + hermetic_config()


def custom_provider_config(
    base_url: str,
    *,
    websockets: bool,
    env_key: str | None = None,
    name: str = "trioproxy",
    model: str = "gpt-5.5",
    provider_id: str = "trioproxy",
    chatgpt_base_url: str | None = None,
    request_max_retries: int | None = None,
    stream_max_retries: int | None = None,
    stream_idle_timeout_ms: int | None = None,
    websocket_connect_timeout_ms: int | None = None,
    http_headers: Mapping[str, str] | None = None,
) -> str:
    """config.toml with a ``[model_providers.<provider_id>]`` entry (what proxy users write).

    ``requires_openai_auth = true`` (ChatGPT tokens from auth.json) unless ``env_key`` names an
    environment variable holding an API key (sent as ``Authorization: Bearer``). ``name="OpenAI"``
    switches on first-party behaviour (remote compaction v2, routing hint, workspace routing); any
    other name gets plain JSON bodies and local compaction. ``chatgpt_base_url`` defaults to
    ``base_url`` minus a trailing ``/codex`` so the CLI's side requests (``wham/*``) stay on
    loopback; with ``name="OpenAI"`` it must be given, on another origin (as in `builtin_config`).
    Retry/timeout knobs map 1:1 to the provider keys (0 retries = a single attempt): a custom
    provider with both retries at 0 fails a refused connection in under a second, with the
    defaults (4 and 5) in about 28 s.
    """
    if provider_id in {"openai", "ollama", "lmstudio", "amazon-bedrock"}:
        raise ValueError(f"{provider_id!r} is a reserved built-in provider id")
    if chatgpt_base_url is None:
        stripped = base_url.rstrip("/")
        chatgpt_base_url = stripped[: -len("/codex")] if stripped.endswith("/codex") else stripped
    if name == "OpenAI" and _origin(base_url) == _origin(chatgpt_base_url):
        # First-party workspace routing would rewrite the provider to https://chatgpt.com.
        raise ValueError(
            'a provider named "OpenAI" needs chatgpt_base_url on another origin than base_url'
        )
    lines = [
        f"model = {_toml_str(model)}",
        f"model_provider = {_toml_str(provider_id)}",
        f"chatgpt_base_url = {_toml_str(chatgpt_base_url)}",
        'cli_auth_credentials_store = "file"',
        hermetic_config(),
        f"[model_providers.{_toml_str(provider_id)}]",
        f"name = {_toml_str(name)}",
        f"base_url = {_toml_str(base_url)}",
        'wire_api = "responses"',
        f"supports_websockets = {_toml_bool(websockets)}",
    ]
    if env_key is None:
        lines.append("requires_openai_auth = true")
    else:
        lines.append(f"env_key = {_toml_str(env_key)}")
        lines.append("requires_openai_auth = false")
    knobs = {
        "request_max_retries": request_max_retries,
        "stream_max_retries": stream_max_retries,
        "stream_idle_timeout_ms": stream_idle_timeout_ms,
        "websocket_connect_timeout_ms": websocket_connect_timeout_ms,
    }
    for key, value in knobs.items():
        if value is not None:
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
            lines.append(f"{key} = {int(value)}")
    if http_headers:
        pairs = ", ".join(f"{_toml_str(k)} = {_toml_str(v)}" for k, v in http_headers.items())
        lines.append(f"http_headers = {{ {pairs} }}")
    return "\n".join(lines) + "\n"


def _toml_bool(value: bool) -> str:
    return "true" if value else "false"


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].lower()
    default_port = {"http": ":80", "https": ":443"}.get(scheme.lower(), "")
    if default_port and not host.rsplit("]", 1)[-1].count(":"):
        host += default_port
    return f"{scheme.lower()}://{host}"


def write_codex_home(
    home: pathlib.Path, *, auth: Mapping[str, object] | None, config_toml: str
) -> None:
    """Create ``home`` as a CODEX_HOME: ``config.toml`` and (if ``auth``) ``auth.json`` (0600).

    Both files are overwritten; other files the CLI left there (sessions, sqlite state) stay.
    """
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(config_toml, encoding="utf-8")
    auth_path = home / "auth.json"
    if auth is None:
        auth_path.unlink(missing_ok=True)
        return
    auth_path.write_text(json.dumps(auth, indent=2) + "\n", encoding="utf-8")
    auth_path.chmod(0o600)


# --------------------------------------------------------------------------------------------
# Running `codex exec`


@attrs.frozen
class CodexResult:
    """What one ``codex exec`` run produced.

    ``events`` are the ``--json`` JSONL events from stdout (``thread.started``, ``turn.started``,
    ``item.started``/``item.completed`` with ``item.type`` ``agent_message`` /
    ``command_execution`` / ``error`` ..., ``turn.completed`` or ``turn.failed``).
    ``final_message`` is the file written by ``--output-last-message``, else the last
    ``agent_message`` item; None when both are empty (a failed turn writes an empty file).
    ``duration`` is in trio clock seconds.
    """

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    final_message: str | None
    events: tuple[dict[str, Any], ...]
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def items(self, item_type: str) -> list[dict[str, Any]]:
        """Completed items of one type (``agent_message``, ``command_execution``, ``error``...)."""
        return [item for item in _completed_items(self.events) if item.get("type") == item_type]

    def error_messages(self) -> list[str]:
        """Messages of ``error`` / ``turn.failed`` events and ``error`` items, in order."""
        messages: list[str] = []
        for event in self.events:
            kind = event.get("type")
            if kind == "error" and isinstance(event.get("message"), str):
                messages.append(event["message"])
            elif kind == "turn.failed" and isinstance(event.get("error"), dict):
                messages.append(str(event["error"].get("message")))
        messages.extend(str(item.get("message")) for item in self.items("error"))
        return messages

    def describe(self) -> str:
        """A failure-message dump: argv, exit code, final message, stderr/stdout tails."""
        return (
            f"codex exec exited {self.returncode} after {self.duration:.1f}s\n"
            f"argv: {list(self.argv)}\nfinal_message: {self.final_message!r}\n"
            f"--- stderr (tail) ---\n{self.stderr[-6000:]}\n"
            f"--- stdout (tail) ---\n{self.stdout[-4000:]}"
        )


class CodexTimeoutError(trio.TooSlowError):
    """``codex exec`` did not finish in time; carries what it printed until it was killed."""

    def __init__(self, timeout: float, argv: Sequence[str], stdout: str, stderr: str) -> None:
        super().__init__(
            f"codex exec did not finish within {timeout}s\nargv: {list(argv)}\n"
            f"--- stderr (tail) ---\n{stderr[-6000:]}\n--- stdout (tail) ---\n{stdout[-3000:]}"
        )
        self.timeout = timeout
        self.argv = tuple(argv)
        self.stdout = stdout
        self.stderr = stderr


def codex_env(home: pathlib.Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child environment: ours minus CODEX_*/OPENAI_*/proxy vars, plus CODEX_HOME.

    ``NO_PROXY`` covers loopback; token refresh/revoke URLs point at a closed loopback port
    unless ``env`` sets ``CODEX_REFRESH_TOKEN_URL_OVERRIDE`` / ``CODEX_REVOKE_TOKEN_URL_OVERRIDE``.
    Entries of ``env`` win over everything.
    """
    child = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_STRIPPED_ENV_PREFIXES) and key not in _STRIPPED_ENV_NAMES
    }
    child.update(
        {
            "CODEX_HOME": str(home),
            "CODEX_REFRESH_TOKEN_URL_OVERRIDE": DEAD_LOOPBACK_URL,
            "CODEX_REVOKE_TOKEN_URL_OVERRIDE": DEAD_LOOPBACK_URL,
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
            "NO_COLOR": "1",
        }
    )
    if env:
        child.update(env)
    return child


# Model tool calls run with no approval prompt and no sandbox. `exec` already defaults to approval
# "never" and a read-only bubblewrap sandbox; the sandbox needs user namespaces (not available in
# every container) and adds noise to command output (e.g. tools failing to write under $HOME).
_PERMISSION_ARGS: tuple[str, ...] = ("--dangerously-bypass-approvals-and-sandbox",)

_run_counter = 0
_run_counter_lock = threading.Lock()


def _next_run_id() -> int:
    global _run_counter
    with _run_counter_lock:
        _run_counter += 1
        return _run_counter


def _parse_jsonl(text: str) -> tuple[dict[str, Any], ...]:
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            events.append(value)
    return tuple(events)


async def run_codex_exec(
    home: pathlib.Path,
    prompt: str,
    *,
    cwd: pathlib.Path,
    timeout: float = 120,  # noqa: ASYNC109 - the bound of a whole child process, as documented
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> CodexResult:
    """Run ``codex exec`` once with ``CODEX_HOME=home`` and return what it did.

    The command is ``codex exec --skip-git-repo-check --json --color never
    --output-last-message F --dangerously-bypass-approvals-and-sandbox -C cwd *extra_args -- prompt``
    with stdin from /dev/null. The bypass flag lets the model's ``exec_command`` calls run with no
    approval prompt and no sandbox (bubblewrap/landlock may be unavailable in containers).
    Write ``home`` first with `write_codex_home`.

    Resource handling: stdout/stderr go to files under ``home/exec-logs`` (kept for debugging),
    so a run killed by the timeout still reports what it printed. On cancellation trio sends
    SIGTERM, then SIGKILL after 5 s.

    Error handling: a non-zero exit is returned, not raised (check ``result.ok``); exceeding
    ``timeout`` seconds raises `CodexTimeoutError` (a `trio.TooSlowError`); a failed install
    raises `RuntimeError` from `codex_binary`.

    The timeout is measured on the trio clock: do not call this under
    ``MockClock(autojump_threshold=...)``, which would jump past it while the child runs.
    """
    binary = await codex_binary_async()
    run_id = _next_run_id()
    logs = home / "exec-logs"
    await trio.Path(logs).mkdir(parents=True, exist_ok=True)
    stem = f"run-{os.getpid()}-{run_id}"
    last_message_path = logs / f"{stem}.last-message.txt"
    stdout_path = logs / f"{stem}.stdout.jsonl"
    stderr_path = logs / f"{stem}.stderr.txt"
    argv = [
        str(binary), "exec",
        "--skip-git-repo-check",
        "--json",
        "--color", "never",
        "--output-last-message", str(last_message_path),
        *_PERMISSION_ARGS,
        "-C", str(cwd),
        *extra_args,
        "--", prompt,
    ]  # fmt: skip
    child_env = codex_env(home, env)
    started = trio.current_time()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:  # noqa: ASYNC230
        try:
            with trio.fail_after(timeout):
                proc = await trio.run_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=str(cwd),
                    env=child_env,
                    check=False,
                )
        except trio.TooSlowError:
            stdout_text = await trio.Path(stdout_path).read_text(errors="replace")
            stderr_text = await trio.Path(stderr_path).read_text(errors="replace")
            raise CodexTimeoutError(timeout, argv, stdout_text, stderr_text) from None
    duration = trio.current_time() - started
    stdout_text = await trio.Path(stdout_path).read_text(errors="replace")
    stderr_text = await trio.Path(stderr_path).read_text(errors="replace")
    events = _parse_jsonl(stdout_text)
    # --output-last-message is written even when the turn fails (then it is empty).
    final_message: str | None = None
    if await trio.Path(last_message_path).exists():
        final_message = await trio.Path(last_message_path).read_text(errors="replace") or None
    if final_message is None:
        final_message = _last_agent_message(events)
    return CodexResult(
        argv=tuple(argv),
        returncode=proc.returncode,
        stdout=stdout_text,
        stderr=stderr_text,
        final_message=final_message,
        events=events,
        duration=duration,
    )


def _completed_items(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        event["item"]
        for event in events
        if event.get("type") == "item.completed" and isinstance(event.get("item"), dict)
    ]


def _last_agent_message(events: Sequence[Mapping[str, Any]]) -> str | None:
    messages = [
        item["text"]
        for item in _completed_items(events)
        if item.get("type") == "agent_message" and isinstance(item.get("text"), str)
    ]
    return (str(messages[-1]) or None) if messages else None
