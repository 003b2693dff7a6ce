"""How people use devicemap: the `devicemap` command line (main: the typer app and `plan`;
commands: run, chat, bench), bench measurements and the offline demo model."""
