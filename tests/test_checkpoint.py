"""Checkpoint resolution, header indexing, validation and zero-copy views."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devicemap.errors import BadOption, CorruptCheckpoint, MissingShard, ModelNotFound
from devicemap.model import checkpoint as ckpt
from devicemap.model.checkpoint import (
    close_mmaps,
    private_map,
    read_index,
    read_tensor,
    resolve_model,
    tensor_view,
)
from tiny import ARCHS, build_tiny, make_tiny

MIB = 2**20


@pytest.fixture(autouse=True)
def _drop_maps() -> Iterator[None]:
    yield
    close_mmaps()


def safe_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint, read by the reference library."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def assert_index_matches(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    index = read_index(resolve_model(directory))
    assert sorted(index.tensors) == sorted(expected)
    for key, info in index.tensors.items():
        assert info.name == key
        assert (info.shape, info.dtype) == (tuple(expected[key].shape), expected[key].dtype), key
        view = tensor_view(info)
        assert view.dtype == expected[key].dtype and torch.equal(view, expected[key]), key
    assert index.nbytes == sum(t.numel() * t.element_size() for t in expected.values())


def config_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    build_tiny("llama").config.to_json_file(path / "config.json")
    return path


def write_raw(path: Path, header: bytes, data: bytes = b"", header_len: int | None = None) -> None:
    """A hand-made safetensors file: 8-byte little-endian header length, header, data."""
    n = len(header) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + header + data)


# --- well-formed checkpoints -------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_index_equals_safe_open(tiny_models: dict[str, Path], arch: str) -> None:
    directory = tiny_models[arch]
    source = resolve_model(directory)
    shards = set(
        json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()
    )
    assert source.format == "safetensors" and len(source.weight_files) > 1
    assert {f.name for f in source.weight_files} == shards
    assert source.config_path == directory / "config.json" and source.name == str(directory)
    assert_index_matches(directory, safe_tensors(directory))


def test_bf16_views_are_exact(tmp_path: Path) -> None:
    directory = make_tiny("qwen2", tmp_path / "bf16", dtype=torch.bfloat16)
    expected = safe_tensors(directory)
    assert {t.dtype for t in expected.values()} == {torch.bfloat16}
    assert_index_matches(directory, expected)


def test_single_file_every_dtype(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "m")
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(3).double(),
        "fp8": torch.randn(9).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(4).to(torch.float8_e5m2),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    typed = str(directory / "model.safetensors")
    source = resolve_model(typed)
    assert (source.name, source.root, source.format) == (typed, directory, "safetensors")
    assert source.weight_files == (directory / "model.safetensors",)
    index = read_index(source)
    for key, value in tensors.items():  # fp8 has no torch.equal kernel: compare bytes
        got = tensor_view(index.tensors[key])
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), key


def test_view_is_zero_copy(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "big")
    save_file(
        {"w": torch.ones(32 * MIB // 2, dtype=torch.bfloat16)}, directory / "model.safetensors"
    )
    info = read_index(resolve_model(directory)).tensors["w"]
    process = psutil.Process()
    rss = process.memory_info().rss
    view = tensor_view(info)
    assert process.memory_info().rss - rss < 4 * MIB  # 32 MiB viewed, nothing copied
    mapping = ckpt._mmap_for(info.file)
    base = torch.frombuffer(mapping, dtype=torch.uint8).data_ptr()
    assert view.data_ptr() == base + info.offset  # the view IS the file's map
    assert tensor_view(info).data_ptr() == view.data_ptr()  # one map per file, shared
    close_mmaps()  # cached maps dropped: the live view keeps its map alive
    assert ckpt._mmap_for(info.file) is not mapping
    assert view[-1].item() == 1.0
    copy = read_tensor(info)
    copy[0] = 2.0  # read_tensor gives ordinary, writable memory
    assert copy.data_ptr() != view.data_ptr() and view[0].item() == 1.0


def test_writable_view_is_copy_on_write(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "cow")
    file = directory / "model.safetensors"
    save_file({"a": torch.ones(3), "w": torch.ones(8 * MIB // 4)}, file)  # w: 8 MiB of fp32
    info = read_index(resolve_model(directory)).tensors["w"]
    before = file.read_bytes()
    view = tensor_view(info, mapping=private_map(file))
    assert view.data_ptr() != tensor_view(info).data_ptr()  # its own (private) map
    view[5] = 7.0  # a private page: no crash, and the file is untouched
    assert view[5].item() == 7.0 and view[4].item() == 1.0
    assert file.read_bytes() == before
    assert tensor_view(info)[5].item() == 1.0


def test_bin_checkpoint_sharded(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "bin")
    state = {k: v.clone() for k, v in build_tiny("llama").state_dict().items()}
    keys = sorted(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": keys[::2],
        "pytorch_model-00002-of-00002.bin": keys[1::2],
    }
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, directory / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = resolve_model(directory)
    assert source.format == "bin" and [f.name for f in source.weight_files] == sorted(halves)
    index = read_index(source)
    assert {i.offset for i in index.tensors.values()} == {-1}
    assert_index_matches(directory, state)
    assert all(torch.equal(read_tensor(index.tensors[k]), state[k]) for k in keys)
    save_file({"x": torch.ones(2)}, directory / "model.safetensors")  # both formats: safetensors
    assert resolve_model(directory).format == "safetensors"


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/io is Linux-only")
def test_bin_index_reads_no_tensor_data(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "bin")
    torch.save({"w": torch.zeros(4 * MIB)}, directory / "pytorch_model.bin")  # 16 MiB
    source = resolve_model(directory / "pytorch_model.bin")

    def bytes_read() -> int:
        lines = Path("/proc/self/io").read_text().splitlines()
        return next(int(line.split()[1]) for line in lines if line.startswith("rchar"))

    before = bytes_read()
    index = read_index(source)
    assert bytes_read() - before < MIB
    assert index.tensors["w"].shape == (4 * MIB,) and index.tensors["w"].nbytes == 16 * MIB


def test_bare_config(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "cfg")
    for typed in (directory / "config.json", directory):
        source = resolve_model(typed)
        assert (source.weight_files, source.format) == ((), None)
        assert source.config_path == directory / "config.json"
        assert read_index(source).tensors == {}


def test_hub_id_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(make_tiny("gpt2", tmp_path / "src"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = resolve_model("org/tiny")
    assert source.name == "org/tiny" and source.root == repo / "snapshots" / commit
    assert source.format == "safetensors"
    assert_index_matches(source.root, safe_tensors(tmp_path / "src"))


# --- bad input ----------------------------------------------------------------


def test_hub_id_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFound) as e:
        resolve_model("org/not-here")
    message = str(e.value)
    assert "'org/not-here'" in message and "no network" in message
    assert "`hf download org/not-here`" in message and "directory" in message


# --- hub revisions -------------------------------------------------------------

MAIN = "0123456789abcdef0123456789abcdef01234567"
V1 = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache holding org/tiny at two commits: main, and the tag v1.

    Laid out as `hf download` leaves it: refs/<name> holds a commit, snapshots/<commit>/
    links each file to blobs/<hash>. The two commits' configs differ in their layer count.
    """
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    for commit, layers in ((MAIN, 2), (V1, 3)):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(make_tiny("gpt2", tmp_path / "src" / commit), snapshot)
        config = json.loads((snapshot / "config.json").read_text())
        (snapshot / "config.json").unlink()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        blob = repo / "blobs" / f"config-{commit[:8]}"
        blob.write_text(json.dumps({**config, "n_layer": layers}))
        (snapshot / "config.json").symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return repo


def layers_of(source: ckpt.ModelSource) -> int:
    return int(json.loads(source.config_path.read_text())["n_layer"])


def test_hub_revision_picks_the_cached_commit(hub_cache: Path) -> None:
    default = resolve_model("org/tiny")
    assert default.root == hub_cache / "snapshots" / MAIN and layers_of(default) == 2
    for revision in ("main", MAIN):
        assert resolve_model("org/tiny", revision=revision).root == default.root
    for revision in ("v1", V1):
        source = resolve_model("org/tiny", revision=revision)
        assert source.name == "org/tiny" and source.root == hub_cache / "snapshots" / V1
        assert layers_of(source) == 3 and source.format == "safetensors"
        assert sorted(read_index(source).tensors) == sorted(read_index(default).tensors)


def test_hub_revision_resolved_through_huggingface_hub(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache layout is huggingface_hub's business: resolve_model asks snapshot_download."""
    import huggingface_hub

    calls: list[tuple[str, dict[str, object]]] = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        return real(repo_id, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    resolve_model("org/tiny", revision="v1")
    assert [(repo, kw["revision"], kw["local_files_only"]) for repo, kw in calls] == [
        ("org/tiny", "v1", True)
    ]


def test_hub_revision_not_cached(hub_cache: Path) -> None:
    for revision in ("v9", "fedcba9876543210fedcba9876543210fedcba98"):
        with pytest.raises(ModelNotFound) as e:
            resolve_model("org/tiny", revision=revision)
        message = str(e.value)
        assert f"'org/tiny' at revision {revision!r}" in message and "no network" in message
        assert f"`hf download org/tiny --revision {revision}`" in message  # the fix
        assert f"main ({MAIN[:12]})" in message and f"v1 ({V1[:12]})" in message  # what is there
        assert str(hub_cache.parent) in message


def test_hub_revision_of_an_uncached_repo(hub_cache: Path) -> None:
    with pytest.raises(ModelNotFound) as e:
        resolve_model("org/other", revision="v2")
    message = str(e.value)
    assert "'org/other' at revision 'v2'" in message and "the cache holds" not in message
    assert "`hf download org/other --revision v2`" in message


def test_hub_snapshot_known_to_be_incomplete(hub_cache: Path) -> None:
    """huggingface_hub's cached tree listing (trees/<commit>.json) names a file not on disk."""
    files = {
        p.name: {"size": 1, "blob_id": "0" * 40} for p in (hub_cache / "snapshots" / V1).iterdir()
    }
    files["model-00009-of-00009.safetensors"] = {"size": 1, "blob_id": "1" * 40}
    (hub_cache / "trees").mkdir()
    (hub_cache / "trees" / f"{V1}.json").write_text(
        json.dumps({"format_version": 1, "files": files})
    )
    with pytest.raises(ModelNotFound) as e:
        resolve_model("org/tiny", revision="v1")
    message = str(e.value)
    assert "'org/tiny' at revision 'v1' is only partly in the Hugging Face cache" in message
    assert "model-00009-of-00009.safetensors" in message
    assert "`hf download org/tiny --revision v1`" in message


@pytest.mark.parametrize("revision", ["", " ", "../../../etc", "/abs", "a/../../b"])
def test_revision_that_names_nothing(hub_cache: Path, revision: str) -> None:
    with pytest.raises(BadOption) as e:
        resolve_model("org/tiny", revision=revision)
    assert e.value.options == ("revision",) and "branch, a tag or a commit hash" in str(e.value)


def test_revision_for_a_local_path(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "cfg")
    with pytest.raises(BadOption) as e:
        resolve_model(directory, revision="v1")
    assert str(directory) in str(e.value) and "a local path" in str(e.value)


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such file") as e:
        resolve_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_config_missing(tmp_path: Path) -> None:
    directory = tmp_path / "weights-only"
    directory.mkdir()
    save_file({"x": torch.ones(2)}, directory / "model.safetensors")
    for typed in (directory, directory / "model.safetensors"):
        with pytest.raises(ModelNotFound, match=r"no config\.json") as e:
            resolve_model(typed)
        assert str(directory) in str(e.value)


def test_garbage_header(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "m")
    write_raw(directory / "model.safetensors", b"\xff\xfe not json at all")
    with pytest.raises(CorruptCheckpoint, match="not a JSON object") as e:
        read_index(resolve_model(directory))
    assert "model.safetensors" in str(e.value) and "Re-download" in str(e.value)


def test_header_longer_than_file(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "m")
    write_raw(directory / "model.safetensors", b"{}", header_len=10**9)  # over the 100 MB cap
    with pytest.raises(CorruptCheckpoint, match="not a safetensors file") as e:
        read_index(resolve_model(directory))
    message = str(e.value)  # says what was expected, never echoes the file's first bytes
    assert "model.safetensors" in message and "Re-download" in message
    assert "1000000000" not in message and "8 bytes, little-endian" in message
    write_raw(directory / "model.safetensors", b"{}", header_len=1000)  # plausible, cut short
    with pytest.raises(CorruptCheckpoint, match=r"1000-byte header runs past the end.*truncated"):
        read_index(resolve_model(directory))


def test_inconsistent_entries_all_listed(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "m")
    header = {
        "short": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]},
        "odd": {"dtype": "Q7", "shape": [1], "data_offsets": [8, 9]},
        "fine": {"dtype": "U8", "shape": [2], "data_offsets": [9, 11]},
    }
    write_raw(directory / "model.safetensors", json.dumps(header).encode(), bytes(11))
    with pytest.raises(CorruptCheckpoint) as e:
        read_index(resolve_model(directory))
    message = str(e.value)
    assert "'short'" in message and "needs 16 bytes but data_offsets span 8" in message
    assert "'odd'" in message and "'Q7'" in message and "'fine'" not in message


def test_truncated_shard(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    directory = shutil.copytree(tiny_models["llama"], tmp_path / "cut")
    shard = sorted(directory.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CorruptCheckpoint, match="truncated") as e:
        read_index(resolve_model(directory))
    message = str(e.value)
    assert shard.name in message and "tensor '" in message and "Re-download" in message


def test_missing_shards_all_named(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    directory = shutil.copytree(tiny_models["mistral"], tmp_path / "partial")
    gone = sorted(directory.glob("*.safetensors"))[1:3]
    for shard in gone:
        shard.unlink()
    with pytest.raises(MissingShard) as e:
        read_index(resolve_model(directory))
    message = str(e.value)
    assert all(shard.name in message for shard in gone)
    assert "model.safetensors.index.json" in message and "2 shard(s)" in message


def test_unreadable_bin(tmp_path: Path) -> None:
    directory = config_dir(tmp_path / "m")
    (directory / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CorruptCheckpoint, match="not a readable PyTorch checkpoint") as e:
        read_index(resolve_model(directory))
    assert "pytorch_model.bin" in str(e.value)


def test_cli_revision_plans_that_commit(hub_cache: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from devicemap.cli.main import app

    def plan(*args: str) -> dict[str, Any]:
        result = CliRunner().invoke(app, ["plan", "org/tiny", "--json", *args])
        assert result.exit_code == 0, result.output
        return dict(json.loads(result.stdout))

    main, v1 = plan(), plan("--revision", "v1")
    blocks = [b for b in v1["device_map"] if b.startswith("transformer.h.")]
    assert len(blocks) == 3 and len([b for b in main["device_map"] if ".h." in b]) == 2
    missing = CliRunner().invoke(app, ["plan", "org/tiny", "--revision", "v9"])
    assert missing.exit_code == 1 and "hf download org/tiny --revision v9" in missing.stderr
