"""``trioproxy demo``: the mock backend with three accounts, the proxy in front of it, and the
client configuration that works against them, all on loopback."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import attrs
import trio

from trioproxy.accounts.authfile import parse_auth_json
from trioproxy.config import load_settings
from trioproxy.harness.mock_upstream import MockBackend, MockConfig, serve_mock
from trioproxy.server import serve_proxy
from trioproxy.store import Store


def codex_config(proxy_url: str) -> str:
    return f"""model = "gpt-5.5"
model_provider = "trioproxy"

[model_providers.trioproxy]
name = "trioproxy"
base_url = "{proxy_url}/backend-api/codex"
wire_api = "responses"
supports_websockets = true
env_key = "TRIOPROXY_API_KEY"
"""


def curl_command(proxy_url: str, key: str) -> str:
    body = json.dumps(
        {
            "model": "gpt-5.5",
            "stream": True,
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "mock:say hello through trioproxy"}],
                }
            ],
        }
    )
    return f"curl -N {proxy_url}/backend-api/codex/responses -H 'content-type: application/json' -H 'authorization: Bearer {key}' -d {shlex.quote(body)}"


async def run_demo(host: str, port: int, mock_port: int, data_dir: Path) -> None:
    backend = MockBackend(MockConfig(accounts=3))
    settings = load_settings(overrides={"host": host, "port": port, "data_dir": str(data_dir)})
    async with trio.open_nursery() as nursery:
        bound_mock = await nursery.start(serve_mock, backend, host, mock_port)
        mock_root = f"http://{host}:{bound_mock}"
        store = Store.open(
            settings.resolved_database_url,
            data_dir=settings.data_dir,
            secret_key=settings.secret_key,
        )
        try:
            now = backend.clock.now()
            for account in backend.accounts.values():
                store.upsert_account(parse_auth_json(account.auth_json(now), now=now))
            existing = [k for k in store.list_api_keys() if k.name == "demo"]
            for key in existing:
                store.revoke_api_key(key.key_id)
            _, api_key = store.create_api_key("demo")
        finally:
            store.close()
        proxied = attrs.evolve(
            settings, upstream_base_url=f"{mock_root}/backend-api", auth_base_url=mock_root
        )
        bound = await nursery.start(serve_proxy, proxied)
        proxy_url = f"http://{host}:{bound}"
        print(
            f"""
trioproxy demo is running (Ctrl-C stops it)
  mock Codex backend: {mock_root}/backend-api  (accounts: {", ".join(backend.accounts)})
  proxy:              {proxy_url}  (store: {data_dir})

The Codex CLI: put this in $CODEX_HOME/config.toml (e.g. CODEX_HOME=/tmp/codex-demo)
----8<----
{codex_config(proxy_url)}----8<----
then:
  export TRIOPROXY_API_KEY={api_key}
  codex exec --skip-git-repo-check "mock:say hello from the Codex CLI"

curl:
  {curl_command(proxy_url, api_key)}
""",
            flush=True,
        )
