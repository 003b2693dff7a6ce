"""The `devicemap` console script: the typer app, imported here so that Ctrl-C while
Python is still importing (torch takes seconds) ends quietly with status 130 instead of a
traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .main import app

        app(prog_name="devicemap")
    except KeyboardInterrupt:  # before a command's own handling, or between its steps
        sys.stderr.write("\n[interrupted]\n")
        raise SystemExit(130) from None
