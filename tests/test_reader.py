"""ReadPool: chunked, threaded reads give the file's bytes exactly, and fail as one error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from devicemap.errors import CorruptCheckpoint
from devicemap.load import reader
from devicemap.load.loader import load
from devicemap.load.reader import ReadPool
from devicemap.model.checkpoint import (
    CheckpointIndex,
    private_map,
    read_index,
    resolve_model,
    tensor_view,
)


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    tensors = {
        "big": torch.randn(1000, 37),  # 148,000 bytes: many chunks at a 4 KiB chunk size
        "small": torch.arange(10, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "half": torch.randn(33, 7).half(),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    (tmp_path / "config.json").write_text("{}")  # resolve_model wants one beside the weights
    return path


def index_of(shard: Path) -> CheckpointIndex:
    return read_index(resolve_model(shard))


def test_chunked_threaded_reads_give_the_exact_bytes(
    shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "CHUNK", 4096)
    index = index_of(shard)
    done: list[int] = []
    with ReadPool(workers=3) as reads:
        outs = {}
        for name, info in index.tensors.items():
            outs[name] = torch.full(info.shape, 7, dtype=info.dtype)
            reads.start(info, outs[name], done=done.append)
        reads.wait()
    from safetensors.torch import load_file

    expected = load_file(shard)
    for name, tensor in expected.items():
        assert torch.equal(outs[name], tensor), name
    assert sum(done) == sum(i.nbytes for i in index.tensors.values())
    assert len(done) > 30  # the big tensor really went in chunks


def test_a_file_cut_after_indexing_fails_with_the_tensor_and_file_named(
    shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "CHUNK", 4096)
    info = index_of(shard).tensors["big"]
    with open(shard, "r+b") as f:
        f.truncate(info.offset + info.nbytes - 5000)  # the last two chunks are gone
    out = torch.empty(info.shape, dtype=info.dtype)
    with ReadPool(workers=2) as reads:
        reads.start(info, out)
        with pytest.raises(CorruptCheckpoint, match=r"'big' ends past the end") as caught:
            reads.wait()
    assert str(shard) in str(caught.value)


@pytest.mark.parametrize(
    ("step", "dtype", "disk"),
    [
        ("_populate", torch.float32, False),  # cpu tier: the file's pages, mapped in
        ("_pread", torch.float32, True),  # cpu tier beside a disk tier: read into RAM
        ("_pread", torch.bfloat16, False),  # converted on the way
    ],
)
def test_a_failed_read_while_loading_keeps_nothing(
    tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    dtype: torch.dtype,
    disk: bool,
) -> None:
    """A read that fails in a worker thread surfaces from load() and every tensor goes back."""
    from devicemap.model.skeleton import build_skeleton

    real = getattr(reader, step)
    calls = []

    def fail_late(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 20:
            raise CorruptCheckpoint("disk went away")
        real(*args)

    monkeypatch.setattr(reader, step, fail_late)
    skeleton = build_skeleton(tiny_models["llama"], dtype=dtype)
    pins = {"model.layers.3": "disk"} if disk else {}
    budgets = {"cpu": "1GiB", "disk": "1GiB"}
    with pytest.raises(CorruptCheckpoint, match="disk went away"):
        load(skeleton, max_memory=budgets, pins=pins, offload_exec="cpu", progress=False)
    assert len(calls) >= 20
    assert all(p.is_meta for p in skeleton.model.parameters()), "a failed load keeps nothing"


def test_populate_maps_a_view_in_without_copying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "CHUNK", 1 << 20)
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(8 << 20, dtype=torch.uint8)}, file)  # 8 MiB
    (tmp_path / "config.json").write_text("{}")
    info = index_of(file).tensors["w"]
    view = tensor_view(info, mapping=private_map(file))
    before = file_rss()
    done: list[int] = []
    with ReadPool(workers=2) as reads:
        reads.populate(view, done=done.append)
        reads.wait()
    assert file_rss() - before >= (8 << 20) - 8192  # the view's pages, mapped: file-backed
    assert sum(done) == 8 << 20 and len(done) == 8


def file_rss() -> int:
    """Resident file-backed bytes of this process (RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")
