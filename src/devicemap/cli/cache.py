"""`devicemap cache ls|rm|prune`: what the offload cache holds, and cleaning it.

The offload cache (load/cache.py) lives in `$DEVICEMAP_CACHE/offload` (default
`~/.cache/devicemap/offload`) unless a load was given another `offload_dir`; `--dir`
points these commands there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..devices import format_size
from .version import VersionOpt, with_version

if TYPE_CHECKING:  # load/cache.py imports torch: each command imports it when it runs
    from ..load.cache import Entry

app = typer.Typer(
    help="List and clean the offload cache (converted tensors of disk tiers).",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def cache_group(version: VersionOpt = False) -> None:
    """List and clean the offload cache (converted tensors of disk tiers)."""


DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="The offload directory (default: $DEVICEMAP_CACHE/offload, else"
        " ~/.cache/devicemap/offload).",
    ),
]


def offload_dir(directory: Path | None) -> Path:
    """The directory these commands work on."""
    from ..load.cache import default_dir

    return default_dir() if directory is None else directory.expanduser()


def _existing(where: Path) -> Path:
    """`where`, if it is a directory or does not exist yet (nothing cached); else exit 1."""
    if where.exists() and not where.is_dir():
        typer.echo(f"error: {where} is not a directory; give --dir the offload directory", err=True)
        raise typer.Exit(1)
    return where


@app.command("ls")
@with_version
def ls_command(directory: DirOpt = None) -> None:
    """What is cached: each file, the model it is for, its size, its last use and status."""
    from ..load.cache import age, entries

    where = _existing(offload_dir(directory))
    found = entries(where)
    if not found:
        typer.echo(f"{where}: empty", err=True)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=str(where))
    for column in ("file", "model", "size", "last used", "status"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for entry in found:
        table.add_row(
            entry.path.name, entry.model, format_size(entry.size), age(entry.last_used),
            _status(entry),
        )  # fmt: skip
    Console(soft_wrap=False).print(table)
    total = sum(e.size for e in found)
    typer.echo(f"{len(found)} files, {format_size(total)}", err=True)


def _status(entry: Entry) -> str:
    return {
        "ok": "ok",
        "stale": "stale: a source file changed or is gone (prune removes it)",
        "partial": "partial: its writer died (prune removes it)",
        "writing": "being written",
        "other": "not a devicemap cache (left alone)",
    }[entry.status]


@app.command("rm")
@with_version
def rm_command(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Files to delete: their names (or a prefix), or models' names."),
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Delete every cache file.")] = False,
    directory: DirOpt = None,
) -> None:
    """Delete cache files by name, by the model they are for, or all of them."""
    from ..load.cache import entries

    where = _existing(offload_dir(directory))
    caches = [e for e in entries(where) if e.status in ("ok", "stale", "partial")]
    if every:
        chosen = caches
    else:
        if not names or any(not n.strip() for n in names):
            typer.echo(
                "error: name the files to delete (not an empty name), or give --all", err=True
            )
            raise typer.Exit(1)
        chosen = [e for e in caches if any(_names(e, n) for n in names)]
        missing = [n for n in names if not any(_names(e, n) for e in caches)]
        if missing:
            listed = ", ".join(missing)
            message = f"no cache file or model {listed} in {where} (see `devicemap cache ls`)"
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1)
    freed = 0
    for entry in chosen:
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to delete
            entry.path.unlink()
            freed += entry.size
    typer.echo(f"deleted {len(chosen)} files, {format_size(freed)}", err=True)


def _names(entry: Entry, name: str) -> bool:
    return entry.path.name.startswith(name) or (entry.model != "" and entry.model == name)


@app.command("prune")
@with_version
def prune_command(directory: DirOpt = None) -> None:
    """Delete caches whose source files changed or are gone, and dead writers' temp files."""
    from ..load.cache import entries, sweep

    where = _existing(offload_dir(directory))
    sizes = {e.path: e.size for e in entries(where)}
    gone = sweep(where)
    freed = sum(sizes.get(p, 0) for p in gone)
    typer.echo(f"pruned {len(gone)} files, {format_size(freed)}", err=True)
