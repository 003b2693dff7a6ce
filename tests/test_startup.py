"""The command line starts light: importing devicemap.cli.main, `devicemap --help` and
`devicemap plan --help` load none of torch, transformers, safetensors, PIL, fastapi or
uvicorn (the commands import them when they run), and the help still lists every option.

Each check runs in a fresh Python process: this one has torch imported long since. A
property, not a timing: bench/startup.py measures the seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "safetensors", "PIL", "fastapi", "uvicorn")

# run `devicemap ARGS` (the console script's main) in this process, then print which of
# HEAVY it imported as the last line of stdout
PROBE = """
import json, sys
from devicemap.cli.entry import main
sys.argv = ["devicemap", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exit:
    status = exit.code or 0
else:
    status = 0
print()
print(json.dumps({"status": status, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def fresh(*args: str) -> tuple[str, dict[str, object]]:
    """`devicemap ARGS` in a new process: (its stdout, {"status", "heavy"})."""
    script = f"HEAVY = {HEAVY!r}\n{PROBE}"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}  # no wrapped or coloured help
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)],
        check=True, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    text, _, last = out.stdout.rstrip("\n").rpartition("\n")
    return text, json.loads(last)


def test_importing_the_cli_loads_no_heavy_module() -> None:
    script = (
        "import json, sys, devicemap.cli.main; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120
    )
    assert json.loads(out.stdout) == []


def test_help_lists_the_commands_without_heavy_modules() -> None:
    text, probe = fresh("--help")
    assert probe == {"status": 0, "heavy": []}
    for command in ("plan", "run", "chat", "bench", "serve", "cache"):
        assert command in text


@pytest.mark.parametrize("command", ["plan", "run", "bench", "serve", "cache"])
def test_command_help_lists_its_options_without_heavy_modules(command: str) -> None:
    text, probe = fresh(command, "--help")
    assert probe == {"status": 0, "heavy": []}
    expected = {
        "plan": ("--max-memory", "--dtype", "--strategy", "--pin", "--save", "--json"),
        "run": ("--prompt", "--max-new-tokens", "--plan", "--image", "--dtype", "--json"),
        "bench": ("--prompt-tokens", "--new-tokens", "--runs", "--strategy", "--json"),
        "serve": ("--host", "--port", "--max-batch", "--api-key", "--offload-exec"),
        "cache": ("ls", "rm", "prune"),
    }[command]
    for option in expected:
        assert option in text
    if command == "plan":  # the choices, listed
        for choice in ("sequential", "balanced_low_0", "auto", "bfloat16", "last", "all"):
            assert choice in text


def test_version_without_heavy_modules() -> None:
    text, probe = fresh("--version")
    assert probe == {"status": 0, "heavy": []} and text.startswith("devicemap ")


def test_a_bad_choice_is_refused_before_anything_heavy_loads() -> None:
    _, probe = fresh("plan", "some-model", "--strategy", "fast")
    assert probe == {"status": 2, "heavy": []}
