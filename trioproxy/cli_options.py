"""Options shared by the ``trioproxy`` commands: one ``--flag`` per Settings field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import click

from trioproxy.config import ConfigError, Settings, env_name, load_settings


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add one ``--flag`` per Settings field (default None: unset flags do not override)."""
    for field in reversed(attrs.fields(Settings)):
        flag = "--" + field.name.replace("_", "-")
        kind = {
            int: int,
            float: float,
            bool: click.BOOL,
            "int": int,
            "float": float,
            "bool": click.BOOL,
        }.get(field.type, str)
        func = click.option(
            flag,
            field.name,
            type=kind,
            default=None,
            help=f"{field.metadata['help']} [env {env_name(field.name)}; default {field.default}]",
        )(func)
    return click.option(
        "--config",
        "config_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="TOML file with options (keys are the option names, optionally under [trioproxy]).",
    )(func)


def load_cli_settings(config_file: Path | None, overrides: dict[str, Any]) -> Settings:
    try:
        return load_settings(config_file=config_file, overrides=overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
