"""--version on the app and on every command (eager: it prints and exits first)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"devicemap {version()}")
        raise typer.Exit()


def version() -> str:
    """This installation's version (its package metadata; the source's when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("devicemap")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


VersionOpt = Annotated[
    bool,
    typer.Option(
        "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
]


def with_version(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with --version too (eager: it prints and exits before anything runs)."""
    signature = inspect.signature(command, eval_str=True)  # names from the command's module
    option = inspect.Parameter(
        "version", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VersionOpt
    )

    @functools.wraps(command)
    def call(*args: Any, version: bool = False, **kwargs: Any) -> None:
        command(*args, **kwargs)

    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), option]
    )
    call.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    call.__annotations__["version"] = VersionOpt
    return call
