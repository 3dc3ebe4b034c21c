"""Install a pinned npm package into a cache folder, once, for the CLI tests.

This is a support module, not a test file: `tests/codex_cli.py` (``@openai/codex``) and
`tests/claude_code.py` (``@anthropic-ai/claude-code``) install their CLIs with it.

* `npm_install()` - ``npm install --save-exact PACKAGE@VERSION`` in the folder, bounded in time.
* `install_lock()` - an exclusive file lock on the folder, so parallel test processes (xdist
  workers, two test sessions) install once and never see a half-written ``node_modules``.

Error handling: a missing ``npm`` or a failed install raises `RuntimeError` carrying npm's
output; tests let it propagate and fail, they do not skip.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

__all__ = ["install_lock", "npm_install"]


def npm_install(
    cache: pathlib.Path,
    package: str,
    version: str,
    *,
    timeout: float = 900,
    what: str | None = None,
) -> None:
    """``npm install PACKAGE@VERSION`` (exact, no audit/fund chatter) with ``cwd=cache``.

    ``what`` names the tool in error messages (default: the package). Blocking: call it from a
    worker thread in async code."""
    label = what or package
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"{label} {version} is not installed in {cache} and `npm` is not on PATH: "
            f"install Node.js/npm, or run `npm install {package}@{version}` in that folder."
        )
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        npm, "install", "--no-audit", "--no-fund", "--save-exact", "--loglevel=error",
        f"{package}@{version}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd,
            cwd=cache,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"`{' '.join(cmd)}` in {cache} could not run: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` in {cache} failed with exit code {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )


@contextlib.contextmanager
def install_lock(cache: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive lock on ``cache/.install.lock`` (creating ``cache``) for the block."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".install.lock", "a+b") as lock_file:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        yield
