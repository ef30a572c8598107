"""Settings as command-line flags: one flag per :class:`service.config.Settings` field, made from the field itself.

Precedence is pydantic-settings' own: values passed to ``Settings(...)`` (the flags given) override
``LESIONSERVE_*`` variables, which override the defaults. A flag not given is not passed, so the
variable or the default still applies. Values go in as text and pydantic validates them exactly as it
validates the environment's, so a bad flag is refused with the same one-line message.
"""

from __future__ import annotations

import argparse
from typing import Any

from service.config import Settings

# Short names users of other serving tools reach for first (tritonserver --model-repository, uvicorn --host).
ALIASES = {"model_path": ["--model"]}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--<field>`` for every settings field (``--model`` too, for ``--model-path``)."""
    group = parser.add_argument_group("settings (each also LESIONSERVE_<NAME>; a flag overrides the variable)")
    for name, info in Settings.model_fields.items():
        default = "" if info.is_required() else f" (default: {info.default!r})"
        group.add_argument(
            flag(name),
            *ALIASES.get(name, []),
            dest=name,
            metavar=name.upper(),
            default=argparse.SUPPRESS,  # not given: the variable or the default applies
            help=f"{info.description or ''}{default}".replace("%", "%%"),
        )


def settings_from(args: argparse.Namespace) -> Settings:
    """The process's settings: the flags given, over ``LESIONSERVE_*``, over the defaults (raises ValidationError)."""
    given: dict[str, Any] = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)
