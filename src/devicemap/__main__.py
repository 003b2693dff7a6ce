"""`python -m devicemap ...`: the same command line as the `devicemap` script."""

from devicemap.cli.entry import main

main()
