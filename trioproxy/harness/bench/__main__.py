"""``python -m trioproxy.harness.bench``: ``trioproxy bench`` (every option the same) plus the
harness options that command line does not have (``--keys N``)."""

from __future__ import annotations

import click

from trioproxy.cli import bench

EXTRA = (
    click.Option(
        ["--keys"],
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="API keys in the started proxy's store, each with budgets checked and charged on "
        "every request; the clients spread over them, and sse, relay, ws and bridge also run "
        "against the same proxy without keys (the summary's key accounting table).",
    ),
)


def command() -> click.Command:
    """``trioproxy bench`` with the options of ``EXTRA`` it does not take itself."""
    names = {param.name for param in bench.params}
    params = [*bench.params, *(option for option in EXTRA if option.name not in names)]
    return click.Command("bench", callback=bench.callback, params=params, help=bench.help)


if __name__ == "__main__":
    command()(prog_name="python -m trioproxy.harness.bench")
