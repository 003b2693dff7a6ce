"""`python -m devicemap ...`: the same command line as the `devicemap` script."""

from devicemap.cli.main import app

app(prog_name="devicemap")
