"""The ``trioproxy`` command."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import click
import trio

from trioproxy import __version__
from trioproxy.cli_options import load_cli_settings, settings_options
from trioproxy.config import ConfigError, load_settings
from trioproxy.logs import configure_logging, get_logger

if TYPE_CHECKING:
    from trioproxy.accounts.logins import Login, LoginRegistry
    from trioproxy.config import Settings
    from trioproxy.store import Store


@click.group()
@click.version_option(__version__, prog_name="trioproxy")
def main() -> None:
    """trioproxy: a Codex backend proxy over a pool of ChatGPT accounts."""


@main.command()
@settings_options
def serve(config_file: Path | None, **overrides: Any) -> None:
    """Serve the proxy (default 127.0.0.1:2455, SQLite store under ./var)."""
    settings = load_cli_settings(config_file, overrides)
    configure_logging(settings.log_level, settings.log_format)
    from trioproxy.server import serve_proxy

    log = get_logger("trioproxy")

    async def run() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("shutdown requested", signal=signal.Signals(signum).name)
                        shutdown.set()
                        return

            async def serve_until_stopped(task_status: trio.TaskStatus[int]) -> None:
                await serve_proxy(settings, shutdown_event=shutdown, task_status=task_status)
                nursery.cancel_scope.cancel(reason="server stopped")

            nursery.start_soon(watch_signals)
            await nursery.start(serve_until_stopped)
            # What start-up loaded (modules, the app, accounts) lives as long as the process:
            # frozen out of the collector's generations, it is not walked by full collections,
            # whose pauses would stall every stream at once (docs/performance.md, 3.2 and 3.4)
            gc.freeze()

    refused: ConfigError | None = None
    try:
        trio.run(run)
    except* ConfigError as group:
        refused = group.exceptions[0]  # type: ignore[assignment]
    if refused is not None:
        raise click.UsageError(str(refused))


@main.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=18080, show_default=True, type=int, help="Port (0 = any free port)."
)
@click.option(
    "--extra-port",
    "extra_ports",
    multiple=True,
    type=int,
    help="Also listen on this port (same backend). Repeatable.",
)
@click.option(
    "--accounts",
    default=1,
    show_default=True,
    type=int,
    help="Number of accounts to create (acct-mock-1 ...).",
)
@click.option("--plan", default="plus", show_default=True, help="Plan of the created accounts.")
@click.option(
    "--primary-limit", default=1000, show_default=True, type=int, help="Requests per 5-hour window."
)
@click.option(
    "--secondary-limit",
    default=10000,
    show_default=True,
    type=int,
    help="Requests per 7-day window.",
)
@click.option(
    "--token-ttl",
    default=10 * 24 * 3600.0,
    show_default=True,
    type=float,
    help="Access token lifetime, seconds.",
)
@click.option(
    "--deltas",
    default=0,
    show_default=True,
    type=int,
    help="Delta events per answer (0 = one per 10 characters).",
)
@click.option(
    "--delta-bytes",
    default=0,
    show_default=True,
    type=int,
    help="Size of each text delta (0 = the natural answer).",
)
@click.option(
    "--first-event-delay",
    default=0.0,
    show_default=True,
    type=float,
    help="Seconds before the first event.",
)
@click.option(
    "--event-delay", default=0.0, show_default=True, type=float, help="Seconds between events."
)
@click.option(
    "--rate-limit-events/--no-rate-limit-events",
    default=True,
    show_default=True,
    help="Send codex.rate_limits before each response.",
)
@click.option(
    "--segmentation",
    type=click.Choice(["event", "whole", "split"]),
    default="event",
    show_default=True,
    help="How answers are cut into socket writes: one per event, a whole turn in one, or events cut anywhere.",
)
@click.option(
    "--record/--no-record",
    default=True,
    show_default=True,
    help="Record requests for /__mock__/requests.",
)
@click.option(
    "--record-frames/--no-record-frames",
    default=True,
    show_default=True,
    help="Record WebSocket frames too.",
)
@click.option(
    "--fault", "faults", multiple=True, help="Inject a fault: KIND[:key=value,...]. Repeatable."
)
@click.option(
    "--scenario",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML or JSON file: mock options and a [[faults]] list.",
)
@click.option(
    "--write-auth",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write DIR/<account_id>/auth.json for each account.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed for probabilistic faults."
)
def mock_upstream(
    host: str,
    port: int,
    extra_ports: tuple[int, ...],
    faults: tuple[str, ...],
    scenario: Path | None,
    write_auth: Path | None,
    **options: Any,
) -> None:
    """Serve the mock Codex backend (chatgpt.com/backend-api + auth.openai.com)."""
    from trioproxy.harness.mock_upstream import (
        MockBackend,
        MockConfig,
        fault_from_dict,
        parse_fault_spec,
    )
    from trioproxy.harness.mock_upstream.faults import FaultSpecError

    configure_logging("info", "auto")
    log = get_logger("trioproxy.mock")
    fault_specs: list[Any] = []
    if scenario is not None:
        text = scenario.read_text()
        try:
            data = json.loads(text) if scenario.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise click.UsageError(f"scenario {scenario}: {exc}") from None
        fault_specs += data.pop("faults", [])
        known = {f.name for f in attrs.fields(MockConfig)}
        unknown = set(data) - known
        if unknown:
            raise click.UsageError(f"scenario {scenario}: unknown keys {sorted(unknown)}")
        options.update({k.replace("-", "_"): v for k, v in data.items()})
    try:
        parsed = [fault_from_dict(s) for s in fault_specs] + [parse_fault_spec(s) for s in faults]
    except FaultSpecError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        config = MockConfig(**options)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(f"mock options: {exc}") from None
    backend = MockBackend(config)
    for fault in parsed:
        backend.faults.add(fault)

    async def run() -> None:
        from trioproxy.harness.mock_upstream import serve_mock

        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_mock, backend, host, port)
            for extra in extra_ports:
                await nursery.start(serve_mock, backend, host, extra)
            now = backend.clock.now()
            if write_auth is not None:
                for account in backend.accounts.values():
                    folder = write_auth / account.account_id
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "auth.json").write_text(json.dumps(account.auth_json(now), indent=2))
            log.info(
                "mock backend serving",
                url=f"http://{host}:{bound}/backend-api",
                extra_ports=list(extra_ports),
                accounts=list(backend.accounts),
                faults=[f.view() for f in backend.faults.faults],
                auth_files=str(write_auth) if write_auth else None,
            )
            # as `serve` does: a full collection of the start-up heap would stall every stream
            # of a bench at once, in the direct baseline and behind the proxy alike
            gc.freeze()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        sys.exit(130)


@main.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address for both servers (loopback)."
)
@click.option(
    "--port", default=2455, show_default=True, type=int, help="Proxy port (0 = any free port)."
)
@click.option(
    "--mock-port",
    default=0,
    show_default=True,
    type=int,
    help="Mock backend port (0 = any free port).",
)
@click.option(
    "--data-dir",
    default="./var/demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Store of the demo proxy (kept apart from a real one).",
)
def demo(host: str, port: int, mock_port: int, data_dir: Path) -> None:
    """Start the mock backend with three accounts and the proxy in front of it; print a
    Codex CLI config and a curl command that work against them."""
    from trioproxy.demo import run_demo

    configure_logging("warning", "auto")
    try:
        trio.run(run_demo, host, port, mock_port, data_dir)
    except KeyboardInterrupt:
        sys.exit(0)


@main.command()
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice(
        ["sse", "relay", "ws", "bridge", "failover", "chaos", "soak", "idle", "chat", "messages"]
    ),
    help="Scenario to run (repeatable; default: all but chat and messages, in this order).",
)
@click.option(
    "--output",
    default="bench-results",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for results.json, summary.md and the plots.",
)
@click.option("--concurrency", type=int, help="Concurrent clients (default: per scenario).")
@click.option(
    "--duration", type=float, help="Seconds per target, all rounds (default: per scenario)."
)
@click.option("--count", type=int, help="At most this many turns per target.")
@click.option(
    "--rounds",
    type=int,
    help="Alternating direct/proxy phases the duration is split into (sse 3, ws 2, else 1).",
)
@click.option("--think", type=float, help="Seconds a client waits between turns (mean).")
@click.option("--events", type=int, help="Delta events per upstream answer.")
@click.option("--event-bytes", type=int, help="Bytes per delta event.")
@click.option("--upstream-ttfb", type=float, help="Seconds before the mock's first event.")
@click.option("--upstream-gap", type=float, help="Seconds between the mock's events.")
@click.option(
    "--upstream-jitter",
    default=0.0,
    show_default=True,
    type=float,
    help="Spread of the mock's delays: each drawn from delay * (1 +/- J).",
)
@click.option(
    "--input-bytes",
    default=2048,
    show_default=True,
    type=int,
    help="Size of the request body's instructions.",
)
@click.option(
    "--turns-per-session",
    default=3,
    show_default=True,
    type=int,
    help="User turns per ws/bridge session.",
)
@click.option("--sessions", type=int, help="idle: WebSocket sessions to hold open [2000].")
@click.option(
    "--abandon",
    "abandon_probability",
    default=0.3,
    show_default=True,
    type=float,
    help="chaos: share of turns a client abandons.",
)
@click.option(
    "--fault-rate",
    "fault_probability",
    default=0.15,
    show_default=True,
    type=float,
    help="chaos: share of upstream requests that fail.",
)
@click.option(
    "--turn-timeout",
    default=60.0,
    show_default=True,
    type=float,
    help="Longest single turn, seconds.",
)
@click.option(
    "--accounts", default=8, show_default=True, type=int, help="Mock accounts (started stack)."
)
@click.option("--seed", default=1, show_default=True, type=int, help="Random seed of the clients.")
@click.option(
    "--direct/--no-direct",
    default=True,
    show_default=True,
    help="Also run each scenario against the mock directly (the baseline).",
)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write PNG plots.")
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Live progress line."
)
@click.option(
    "--profile", type=str, help="Record this scenario's proxy with py-spy (profile-<scenario>.txt)."
)
@click.option("--target", help="URL of a running Codex-compatible proxy (instead of starting one).")
@click.option("--mock", "mock_url", help="With --target: root URL of the trioproxy mock behind it.")
@click.option(
    "--api-key", envvar="TRIOPROXY_BENCH_API_KEY", help="With --target: the proxy's API key."
)
@click.option("--target-pid", type=int, help="With --target: the proxy's process id (CPU, RSS).")
@click.option(
    "--proxy-option",
    multiple=True,
    metavar="NAME=VALUE",
    help="An option of the proxy the bench starts (as `trioproxy serve` takes it, e.g. reanchor_total_max_bytes=67108864). Repeatable.",
)
@click.option(
    "--path", default="/backend-api/codex/responses", show_default=True, help="Responses route."
)
@click.option(
    "--keys",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="API keys in the started proxy's store, each with budgets checked and charged on every request; the clients spread over them, and sse, relay, ws and bridge also run against the same proxy without keys (the summary's key accounting table).",
)
def bench(scenarios: tuple[str, ...], output: Path, **options: Any) -> None:
    """Load-test a proxy against the mock Codex backend, with the mock directly as baseline."""
    from trioproxy.harness.bench.config import SCENARIOS, BenchConfig
    from trioproxy.harness.bench.runner import run_bench

    configure_logging("warning", "console")
    for item in options.get("proxy_option", ()):
        if "=" not in item:
            raise click.UsageError(f"--proxy-option {item!r}: write NAME=VALUE")
    config = BenchConfig(output=output, scenarios=tuple(scenarios) or SCENARIOS, **options)
    # the clients' timestamps must not wait behind full collections of the modules' heap,
    # which stall every stream at once (docs/performance.md, section 3.4)
    gc.freeze()
    try:
        results = trio.run(run_bench, config, sys.argv)
    except KeyboardInterrupt:
        sys.exit(130)
    click.echo(f"results: {output / 'results.json'}  summary: {output / 'summary.md'}")
    for row in results.get("targets", []):
        met = {True: "met", False: "NOT MET", None: "not run"}[row["met"]]
        click.echo(f"  {row['target']}: {row['measured']} ({row['limit']}) {met}")


MAX_PASTE_LINES = 1000
MAX_LINE_BYTES = 64 * 1024


# -- trioproxy accounts login -------------------------------------------------------------
# Sign a ChatGPT account in from the terminal, without the Codex CLI, and store it as
# `accounts import` does (docs/accounts.md). It runs the same LoginRegistry as the server's
# /api/logins, in a nursery of its own, on the store named by the usual options (a running
# server picks the account up from the store). --device prints the verification URL and the
# user code and waits for the approval; --browser prints the authorize URL and waits for the
# browser's redirect on the loopback callback listener, or for the redirect URL pasted on
# stdin (its state is checked; a wrong one is reported and the command keeps waiting).
# Exit codes: 0 stored; 1 the login failed, was refused or expired (a message says which), or
# the store could not be opened; 2 a usage error; 130 Ctrl-C (nothing stored). Tokens never
# appear in the output.


@click.command("login")
@click.option("--device", "flow", flag_value="device", help="Device code: open a URL, type a code.")
@click.option(
    "--browser", "flow", flag_value="browser", help="Browser sign-in with a redirect back."
)
@click.option(
    "--callback-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port of the loopback callback listener (--browser) [login_callback_port, 1455].",
)
@click.option(
    "--qr/--no-qr",
    default=None,
    help="With --device, also draw the verification URL as a QR code [on a terminal].",
)
@settings_options
def accounts_login(
    flow: str | None,
    callback_port: int | None,
    qr: bool | None,
    config_file: Path | None,
    **overrides: Any,
) -> None:
    """Sign a ChatGPT account in and store it (as `accounts import` does); signing in as an
    account that is already stored updates it in place (how `reauth_required` is fixed)."""
    from trioproxy.cli_admin import open_store

    if flow is None:
        raise click.UsageError("choose --device or --browser")
    try:
        settings = load_settings(config_file=config_file, overrides=overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    configure_logging("warning", "console")
    port = settings.login_callback_port if callback_port is None else callback_port
    interrupted = False
    with open_store(config_file, overrides) as store:
        try:
            draw_qr = sys.stdout.isatty() if qr is None else qr
            done = trio.run(_login, settings, store, flow, port, draw_qr)
        except* KeyboardInterrupt:  # a second Ctrl-C while the first one is handled
            interrupted = True
    if interrupted or done.status == "cancelled":
        click.echo("login cancelled (Ctrl-C); nothing was stored", err=True)
        sys.exit(130)
    if done.status == "succeeded" and done.account is not None:
        account = done.account
        verb = "imported" if account.created else "updated"
        click.echo(
            f"{verb} {account.account_id} ({account.email or 'no email'},"
            f" {account.plan or 'unknown plan'})"
        )
        return
    raise click.ClickException(f"login {done.status}: {done.reason or 'no reason given'}")


async def _login(settings: Settings, store: Store, flow: str, port: int, qr: bool) -> Login:
    import httpx

    from trioproxy.accounts.importing import Imported, import_auth_jsons
    from trioproxy.accounts.logins import LoginRegistry
    from trioproxy.protocol.errors import ProxyError

    async def adopt(data: dict[str, Any], now: float) -> Imported:
        (imported,) = await import_auth_jsons(store, None, [data], now=now)
        return imported

    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as http,
        trio.open_nursery() as nursery,
    ):
        registry = LoginRegistry(
            http, settings.auth_base_url, adopt, callback_port=port, timeout=settings.login_timeout
        )
        await nursery.start(registry.run)
        try:
            login = await registry.start(flow)
        except ProxyError as exc:
            nursery.cancel_scope.cancel()
            raise click.ClickException(str(exc.body["error"]["message"])) from None
        _instructions(login, qr)
        nursery.start_soon(_cancel_on_interrupt, registry, login)
        if flow == "browser":
            nursery.start_soon(_read_pasted, registry, login)
        await login.done.wait()
        nursery.cancel_scope.cancel()
    return login


async def _cancel_on_interrupt(registry: LoginRegistry, login: Login) -> None:
    """Ctrl-C (or SIGTERM) cancels the login: it ends ``cancelled`` and stores nothing."""
    from trioproxy.protocol.errors import ProxyError

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            with contextlib.suppress(ProxyError):  # it ended meanwhile
                await registry.cancel(login.id)
            return


def _qr_code(url: str) -> str | None:
    """``url`` as a QR code drawn with block characters, or None when the output cannot
    show them."""
    import segno

    drawing = io.StringIO()
    segno.make(url, error="l").terminal(out=drawing, compact=True, border=1)
    text = drawing.getvalue()
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return None
    return text


def _instructions(login: Login, qr: bool = False) -> None:
    minutes = max(1, round((login.expires_at - time.time()) / 60))
    if login.flow == "device":
        drawing = _qr_code(login.verification_url or "") if qr else None
        if drawing is not None:
            click.echo(f"Scan to open {login.verification_url}:\n{drawing}")
        click.echo(
            "Sign in with ChatGPT using a device code:\n"
            f"  1. Open {login.verification_url} in a browser and sign in\n"
            f"  2. Enter this one-time code (expires in {minutes} minutes): {login.user_code}\n"
            "Waiting for the approval... (Ctrl-C cancels)"
        )
        return
    click.echo(f"Open this URL in a browser and sign in with ChatGPT:\n  {login.authorize_url}")
    if login.callback_listening:
        click.echo(f"Waiting for the browser's redirect to {login.redirect_uri} ...")
    else:
        click.echo(f"The callback port of {login.redirect_uri} is taken, so nothing listens there.")
    click.echo(
        "If the browser cannot reach this machine, paste the URL it was sent to"
        " (it starts with http://localhost) here and press Enter. (Ctrl-C cancels)"
    )


async def _read_pasted(registry: LoginRegistry, login: Login) -> None:
    """Read stdin until the login ends (or stdin does)."""
    try:
        fd = sys.stdin.fileno()
        stream = trio.lowlevel.FdStream(os.dup(fd))
    except (OSError, ValueError):
        return
    try:
        async with stream:
            await _paste_lines(registry, login, stream)
    finally:
        os.set_blocking(fd, True)  # the terminal's stdin as it was (the dup shared its mode)


async def _paste_lines(
    registry: LoginRegistry, login: Login, stream: trio.lowlevel.FdStream
) -> None:
    """Lines from ``stream``, each tried as the redirect URL (bounded in count and size)."""
    from trioproxy.protocol.errors import ProxyError

    buffer = b""
    for _ in range(MAX_PASTE_LINES):
        while b"\n" not in buffer:
            chunk = await stream.receive_some(4096)
            if not chunk or len(buffer) > MAX_LINE_BYTES:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        url = line.decode(errors="replace").strip()
        if not url:
            continue
        try:
            await registry.complete(login.id, url)
        except ProxyError as exc:
            if login.status != "pending":
                return
            click.echo(f"error: {exc.body['error']['message']} Paste this login's URL.", err=True)
            continue
        return


def _register_admin_commands() -> None:
    from trioproxy.cli_admin import accounts, keys
    from trioproxy.cli_dashboard import admin
    from trioproxy.cli_usage import usage

    accounts.add_command(accounts_login)
    main.add_command(accounts)
    main.add_command(keys)
    main.add_command(usage)
    main.add_command(admin)


_register_admin_commands()

if __name__ == "__main__":
    main()
