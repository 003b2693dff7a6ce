"""`devicemap chat`: history, /reset, /exit, context errors that keep the session, piped
standard input in a real subprocess, and Ctrl-C that stops a reply but not the session."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest
from typer.testing import CliRunner, Result

from devicemap.cli.main import app
from test_generate import byte_tokenizer
from tiny import greedy_reply, make_tiny_chat

NEW = 8  # tokens per reply


def chat(model: Path, lines: str, *flags: Any) -> Result:
    result = CliRunner().invoke(app, ["chat", str(model), "-n", str(NEW), *map(str, flags)], lines)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def reply(model: Path, *messages: dict[str, str]) -> str:
    return greedy_reply(model, list(messages), max_new_tokens=NEW)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat(tmp_path_factory.mktemp("chat") / "llama", byte_tokenizer())


def test_reset_forgets_and_exit_ends(llama: Path) -> None:
    result = chat(llama, "hello\n/reset\nhi again\n/exit\nnever read\n")
    assert result.exit_code == 0
    assert result.stdout == f"{reply(llama, user('hello'))}\n{reply(llama, user('hi again'))}\n"
    assert "[history cleared]" in result.stderr.splitlines()
    assert result.stderr.count(f"[{NEW} tokens, ") == 2  # "never read" was not answered


def test_help_and_unknown_commands_are_not_sent_to_the_model(llama: Path) -> None:
    result = chat(llama, "/help\n/nonsense\n/bye\nnever read\n")
    assert result.exit_code == 0 and result.stdout == ""
    assert "/reset, /clear" in result.stderr and '"""' in result.stderr
    assert "unknown command /nonsense; /help lists them" in result.stderr


def test_a_message_of_several_lines_between_triple_quotes(llama: Path) -> None:
    result = chat(llama, '"""first line\nsecond line\nthird"""\n/clear\n"""\nalone\n"""\n')
    assert result.exit_code == 0
    first = reply(llama, user("first line\nsecond line\nthird"))
    second = reply(llama, user("\nalone\n".strip()))
    assert result.stdout == f"{first}\n{second}\n"


def test_history_is_kept_between_messages(llama: Path) -> None:
    result = chat(llama, "hello\n\nhi again\n")  # a blank line is skipped; end of input exits
    assert result.exit_code == 0
    first = reply(llama, user("hello"))
    history = [user("hello"), {"role": "assistant", "content": first}, user("hi again")]
    assert result.stdout == f"{first}\n{reply(llama, *history)}\n"


def test_system_message_starts_the_history(llama: Path) -> None:
    result = chat(llama, "hello\n/reset\nhello\n", "--system", "Be brief.")
    system = {"role": "system", "content": "Be brief."}
    expected = reply(llama, system, user("hello"))
    assert result.stdout == f"{expected}\n{expected}\n"  # /reset keeps the system message


def test_message_past_the_context_is_refused_and_the_session_goes_on(llama: Path) -> None:
    result = chat(llama, "x" * 100 + "\nhi\n", "--context", 64)
    assert result.exit_code == 0
    assert (
        "error: prompt is" in result.stderr and "/reset starts a new conversation" in result.stderr
    )
    assert result.stdout == f"{reply(llama, user('hi'))}\n"  # the refused message left no trace


def test_bad_sampling_value_exits_before_loading(llama: Path) -> None:
    result = chat(llama, "hello\n", "--temperature", "-1")
    assert result.exit_code == 1
    assert result.stderr == "error: temperature must be 0 (greedy) or ≥ 0.0001, got -1.0\n"


# --- a real process ------------------------------------------------------------------


def devicemap_process(*args: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "devicemap", *map(str, args)]
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """Ctrl-C as a terminal's foreground job gets it: a shell's background job (`pytest &`)
    ignores SIGINT, the child would inherit that, and Python keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_piped_chat_in_a_subprocess(llama: Path) -> None:
    process = devicemap_process("chat", llama, "-n", NEW)
    out, err = process.communicate(b"hello\n/reset\nhi again\n/exit\n", timeout=120)
    assert process.returncode == 0, err.decode()
    expected = f"{reply(llama, user('hello'))}\n{reply(llama, user('hi again'))}\n"
    assert out.decode("utf-8") == expected
    assert "[history cleared]" in err.decode().splitlines()
    assert b"Traceback" not in err


class _Reader:
    """Collects a pipe's bytes in a thread, so the test can wait for text without blocking."""

    def __init__(self, pipe: IO[bytes]):
        self.data = b""
        self._chunks: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[bytes]) -> None:
        while chunk := os.read(pipe.fileno(), 4096):
            self._chunks.put(chunk)

    def wait_for(self, text: bytes, *, timeout: float = 60) -> None:
        """Until `text` has arrived (b"": until anything has)."""
        deadline = time.monotonic() + timeout
        while text not in self.data or not self.data:
            try:
                self.data += self._chunks.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout} s; got {self.data!r}") from None

    def drain(self) -> bytes:
        while not self._chunks.empty():
            self.data += self._chunks.get_nowait()
        return self.data


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_stops_the_reply_not_the_session(tmp_path: Path) -> None:
    # no end-of-sequence token and room for 3000 tokens (~10 s): the reply runs until stopped
    model = make_tiny_chat(
        tmp_path / "endless", byte_tokenizer(), eos_token_id=None, max_position_embeddings=4096
    )
    process = devicemap_process("chat", model, "-n", 3000)
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    out, err = _Reader(process.stdout), _Reader(process.stderr)
    try:
        err.wait_for(b"loaded in")
        process.stdin.write(b"hello\n")
        process.stdin.flush()
        out.wait_for(b"")  # the reply has started streaming
        process.send_signal(signal.SIGINT)
        err.wait_for(b"[interrupted]")
        process.stdin.write(b"/reset\n")
        process.stdin.flush()
        err.wait_for(b"[history cleared]")
        process.send_signal(signal.SIGINT)  # at the prompt: the session ends
        status = process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    log = err.drain().decode()
    assert status == 130, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    stopped = re.search(r"\[interrupted\]\n(?:.*\n)*?\[(\d+) tokens, [\d.]+ tok/s\]", log)
    assert stopped is not None, log
    assert 0 < int(stopped.group(1)) < 3000, log  # the reply stopped early


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux pseudo-terminal")
def test_on_a_terminal_arrow_keys_edit_and_recall_earlier_messages(llama: Path) -> None:
    import contextlib
    import pty
    import select

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "devicemap", "chat", str(llama), "-n", str(NEW)],
        stdin=follower, stdout=follower, stderr=follower, close_fds=True,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "200"},
    )  # fmt: skip
    os.close(follower)
    seen = b""

    def wait_for(marker: bytes, count: int) -> None:
        """Read until `marker` has appeared `count` times."""
        nonlocal seen
        deadline = time.monotonic() + 120
        while seen.count(marker) < count and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(leader, 4096)
        assert seen.count(marker) >= count, seen.decode(errors="replace")

    try:
        wait_for(b"\n> ", 1)
        os.write(leader, b"hellx\x7fo\r")  # a typo, erased with backspace
        wait_for(b"\n> ", 2)  # answered; the prompt again
        first = len(seen)
        os.write(leader, b"\x1b[A\r")  # up arrow: the last message again
        wait_for(b"\n> ", 3)
        os.write(leader, b"/exit\r")
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    assert b"^[[A" not in seen and seen.count(b" tok/s]") == 2
    assert seen[first:].count(b"hello") == 1  # recalled and sent again
