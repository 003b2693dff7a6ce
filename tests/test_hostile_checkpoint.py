"""Hostile checkpoints: every file here is built in tmp_path to break one rule.

Each must give one clean CorruptCheckpoint (or MissingShard) naming the file and what is
wrong: never a TypeError, a RecursionError, a megabyte of message, or weights read from
bytes that are not what the header says.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from devicemap.errors import CorruptCheckpoint, MissingShard
from devicemap.model.checkpoint import close_mmaps, read_index, resolve_model, tensor_view


@pytest.fixture(autouse=True)
def _drop_maps() -> Iterator[None]:
    yield
    close_mmaps()


def model_dir(path: Path) -> Path:
    """A directory devicemap accepts as a model: read_index needs only a config.json there."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    return path


def write_raw(path: Path, header: bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A hand-made safetensors file: 8-byte little-endian header length, header, data."""
    n = len(header) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def entry(dtype: Any = "U8", shape: Any = (1,), offsets: Any = (0, 1)) -> dict[str, Any]:
    shape = list(shape) if isinstance(shape, tuple) else shape
    offsets = list(offsets) if isinstance(offsets, tuple) else offsets
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def corrupt(directory: Path) -> str:
    """The message of the CorruptCheckpoint that indexing `directory` must raise."""
    with pytest.raises(CorruptCheckpoint) as e:
        read_index(resolve_model(directory))
    return str(e.value)


def library_accepts(file: Path) -> bool:
    """Whether the safetensors library itself opens the file and reads every tensor."""
    try:
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                f.get_tensor(key)
    except (SafetensorError, ValueError, OSError):
        return False
    return True


def devicemap_accepts(directory: Path) -> bool:
    try:
        read_index(resolve_model(directory))
    except CorruptCheckpoint:
        return False
    return True


# --- header entries: wrong JSON types -----------------------------------------

BAD_ENTRIES = {
    "dtype a number": (entry(dtype=7), "dtype must be a string"),
    "dtype null": (entry(dtype=None), "dtype must be a string"),
    "dtype unknown": (entry(dtype="Q7"), "dtype 'Q7' is not supported"),
    "shape a string": (entry(shape="1"), "shape must be a list of non-negative integers"),
    "shape of floats": (entry(shape=[1.0]), "shape must be a list"),
    "shape negative": (entry(shape=[-1]), "shape must be a list"),
    "shape of bools": (entry(shape=[True]), "shape must be a list"),
    "shape an object": (entry(shape={"a": 1}), "shape must be a list"),
    "shape past u64": (entry(shape=[2**64]), "shape must be a list"),
    "offsets floats": (entry(offsets=[0.0, 1.0]), "data_offsets must be [begin, end]"),
    "offsets negative": (entry(offsets=[-1, 0]), "data_offsets must be [begin, end]"),
    "offsets bools": (entry(offsets=[False, True]), "data_offsets must be [begin, end]"),
    "offsets three": (entry(offsets=[0, 1, 1]), "data_offsets must be [begin, end]"),
    "offsets reversed": (entry(offsets=[1, 0]), "data_offsets must be [begin, end]"),
    "offsets a string": (entry(offsets="0-1"), "data_offsets must be [begin, end]"),
    "entry a list": ([0, 1], "the entry is a list, not an object"),
    "entry a number": (3, "the entry is a number, not an object"),
    "no dtype": ({"shape": [1], "data_offsets": [0, 1]}, "the entry has no dtype"),
    "nothing": ({}, "has no dtype and no shape and no data_offsets"),
    "size overflow": (entry(shape=[2**40, 2**40, 2**40]), "larger than 2**64 bytes"),
    "bytes mismatch": (entry(dtype="F32", shape=[1]), "needs 4 bytes but data_offsets span 1"),
}


@pytest.mark.parametrize("case", BAD_ENTRIES, ids=list(BAD_ENTRIES))
def test_bad_entry_is_named_not_a_type_error(tmp_path: Path, case: str) -> None:
    bad, fragment = BAD_ENTRIES[case]
    directory = model_dir(tmp_path / "m")
    file = write_raw(directory / "model.safetensors", json.dumps({"w": bad}).encode(), b"x")
    message = corrupt(directory)
    assert fragment in message and f"{file}: tensor 'w'" in message
    assert not library_accepts(file)  # the library refuses each of them too


@pytest.mark.parametrize(
    "metadata", [{"format": 1}, ["pt"], "pt", {"a": {"b": "c"}}, {"s": "\ud800"}]
)
def test_metadata_must_map_to_strings(tmp_path: Path, metadata: object) -> None:
    directory = model_dir(tmp_path / "m")
    header = json.dumps({"__metadata__": metadata, "w": entry()}).encode()
    file = write_raw(directory / "model.safetensors", header, b"x")
    assert "__metadata__ must map names to strings" in corrupt(directory)
    assert not library_accepts(file)


def test_every_bad_entry_in_one_short_error(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m")
    header = {f"t{i}": entry(dtype=i, offsets=[i, i + 1]) for i in range(5000)}
    write_raw(directory / "model.safetensors", json.dumps(header).encode(), b"x" * 5000)
    message = corrupt(directory)
    assert message.count("dtype must be a string") == 10 and "and 4990 more" in message
    assert len(message) < 4000 and "model.safetensors" in message


def test_huge_names_and_values_are_clipped(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m")
    name = "k" * 7_000_000  # a 7 MB tensor name, a 7 MB dtype, a shape of 100k dimensions
    header = {
        name: entry(dtype="D" * 7_000_000),
        "w": entry(shape=list(range(1, 10**5)), offsets=[1, 2]),
    }
    write_raw(directory / "model.safetensors", json.dumps(header).encode(), b"xx")
    message = corrupt(directory)
    assert len(message) < 2000
    assert "tensor 'kkkkkkkk" in message and "kkk...kkk" in message and "DDD...DDD" in message
    assert "tensor 'w': shape [1, 2, 3, 4, 5, 6, 7, 8, ...] of U8 is larger than 2**64" in message


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_nesting_is_a_clean_error(tmp_path: Path, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    directory = model_dir(tmp_path / "m")
    header = "{" + '"w":' + opener * 100_000 + "1" + closer * 100_000 + "}"
    write_raw(directory / "model.safetensors", header.encode())
    assert "nested too deeply" in corrupt(directory)


# --- the header as a whole ------------------------------------------------------


def test_header_length_cap(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m")
    file = write_raw(directory / "model.safetensors", b"{}", header_len=100_000_001)
    with open(file, "r+b") as f:
        f.truncate(100_000_010)  # sparse: the header would fit the file, but not the cap
    message = corrupt(directory)
    assert "not a safetensors file" in message and "at most 100 MB" in message
    assert "100000001" not in message


@pytest.mark.parametrize(
    ("start", "hint"),
    [
        (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "not a safetensors file"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(40), "not a safetensors file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "git lfs pull"),
        (b"\x01\x02", "not a safetensors file"),
        (b"", "not a safetensors file"),
    ],
    ids=["html page", "zip", "lfs pointer", "two bytes", "empty"],
)
def test_not_safetensors_says_what_was_expected(tmp_path: Path, start: bytes, hint: str) -> None:
    directory = model_dir(tmp_path / "m")
    (directory / "model.safetensors").write_bytes(start)
    message = corrupt(directory)
    assert hint in message and "model.safetensors" in message
    echoes = ["DOCTYPE", "oid", "sha256", repr(start[:8])]  # nothing of the file is shown,
    if len(start) >= 8:  # not even its first 8 bytes as the length they would be
        echoes.append(str(struct.unpack("<Q", start[:8])[0]))
    assert not [shown for shown in echoes if shown in message]


@pytest.mark.parametrize(
    "header",
    [
        '{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'.encode("utf-16"),
        b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}\x00\x00',
        b'{"w": {"dtype": "U8", "shape": [NaN], "data_offsets": [0, 1]}}',
        b'{"w": {"dtype": "U8", "shape": [-0], "data_offsets": [0, 0]}}',
        b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": Infinity}}',
        b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}',
        b'[{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}]',
        b'"w"',
        b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}",
    ],
    ids=[
        "utf-16",
        "nul padding",
        "nan",
        "minus zero",
        "infinity",
        "cut",
        "list",
        "string",
        "5000 digits",
    ],
)
def test_invalid_json_headers(tmp_path: Path, header: bytes) -> None:
    directory = model_dir(tmp_path / "m")
    file = write_raw(directory / "model.safetensors", header, b"x")
    assert "model.safetensors" in corrupt(directory)
    assert not library_accepts(file)


def test_unicode_keys_must_be_valid(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m")
    header = b'{"w\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    file = write_raw(directory / "model.safetensors", header, b"x")
    assert "not valid Unicode" in corrupt(directory)
    assert not library_accepts(file)


def test_repeated_keys_are_refused(tmp_path: Path) -> None:
    """Stricter than the library, which keeps one of two same-named tensors silently."""
    directory = model_dir(tmp_path / "m")
    one = json.dumps(entry(offsets=[0, 1]))
    header = f'{{"w": {one}, "w": {one}}}'.encode()
    write_raw(directory / "model.safetensors", header, b"x")
    assert "key 'w' appears more than once" in corrupt(directory)
    field = b'{"w": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    file = write_raw(directory / "model.safetensors", field, b"x")
    assert "key 'dtype' appears more than once" in corrupt(directory)
    assert not library_accepts(file)  # a repeated field the library refuses too


# --- byte layout: the tensors tile the data section exactly -------------------


LAYOUTS = {  # header entries, data size, what the error says (None: valid)
    "contiguous, out of key order": (
        {"b": entry(offsets=[1, 2]), "a": entry(offsets=[0, 1])}, 2, None,
    ),
    "empty tensors at the ends": (
        {"z": entry(shape=[0], offsets=[0, 0]), "a": entry(offsets=[0, 1]),
         "y": entry(shape=[0], offsets=[1, 1])}, 1, None,
    ),
    "no tensors, no data": ({}, 0, None),
    "gap at the start": ({"a": entry(offsets=[1, 2])}, 2, "data bytes 0..1, before tensor 'a'"),
    "gap between": (
        {"a": entry(offsets=[0, 1]), "b": entry(offsets=[2, 3])}, 3,
        "data bytes 1..2, before tensor 'b', belong to no tensor",
    ),
    "overlap": (
        {"a": entry(shape=[2], offsets=[0, 2]), "b": entry(shape=[2], offsets=[1, 3])}, 3,
        "tensor 'b' (data bytes 1..3) overlaps tensor 'a' (which ends at data byte 2)",
    ),
    "same bytes twice": (
        {"a": entry(offsets=[0, 1]), "b": entry(offsets=[0, 1])}, 1, "overlaps tensor 'a'",
    ),
    "empty tensor inside another": (
        {"a": entry(shape=[2], offsets=[0, 2]), "z": entry(shape=[0], offsets=[1, 1])}, 2,
        "tensor 'z' (data bytes 1..1) overlaps tensor 'a'",
    ),
    "bytes after the last": ({"a": entry()}, 3, "the last 2 bytes of the file belong to no tensor"),
    "data but no tensors": ({}, 4, "the last 4 bytes of the file belong to no tensor"),
    "truncated": (
        {"a": entry(), "b": entry(shape=[8], offsets=[1, 9])}, 5,
        "tensor 'b': data ends 4 bytes past the end of the file: truncated",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", LAYOUTS, ids=list(LAYOUTS))
def test_layout_like_the_library(tmp_path: Path, case: str) -> None:
    header, data_size, fragment = LAYOUTS[case]
    directory = model_dir(tmp_path / "m")
    file = write_raw(directory / "model.safetensors", json.dumps(header).encode(), bytes(data_size))
    assert library_accepts(file) == (fragment is None)
    if fragment is None:
        index = read_index(resolve_model(directory))
        assert sorted(index.tensors) == sorted(header)
        assert all(tensor_view(info).numel() == info.nbytes for info in index.tensors.values())
    else:
        assert fragment in corrupt(directory)


def test_all_problems_of_all_files_at_once(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m")
    write_raw(directory / "a.safetensors", json.dumps({"x": entry(dtype=1)}).encode(), b"x")
    write_raw(directory / "b.safetensors", json.dumps({"y": entry(offsets=[1, 2])}).encode(), b"yy")
    index = {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    message = corrupt(directory)
    assert f"{directory / 'a.safetensors'}: tensor 'x': dtype must be a string" in message
    assert f"{directory / 'b.safetensors'}: data bytes 0..1, before tensor 'y'" in message


def test_real_checkpoints_still_pass(tmp_path: Path) -> None:
    """Files written by the library itself (header padded with spaces, metadata) are valid."""
    directory = model_dir(tmp_path / "m")
    tensors = {"a": torch.randn(3, 5), "b": torch.zeros(0), "c": torch.arange(7, dtype=torch.int8)}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    index = read_index(resolve_model(directory))
    assert all(torch.equal(tensor_view(index.tensors[k]), v) for k, v in tensors.items())


# --- shards and the index file ----------------------------------------------------


def sharded(
    directory: Path, weight_map: object, shards: dict[str, dict[str, torch.Tensor]]
) -> Path:
    model_dir(directory)
    for name, tensors in shards.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, directory / name)
    (directory / "model.safetensors.index.json").write_text(json.dumps(weight_map))
    return directory


def test_same_tensor_in_two_shards(tmp_path: Path) -> None:
    shards = {"a.safetensors": {"w": torch.ones(2)}, "b.safetensors": {"w": torch.zeros(2)}}
    index = {"weight_map": {"w": "b.safetensors"}, "x": 1}  # the index lists only one of them
    directory = sharded(tmp_path / "m", index, {**shards, "c.safetensors": {"v": torch.ones(1)}})
    index["weight_map"] = {"w": "a.safetensors", "v": "b.safetensors", "u": "c.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    message = corrupt(directory)
    assert "tensor 'w' is in both" in message
    assert (
        str(directory / "a.safetensors") in message and str(directory / "b.safetensors") in message
    )


def test_same_tensor_in_two_bin_shards(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "bin")
    for name in ("p1.bin", "p2.bin"):
        torch.save({"w": torch.ones(2), name: torch.ones(1)}, directory / name)
    weight_map = {"w": "p1.bin", "x": "p2.bin"}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = corrupt(directory)
    assert "tensor 'w' is in both" in message and "p1.bin" in message and "p2.bin" in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[1, 2]", "it is not a JSON object"),
        (b"not json", "it is not valid JSON"),
        (b"\xff\xfe{}", "it is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "it is nested too deeply"),
        (b'{"metadata": {}}', 'its "weight_map" field is missing'),
        (b'{"weight_map": ["a.safetensors"]}', 'its "weight_map" field is a list'),
        (b'{"weight_map": "model.safetensors"}', 'its "weight_map" field is a string'),
        (b'{"weight_map": null}', 'its "weight_map" field is null'),
        (b'{"weight_map": {"w": 3}}', "a shard file name must be a string, not a number"),
        (b'{"weight_map": {"w": null}}', "a shard file name must be a string, not null"),
        (b'{"weight_map": {"w": ["a"]}}', "a shard file name must be a string, not a list"),
        (b'{"weight_map": {"w": {"f": "a"}}}', "must be a string, not an object"),
        (b'{"weight_map": {"w": ""}}', "not a file name"),
        (b'{"weight_map": {"w": "a\\u0000b"}}', "not a file name"),
    ],
)
def test_bad_index_names_the_index_and_field(tmp_path: Path, content: bytes, fragment: str) -> None:
    directory = model_dir(tmp_path / "m")
    index = directory / "model.safetensors.index.json"
    index.write_bytes(content)
    for typed in (directory, index):
        with pytest.raises(CorruptCheckpoint) as e:
            resolve_model(typed)
        message = str(e.value)
        assert str(index) in message and fragment in message and len(message) < 1000


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("../outside.safetensors", "leaves the index's directory"),
        ("a/../../outside.safetensors", "leaves the index's directory"),
        ("./../outside.safetensors", "leaves the index's directory"),
        ("..", "leaves the index's directory"),
        ("/etc/passwd", "an absolute path"),
        ("//server/share/x.safetensors", "an absolute path"),
        (".", "names the directory itself"),
        ("sub/..", "names the directory itself"),
    ],
)
def test_shard_paths_stay_inside(tmp_path: Path, name: str, fragment: str) -> None:
    directory = sharded(tmp_path / "m", {"weight_map": {"w": name}}, {})
    save_file({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    with pytest.raises(CorruptCheckpoint) as e:
        resolve_model(directory)
    message = str(e.value)
    assert fragment in message and f"weight_map['w'] = {name!r}" in message
    assert str(directory / "model.safetensors.index.json") in message


def test_shard_paths_that_normalise_inside_are_fine(tmp_path: Path) -> None:
    shards = {"sub/a.safetensors": {"w": torch.ones(2)}, "b.safetensors": {"v": torch.zeros(1)}}
    weight_map = {"w": "sub/./a.safetensors", "v": "sub/../b.safetensors", "u": "./b.safetensors"}
    directory = sharded(tmp_path / "m", {"weight_map": weight_map}, shards)
    source = resolve_model(directory)
    assert source.weight_files == (directory / "b.safetensors", directory / "sub/a.safetensors")
    assert sorted(read_index(source).tensors) == ["v", "w"]  # one file named twice: read once


def test_every_bad_shard_name_in_one_short_error(tmp_path: Path) -> None:
    weight_map = {f"t{i}": f"../{'x' * 200}{i}.safetensors" for i in range(3000)}
    directory = sharded(tmp_path / "m", {"weight_map": weight_map}, {})
    with pytest.raises(CorruptCheckpoint) as e:
        resolve_model(directory)
    message = str(e.value)
    assert message.count("leaves the index's directory") == 10 and "and 2990 more" in message
    assert len(message) < 4000


def test_many_missing_shards_listed_briefly(tmp_path: Path) -> None:
    weight_map = {f"t{i}": f"model-{i:05d}.safetensors" for i in range(2000)}
    directory = sharded(tmp_path / "m", {"weight_map": weight_map}, {})
    with pytest.raises(MissingShard) as e:
        read_index(resolve_model(directory))
    message = str(e.value)
    assert "2000 shard(s)" in message and "model-00000.safetensors" in message
    assert "and 1990 more" in message and len(message) < 2000


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_hub_cache_symlinks_are_allowed(tmp_path: Path) -> None:
    """snapshots/<rev>/<file> -> ../../blobs/<hash>: the link leaves the snapshot, the name not."""
    repo = tmp_path / "models--org--tiny"
    snapshot = model_dir(repo / "snapshots" / "0123abcd")
    (repo / "blobs").mkdir()
    tensors = {"a.safetensors": {"w": torch.ones(3)}, "b.safetensors": {"v": torch.arange(4.0)}}
    for i, (name, part) in enumerate(tensors.items()):
        save_file(part, repo / "blobs" / f"hash{i}")
        (snapshot / name).symlink_to(Path("../../blobs") / f"hash{i}")
    weight_map = {"w": "a.safetensors", "v": "b.safetensors"}
    (repo / "blobs" / "idx").write_text(json.dumps({"weight_map": weight_map}))
    (snapshot / "model.safetensors.index.json").symlink_to(Path("../../blobs/idx"))
    index = read_index(resolve_model(snapshot))
    assert torch.equal(tensor_view(index.tensors["v"]), torch.arange(4.0))
    assert index.tensors["w"].file == snapshot / "a.safetensors"


# --- pytorch .bin files that cannot be mapped in place ------------------------


def rezip(source: Path, target: Path, compression: int) -> None:
    """`source`'s records written again into `target` with `compression`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for record in old.infolist():
            new.writestr(record.filename, old.read(record.filename))


def test_compressed_bin_is_refused(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "bin")
    original = torch.arange(4096, dtype=torch.float32)
    torch.save({"w": original}, tmp_path / "stored.bin")
    rezip(tmp_path / "stored.bin", directory / "pytorch_model.bin", zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(directory / "pytorch_model.bin") as archive:  # really deflated
        assert {r.compress_type for r in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    message = corrupt(directory)
    assert "pytorch_model.bin" in message and "compressed" in message
    assert "re-save" in message and "safetensors" in message
    rezip(tmp_path / "stored.bin", directory / "pytorch_model.bin", zipfile.ZIP_STORED)
    close_mmaps()  # re-stored, it loads again, exactly
    index = read_index(resolve_model(directory))
    assert torch.equal(tensor_view(index.tensors["w"]), original)


def test_legacy_bin_is_refused(tmp_path: Path) -> None:
    """The pre-1.6 format indexes, but torch.load(mmap=True) cannot read it: say so up front."""
    directory = model_dir(tmp_path / "bin")
    torch.save(
        {"w": torch.ones(3)}, directory / "pytorch_model.bin", _use_new_zipfile_serialization=False
    )
    message = corrupt(directory)
    assert "legacy" in message and "re-save" in message and "pytorch_model.bin" in message


def test_unreadable_bin_does_not_echo_its_bytes(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "bin")
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x02secret-bytes" + bytes(100))
    message = corrupt(directory)
    assert "not a readable PyTorch checkpoint" in message and "expected a zip archive" in message
    assert len(message) < 1000
