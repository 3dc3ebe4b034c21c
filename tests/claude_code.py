"""Install and drive the real Claude Code CLI (``@anthropic-ai/claude-code``) from the tests.

This is a support module, not a test file. It provides:

* `claude_binary()` / `claude_binary_async()` - the native ``claude`` executable of
  ``@anthropic-ai/claude-code@CLAUDE_CODE_VERSION``, installed with npm into a cache folder on
  first use (``$TRIOPROXY_CLAUDE_CODE_CACHE`` or ``<repo>/.cache/claude-code``).
* `claude_env()` - a hermetic child environment: a throwaway HOME and config dir, the API base
  URL and key, every switch that stops traffic to other hosts, the developer's
  ``ANTHROPIC_*``/``CLAUDE_*``/proxy variables removed.
* `run_claude_print()` - ``claude -p --output-format json`` under `trio.run_process` with a
  bounded time, returning a `ClaudeResult`.

Theory of operation
-------------------
The npm package is a wrapper whose postinstall copies the platform's native binary (an
optional dependency such as ``@anthropic-ai/claude-code-linux-x64``) over
``bin/claude.exe``; no Node.js process stays between us and the CLI, so a timeout kills the
CLI itself. If the postinstall did not run, the platform package's binary is used directly.

``ANTHROPIC_API_KEY`` is sent as ``x-api-key``; with it set, print mode never asks for a login.
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` turns off the auto-updater, telemetry, error
reporting and the feedback command in one go; the single switches are set as well, so a
release that splits them up keeps them off.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from tests.npm_support import install_lock, npm_install

__all__ = [
    "CLAUDE_CODE_PACKAGE",
    "CLAUDE_CODE_VERSION",
    "ClaudeResult",
    "ClaudeTimeoutError",
    "claude_binary",
    "claude_binary_async",
    "claude_code_cache_dir",
    "claude_env",
    "run_claude_print",
]

CLAUDE_CODE_VERSION = "2.1.332"
CLAUDE_CODE_PACKAGE = "@anthropic-ai/claude-code"

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# (sys.platform, machine) -> the npm optional dependency holding the native binary
_PLATFORM_PACKAGES: dict[tuple[str, str], str] = {
    ("linux", "x86_64"): "@anthropic-ai/claude-code-linux-x64",
    ("linux", "amd64"): "@anthropic-ai/claude-code-linux-x64",
    ("linux", "aarch64"): "@anthropic-ai/claude-code-linux-arm64",
    ("linux", "arm64"): "@anthropic-ai/claude-code-linux-arm64",
    ("darwin", "x86_64"): "@anthropic-ai/claude-code-darwin-x64",
    ("darwin", "arm64"): "@anthropic-ai/claude-code-darwin-arm64",
}

#: what keeps the CLI from reaching any host but the one ``ANTHROPIC_BASE_URL`` names
HERMETIC_ENV: dict[str, str] = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
    "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1",
    "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
    "CLAUDE_CODE_IDE_SKIP_AUTO_INSTALL": "1",
    "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1",
    "CLAUDE_CODE_DISABLE_CLAUDE_MDS": "1",
    "CLAUDE_CODE_ENABLE_TELEMETRY": "0",
    "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL": "1",
    "CLAUDE_CODE_MAX_RETRIES": "0",
    "NO_COLOR": "1",
    "CI": "1",
}

# Variables of the developer's shell that would change what the CLI does.
_STRIPPED_ENV_PREFIXES = ("ANTHROPIC_", "CLAUDE_", "OTEL_", "AWS_", "GOOGLE_", "VERTEX_")
_STRIPPED_ENV_NAMES = frozenset(
    {
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
        "NO_PROXY", "no_proxy", "NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "SSL_CERT_DIR",
        "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME",
    }
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Installation


def claude_code_cache_dir() -> pathlib.Path:
    """The npm prefix holding the CLI: ``$TRIOPROXY_CLAUDE_CODE_CACHE`` or
    ``<repo>/.cache/claude-code``."""
    override = os.environ.get("TRIOPROXY_CLAUDE_CODE_CACHE")
    if override:
        return pathlib.Path(override).expanduser().resolve()
    return REPO_ROOT / ".cache" / "claude-code"


def _candidates(cache: pathlib.Path) -> list[pathlib.Path]:
    modules = cache / "node_modules"
    found = [modules / CLAUDE_CODE_PACKAGE / "bin" / "claude.exe"]
    package = _PLATFORM_PACKAGES.get((sys.platform, platform.machine().lower()))
    if package is not None:
        found.append(modules / package / "claude")
    return found


def _reported_version(binary: pathlib.Path) -> str | None:
    """``claude --version`` output (``2.1.332 (Claude Code)``), or None if it does not run."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **HERMETIC_ENV},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip()


def _usable_binary(cache: pathlib.Path) -> pathlib.Path | None:
    expected = f"{CLAUDE_CODE_VERSION} (Claude Code)"
    for candidate in _candidates(cache):
        if candidate.is_file() and _reported_version(candidate) == expected:
            return candidate
    return None


def _install_locked(cache: pathlib.Path) -> pathlib.Path:
    with install_lock(cache):
        binary = _usable_binary(cache)
        if binary is None:
            npm_install(cache, CLAUDE_CODE_PACKAGE, CLAUDE_CODE_VERSION, what="Claude Code")
            binary = _usable_binary(cache)
        if binary is None:
            found = [f"{p}: {_reported_version(p)!r}" for p in _candidates(cache) if p.exists()]
            raise RuntimeError(
                f"npm installed {CLAUDE_CODE_PACKAGE}@{CLAUDE_CODE_VERSION} into {cache}, but "
                f"no executable there reports '{CLAUDE_CODE_VERSION} (Claude Code)' (found: "
                f"{found or 'nothing'}; platform {sys.platform}/{platform.machine()})."
            )
        return binary


_binary_lock = threading.Lock()
_binary_cache: dict[pathlib.Path, pathlib.Path] = {}


def claude_binary() -> pathlib.Path:
    """Path of the Claude Code ``CLAUDE_CODE_VERSION`` executable, installing it if missing.

    Cached per cache folder for the life of the process. Raises `RuntimeError` (with npm's
    output) when npm is missing, the install fails or the binary reports another version.
    Blocking (runs npm): from async code use `claude_binary_async`."""
    cache = claude_code_cache_dir()
    with _binary_lock:
        binary = _binary_cache.get(cache)
        if binary is None:
            binary = _usable_binary(cache) or _install_locked(cache)
            _binary_cache[cache] = binary
        return binary


async def claude_binary_async() -> pathlib.Path:
    """`claude_binary` in a worker thread, so a first-time npm install does not block trio."""
    return await trio.to_thread.run_sync(claude_binary)


# --------------------------------------------------------------------------------------------
# Running `claude -p`


def claude_env(
    home: pathlib.Path, *, base_url: str, api_key: str, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The child environment: ours minus the variables that would steer the CLI, plus a
    throwaway ``HOME`` (and ``CLAUDE_CONFIG_DIR`` in it), ``ANTHROPIC_BASE_URL``,
    ``ANTHROPIC_API_KEY`` and `HERMETIC_ENV`. ``NO_PROXY`` covers loopback, so a test may set
    ``HTTPS_PROXY`` in ``env`` to catch any request to another host. ``env`` wins."""
    child = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_STRIPPED_ENV_PREFIXES) and key not in _STRIPPED_ENV_NAMES
    }
    child.update(HERMETIC_ENV)
    child.update(
        {
            "HOME": str(home),
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": api_key,
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
        }
    )
    if env:
        child.update(env)
    return child


@attrs.frozen
class ClaudeResult:
    """What one ``claude -p --output-format json`` run produced.

    ``result`` is the JSON object printed on stdout (``type: "result"``, ``subtype``,
    ``is_error``, ``result`` - the final text -, ``num_turns``, ``usage`` ...), None if stdout
    held none. ``duration`` is in trio clock seconds."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    result: dict[str, Any] | None
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def text(self) -> str:
        """The final answer's text ('' if there is none)."""
        value = (self.result or {}).get("result")
        return value if isinstance(value, str) else ""

    def describe(self) -> str:
        return (
            f"claude -p exited {self.returncode} after {self.duration:.1f}s\n"
            f"argv: {list(self.argv)}\nresult: {self.result!r}\n"
            f"--- stderr (tail) ---\n{self.stderr[-6000:]}\n"
            f"--- stdout (tail) ---\n{self.stdout[-4000:]}"
        )


class ClaudeTimeoutError(trio.TooSlowError):
    """``claude -p`` did not finish in time; carries what it printed until it was killed."""

    def __init__(self, timeout: float, argv: Sequence[str], stdout: str, stderr: str) -> None:
        super().__init__(
            f"claude -p did not finish within {timeout}s\nargv: {list(argv)}\n"
            f"--- stderr (tail) ---\n{stderr[-6000:]}\n--- stdout (tail) ---\n{stdout[-3000:]}"
        )
        self.timeout = timeout
        self.argv = tuple(argv)
        self.stdout = stdout
        self.stderr = stderr


def _last_json_object(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


_run_counter = 0
_run_counter_lock = threading.Lock()


def _next_run_id() -> int:
    global _run_counter
    with _run_counter_lock:
        _run_counter += 1
        return _run_counter


async def run_claude_print(
    home: pathlib.Path,
    prompt: str,
    *,
    cwd: pathlib.Path,
    base_url: str,
    api_key: str,
    timeout: float = 120,  # noqa: ASYNC109 - the bound of a whole child process, as documented
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ClaudeResult:
    """Run ``claude -p PROMPT --output-format json *extra_args`` once in ``cwd`` with the
    environment of `claude_env` and return what it did.

    stdin is /dev/null; stdout/stderr go to files under ``home/claude-logs`` (kept for
    debugging), so a run killed by the timeout still reports what it printed. On cancellation
    trio sends SIGTERM, then SIGKILL after 5 s.

    Error handling: a non-zero exit is returned, not raised (check ``result.ok``); exceeding
    ``timeout`` seconds (trio clock) raises `ClaudeTimeoutError`; a failed install raises
    `RuntimeError` from `claude_binary`."""
    binary = await claude_binary_async()
    logs = home / "claude-logs"
    await trio.Path(logs).mkdir(parents=True, exist_ok=True)
    stem = f"run-{os.getpid()}-{_next_run_id()}"
    stdout_path = logs / f"{stem}.stdout.json"
    stderr_path = logs / f"{stem}.stderr.txt"
    argv = [str(binary), "-p", prompt, "--output-format", "json", *extra_args]
    child_env = claude_env(home, base_url=base_url, api_key=api_key, env=env)
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
            raise ClaudeTimeoutError(timeout, argv, stdout_text, stderr_text) from None
    duration = trio.current_time() - started
    stdout_text = await trio.Path(stdout_path).read_text(errors="replace")
    stderr_text = await trio.Path(stderr_path).read_text(errors="replace")
    return ClaudeResult(
        argv=tuple(argv),
        returncode=proc.returncode,
        stdout=stdout_text,
        stderr=stderr_text,
        result=_last_json_object(stdout_text),
        duration=duration,
    )
