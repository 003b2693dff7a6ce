"""GGUF files as models: converted once into the devicemap cache, bad files refused.

A tiny llama GGUF (2 layers, 262-token byte-level vocabulary, chat template) is written
with the `gguf` package, so each conversion here takes a second or two; the demo's real
GGUF file is tested in test_demo.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import devicemap
from devicemap.errors import (
    CacheError,
    ConfigError,
    CorruptCheckpoint,
    DevicemapError,
    ModelNotFound,
)
from devicemap.model import gguf as gguf_files
from devicemap.model.checkpoint import read_index, resolve_model

gguf = pytest.importorskip("gguf")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_alphabet() -> list[str]:
    """GPT-2's 256 byte-level characters, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_gguf(path: Path, *, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny llama-shaped GGUF file (float32 tensors, tied embeddings), about 370 KB."""
    hidden, layers, heads, kv, inter = 64, 2, 4, 2, 128
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    tokens = [*SPECIAL, *byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def weight(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    weight("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        weight(f"blk.{i}.attn_q.weight", heads * hidden // heads, hidden)
        weight(f"blk.{i}.attn_k.weight", kv * hidden // heads, hidden)
        weight(f"blk.{i}.attn_v.weight", kv * hidden // heads, hidden)
        weight(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        weight(f"blk.{i}.ffn_gate.weight", inter, hidden)
        weight(f"blk.{i}.ffn_up.weight", inter, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, inter)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf")


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One devicemap cache for the session's conversions ($DEVICEMAP_CACHE points at it)."""
    root = tmp_path_factory.mktemp("devicemap-cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("DEVICEMAP_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def converted(tiny_gguf: Path, cache: Path) -> Path:
    """The tiny file's converted directory, converted once per session."""
    return resolve_model(tiny_gguf).root


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "fresh-cache"
    monkeypatch.setenv("DEVICEMAP_CACHE", str(root))
    return root


def left_in(cache: Path) -> list[str]:
    """What a failed conversion left in the cache besides its (empty) lock file."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                  if p.suffix != ".lock" and p != cache / "gguf")  # fmt: skip


def no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_files, "_convert", fail)


# --- a good file ---------------------------------------------------------------


def test_gguf_file_resolves_to_its_converted_directory(
    tiny_gguf: Path, cache: Path, converted: Path
) -> None:
    source = resolve_model(tiny_gguf)
    assert source.name == str(tiny_gguf)  # what the user typed, for messages and plans
    assert source.root == converted and converted.parent == cache / "gguf"
    assert converted.name == f"tiny-chat-{gguf_files.gguf_fingerprint(tiny_gguf)}"
    assert gguf_files.is_complete(converted)
    assert source.format == "safetensors" and source.config_path == converted / "config.json"
    config = json.loads(source.config_path.read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2
    tensors = read_index(source).tensors
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_converted_model_equals_loading_the_gguf_directly(tiny_gguf: Path, converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    direct = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = tokenizer("the the", return_tensors="pt").input_ids
    assert ids.tolist() == [[len(SPECIAL) + ord("t"), 260, 261]]  # t, he, Ġthe: its merges
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 256


def test_directory_holding_one_gguf_file(
    tiny_gguf: Path, converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "downloads"
    directory.mkdir()
    (directory / "tiny-chat.gguf").symlink_to(tiny_gguf)
    (directory / "README.md").write_text("a model card")
    no_conversion(monkeypatch)  # same bytes, same name: the session's conversion is reused
    source = resolve_model(directory)
    assert source.root == converted and source.name == str(directory)


def test_same_bytes_under_another_name_are_converted_again(
    tiny_gguf: Path, tmp_path: Path, fresh_cache: Path
) -> None:
    copy = shutil.copy(tiny_gguf, tmp_path / "my-model.gguf")
    source = resolve_model(copy)
    assert source.root.parent == fresh_cache / "gguf" and source.root.name.startswith("my-model-")


def test_several_gguf_files_ask_for_one(tiny_gguf: Path, tmp_path: Path) -> None:
    for name in ("model-Q4_K_M.gguf", "model-Q8_0.gguf"):
        (tmp_path / name).symlink_to(tiny_gguf)
    with pytest.raises(ModelNotFound) as e:
        resolve_model(tmp_path)
    message = str(e.value)
    assert "2 GGUF files" in message and "model-Q4_K_M.gguf" in message
    assert "model-Q8_0.gguf" in message and str(tmp_path / "model-Q4_K_M.gguf") in message


def test_a_directory_with_config_json_is_not_read_as_gguf(tiny_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "model.gguf").symlink_to(tiny_gguf)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    source = resolve_model(tmp_path)
    assert source.root == tmp_path and source.weight_files == ()


def test_second_resolve_converts_nothing(
    tiny_gguf: Path, converted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_conversion(monkeypatch)
    assert resolve_model(tiny_gguf).root == converted
    assert gguf_files.converted_dir(tiny_gguf) == converted


def test_plan_a_gguf_file(tiny_gguf: Path, converted: Path) -> None:
    plan = devicemap.plan(tiny_gguf, max_memory={"cpu": "1GiB"})
    assert plan.model == str(tiny_gguf)
    assert set(plan.device_map.values()) == {"cpu"} and "model.layers.1" in plan.device_map


def test_hub_repo_holding_a_gguf_file(
    tiny_gguf: Path, converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached GGUF repo (no config.json, one .gguf) resolves by its hub id."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-GGUF"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "blobs").mkdir()
    shutil.copy(tiny_gguf, repo / "blobs" / "abc123")
    (repo / "snapshots" / commit / "tiny-chat.gguf").symlink_to(Path("../../blobs/abc123"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    no_conversion(monkeypatch)  # same bytes and file name as the session's file
    source = resolve_model("org/tiny-GGUF")
    assert source.name == "org/tiny-GGUF" and source.root == converted


def test_fingerprint_samples_the_tensor_data(tmp_path: Path) -> None:
    """Two files with the same metadata and size (two fine-tunes) get different directories."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    data = bytearray(b"GGUF" + bytes(3 * 2**20))
    a.write_bytes(data)
    data[-1] = 1  # past the 1 MiB header: only the data samples can see it
    b.write_bytes(data)
    assert gguf_files.gguf_fingerprint(a) != gguf_files.gguf_fingerprint(b)
    shutil.copy(a, tmp_path / "c.gguf")
    os.utime(tmp_path / "c.gguf", (0, 0))
    assert gguf_files.gguf_fingerprint(tmp_path / "c.gguf") == gguf_files.gguf_fingerprint(a)


# --- bad files: a typed error naming the file, nothing half-written -----------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04" + bytes(100), "not a GGUF file: a GGUF file starts with the bytes b'GGUF'"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "git lfs pull"),
        (b"GGUF", "truncated"),
        (b"GGUF\x09\x00\x00\x00" + bytes(100), "GGUF version 9"),
    ],
)
def test_not_a_gguf_file(tmp_path: Path, fresh_cache: Path, content: bytes, fragment: str) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(CorruptCheckpoint) as e:
        resolve_model(bad)
    assert str(bad) in str(e.value) and fragment in str(e.value)
    assert not fresh_cache.exists()  # refused before anything is written


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.999])
def test_truncated_gguf_file(
    tiny_gguf: Path, tmp_path: Path, fresh_cache: Path, keep: float
) -> None:
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpoint) as e:
        resolve_model(cut)
    message = str(e.value)
    assert str(cut) in message and "truncated or damaged" in message and "Download it" in message
    assert left_in(fresh_cache) == []


def test_unsupported_architecture(tmp_path: Path, fresh_cache: Path) -> None:
    odd = write_gguf(tmp_path / "odd.gguf", arch="frobnicator")
    with pytest.raises(ConfigError) as e:
        resolve_model(odd)
    message = str(e.value)
    assert str(odd) in message and "'frobnicator'" in message
    assert "llama" in message and "qwen2" in message  # what it could convert
    assert "config.json and safetensors" in message  # the fix
    assert left_in(fresh_cache) == []


def test_full_disk_keeps_nothing(
    tiny_gguf: Path, tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: Path, tensors: dict[str, Any]) -> None:
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_files, "_write_shard", full)
    with pytest.raises(CacheError) as e:
        resolve_model(tiny_gguf)
    message = str(e.value)
    assert str(fresh_cache / "gguf") in message and "DEVICEMAP_CACHE" in message
    assert left_in(fresh_cache) == []


def test_gguf_package_missing(
    tiny_gguf: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gguf_files.importlib.util.find_spec
    monkeypatch.setattr(
        gguf_files.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "gguf" else real(name, *args),
    )
    with pytest.raises(ConfigError, match=r"pip install 'gguf>=0\.10'"):
        resolve_model(tiny_gguf)
    assert left_in(fresh_cache) == []


def test_missing_file_and_errors_are_devicemap_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such"):
        gguf_files.converted_dir(tmp_path / "nowhere.gguf")
    for error in (CorruptCheckpoint, ConfigError, CacheError, ModelNotFound):
        assert issubclass(error, DevicemapError)
