"""Command-line flags shared by ``llm_service``, ``llm_cli`` and ``llm-gateway``.

Settings flags are generated from the settings classes (every flag is also an ``LLM_*``
environment variable with the same meaning); sampling flags map onto ``SamplingParams``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, cast, get_args, get_origin

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from llm_service.settings import ServiceSettings, read_text

if TYPE_CHECKING:
    from llm_service.client.types import Sampling

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "add_sampling_flags",
    "add_settings_flags",
    "env_name",
    "flag_name",
    "quiet_grpc_core",
    "report_invalid_settings",
    "sampling_options",
    "settings_from",
]

S = TypeVar("S", bound=BaseSettings)

# Flags whose name differs from the field's.
FLAG_NAMES = {"model_path": "--model", "backends": "--backend"}
# Fields whose flag is repeated, once per value.
REPEATED = {"backends"}
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def add_settings_flags(
    parser: argparse.ArgumentParser,
    fields: Sequence[str],
    settings: type[BaseSettings] = ServiceSettings,
    title: str = "settings (each also an LLM_* environment variable)",
) -> None:
    """Add one flag per settings field, documented from the field's description."""
    group = parser.add_argument_group(title)
    for name in fields:
        info = settings.model_fields[name]
        flag, env = flag_name(name), env_name(name, settings)
        default = info.get_default(call_default_factory=True)
        hidden = default is None or default is False or default == ()
        shown = "" if hidden else f" Default: {default}."
        help_text = f"{info.description}{shown} [{env}]"
        if info.annotation is bool:
            group.add_argument(
                flag, dest=name, action="store_const", const=True, default=None, help=help_text
            )
        elif name in REPEATED:
            group.add_argument(
                flag, dest=name, action="append", default=None, help=help_text,
                metavar=flag.removeprefix("--").upper(),
            )  # fmt: skip
        else:
            choices = _choices(info.annotation)
            group.add_argument(
                flag, dest=name, default=None, choices=choices, help=help_text,
                metavar=None if choices else name.split("_")[-1].upper(),
            )  # fmt: skip


# Sampling flags: (flag, type, help). Left out, the engine's default applies (SamplingParams).
SAMPLING_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("--max-tokens", int, "tokens to generate at most (default: as many as fit the context)"),
    ("--temperature", float, "randomness; 0 = greedy, deterministic (default: 0.8)"),
    ("--top-k", int, "sample from the k most likely tokens; 0 = off (default: 40)"),
    ("--top-p", float, "nucleus sampling, in (0, 1]; 1 = off (default: 0.95)"),
    ("--min-p", float, "drop tokens below min-p x the best one's probability (default: 0.05)"),
    ("--repeat-penalty", float, "penalty on repeated tokens; 1 = off (default: 1)"),
    ("--presence-penalty", float, "in [-2, 2]; 0 = off (default: 0)"),
    ("--frequency-penalty", float, "in [-2, 2]; 0 = off (default: 0)"),
    ("--penalty-last-n", int, "tokens the penalties look back on; -1 = all (default: 64)"),
    ("--seed", int, "random seed, for reproducible sampling (default: random)"),
)


def add_sampling_flags(parser: argparse.ArgumentParser, *, max_tokens: int | None = None) -> None:
    """Flags for every sampling parameter, ``--stop``, ``--grammar`` and ``--json-schema``."""
    group = parser.add_argument_group("sampling")
    for flag, kind, help_text in SAMPLING_FLAGS:
        default = max_tokens if flag == "--max-tokens" else None
        if default is not None:
            help_text = f"{help_text.split(' (default')[0]} (default: {default})"
        group.add_argument(flag, type=kind, default=default, metavar="N", help=help_text)
    group.add_argument(
        "--stop", action="append", default=[], metavar="TEXT",
        help="stop string: generation ends before it (repeatable)",
    )  # fmt: skip
    group.add_argument("--grammar", type=Path, metavar="FILE", help="GBNF grammar file")
    group.add_argument("--json-schema", type=Path, metavar="FILE", help="JSON schema file")


def sampling_options(args: argparse.Namespace) -> Sampling:
    """The sampling flags that were given, as SamplingParams / client keyword arguments.

    Raises:
        ConfigurationError: a grammar or schema file cannot be read (names the flag).
    """
    given: dict[str, object] = {}
    for flag, _kind, _help in SAMPLING_FLAGS:
        name = flag.removeprefix("--").replace("-", "_")
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.stop:
        given["stop"] = tuple(args.stop)
    for name in ("grammar", "json_schema"):
        text = _read_text(getattr(args, name), "--" + name.replace("_", "-"))
        if text is not None:
            given[name] = text
    return cast("Sampling", given)


def flag_name(field: str) -> str:
    """The command-line flag of a settings field."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def env_name(field: str, settings: type[BaseSettings] = ServiceSettings) -> str:
    """The environment variable of a settings field."""
    return f"{settings.model_config.get('env_prefix', '')}{field.upper()}"


def settings_from(args: argparse.Namespace, settings: type[S]) -> S:
    """Settings from the environment, overridden by the flags that were given."""
    given = {k: v for k, v in vars(args).items() if k in settings.model_fields and v is not None}
    return settings(**given)


def report_invalid_settings(
    prog: str, exc: ValidationError, settings: type[BaseSettings] = ServiceSettings
) -> int:
    """Print one line per invalid setting, naming its flag and variable; the usage exit code."""
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        where = f"{flag_name(field)} / {env_name(field, settings)}"
        print(f"{prog}: invalid setting {where}: {err['msg']}", file=sys.stderr)
    return EXIT_USAGE


def _choices(annotation: object) -> tuple[object, ...] | None:
    """The values of a ``Literal`` field, or of an optional one (``Literal[...] | None``)."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    literals = [a for a in get_args(annotation) if get_origin(a) is Literal]
    if len(literals) == 1 and type(None) in get_args(annotation):
        return get_args(literals[0])
    return None


def _read_text(path: Path | None, flag: str) -> str | None:
    return None if path is None else read_text(path, flag)


def quiet_grpc_core() -> None:
    """Keep gRPC core's own unformatted log lines to errors, unless GRPC_VERBOSITY says more.

    gRPC reads the variable once, when it is first imported: call this before that.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
