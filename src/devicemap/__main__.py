"""`python -m devicemap ...`: the same command line as the `devicemap` script."""

from devicemap import commands as _commands  # noqa: F401  (registers run, chat and bench)
from devicemap.cli import app

app(prog_name="devicemap")
