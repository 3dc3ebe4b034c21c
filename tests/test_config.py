"""Configuration: precedence, validation, and every option documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioproxy.config import ConfigError, env_name, load_settings, option_names

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert (settings.host, settings.port) == ("127.0.0.1", 2455)
    assert settings.data_dir == Path("./var")
    assert settings.resolved_database_url.endswith("/var/trioproxy.db")
    assert settings.resolved_database_url.startswith("sqlite:///")


def test_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "trioproxy.toml"
    toml.write_text('[trioproxy]\nport = 9000\nhost = "0.0.0.0"\nlog_level = "debug"\n')
    settings = load_settings(
        config_file=toml,
        environ={"TRIOPROXY_PORT": "9001"},
        overrides={"host": "127.0.0.2", "port": None},
    )
    assert settings.port == 9001  # env beats TOML
    assert settings.host == "127.0.0.2"  # flag beats TOML
    assert settings.log_level == "debug"  # TOML beats default


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TRIOPROXY_PORT": "eighty"}, "TRIOPROXY_PORT"),
        ({"TRIOPROXY_PORT": "70000"}, "not a TCP port"),
        ({"TRIOPROXY_PROT": "1"}, "unknown environment variable TRIOPROXY_PROT"),
        ({"TRIOPROXY_LOG_FORMAT": "xml"}, "log_format"),
    ],
)
def test_bad_values_are_clear_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown option 'prot'"):
        load_settings(config_file=toml, environ={})


def test_every_option_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    missing = []
    for name in option_names():
        flag = "--" + name.replace("_", "-")
        for needle in (f"`{name}`", f"`{env_name(name)}`", f"`{flag}`"):
            if needle not in readme:
                missing.append(needle)
    assert not missing, f"README does not document: {missing}"


def test_the_continuity_table_names_tests_that_exist() -> None:
    import re

    root = README.parent
    table = (root / "docs" / "continuity.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", table))
    assert len(named) >= 10
    sources = "\n".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    missing = sorted(n for n in named if f"def {n}(" not in sources)
    assert not missing, f"docs/continuity.md names tests that do not exist: {missing}"
