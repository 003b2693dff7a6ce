"""Checkpoint index: tensor name -> (file, dtype, shape, offset), from file headers only.

Opens a model directory, a single weights file, a bare config.json, a hub id already in
the local Hugging Face cache (offline, at any cached revision), or a GGUF file (converted
once into the devicemap cache, see gguf.py). No tensor data is read here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import re
import reprlib
import struct
import sys
import threading
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import (
    BadOption,
    CorruptCheckpoint,
    DeviceOutOfMemory,
    MissingShard,
    ModelNotFound,
)
from . import gguf as gguf_files

Format = Literal["safetensors", "bin"]


@dataclass(frozen=True)
class ModelSource:
    """What a model argument resolved to on this machine."""

    name: str  # what the user typed (path or hub id), for messages
    config_path: Path  # the config.json
    root: Path  # the directory holding config (and weights, tokenizer) files
    weight_files: tuple[Path, ...]  # () for a bare config.json: planning only
    format: Format | None  # None when there are no weights


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the checkpoint."""

    name: str  # the key as stored in the checkpoint (before any conversion)
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the file to the data; -1 for pickled .bin
    nbytes: int


@dataclass(frozen=True)
class CheckpointIndex:
    source: ModelSource
    tensors: Mapping[str, TensorInfo]  # checkpoint key -> where it is

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


_INDEX_NAMES: dict[Format, str] = {
    "safetensors": "model.safetensors.index.json",
    "bin": "pytorch_model.bin.index.json",
}
_SINGLE_NAMES: dict[Format, str] = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}
_SUFFIX_FORMATS: dict[str, Format] = {".safetensors": "safetensors", ".bin": "bin"}
_REDOWNLOAD = "Re-download the checkpoint (or re-save it) and try again."
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# safetensors dtype strings -> torch dtypes; the optional ones depend on the torch version.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
}  # fmt: skip
for _code, _attr in [
    ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
]:  # fmt: skip
    if hasattr(torch, _attr):
        _DTYPES[_code] = getattr(torch, _attr)


# --- messages ----------------------------------------------------------------

_LISTED = 10  # problems one error lists; the rest are counted
_MAX_JSON = 100_000_000  # bytes: the safetensors library's limit on a header (and ours on an index)
_repr = reprlib.Repr()  # a hostile name or value is shown clipped, never in full
_repr.maxstring, _repr.maxother, _repr.maxlong, _repr.maxlist, _repr.maxdict = 120, 60, 40, 8, 4
_shown = _repr.repr


def _listing(problems: list[str]) -> str:
    """The first problems as an indented list, the rest counted."""
    lines = [f"  - {p}" for p in problems[:_LISTED]]
    if len(problems) > _LISTED:
        lines.append(f"  ... and {len(problems) - _LISTED} more")
    return "\n".join(lines)


def _json_kind(value: object) -> str:
    """A JSON value's type in words, for messages ("a list", "a number", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    kinds = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


# --- resolving a model argument ---------------------------------------------


def resolve_model(model: str | os.PathLike[str], *, revision: str | None = None) -> ModelSource:
    """Find config and weights for a directory, weights file, config.json, GGUF file or hub id.

    A hub id is looked up in the local Hugging Face cache only (`revision`: a branch, tag
    or commit hash cached there; default the cached main). A GGUF file, or a directory
    holding one and no config.json, resolves to its converted model directory (converted on
    first use, cached; `name` stays what was typed).
    """
    name = os.fspath(model)
    if not name.strip():  # Path("") is the current directory: never what was meant
        raise ModelNotFound(
            "the model name is empty. Give a model directory, a weights file or a config.json."
        )
    if revision is not None:
        _check_revision(name, revision)
    path = Path(name).expanduser()
    if path.exists():
        if revision is not None:
            raise BadOption(
                f"revision {revision!r} was given for {name}, a local path; a revision picks a"
                " cached commit of a hub model (such as org/name). Drop the revision, or give"
                " the hub id.",
                options=("revision",),
            )
        return _resolve_path(name, path)
    if _HUB_ID.match(name) and not name.endswith((".json", ".safetensors", ".bin", ".gguf")):
        return _resolve_hub(name, revision)
    raise ModelNotFound(
        f"{name}: no such file or directory. Give a model directory, a weights file"
        " or a config.json."
    )


def _check_revision(name: str, revision: str) -> None:
    """BadOption for a revision that names no ref or commit (empty, or a path outside refs/)."""
    parts = revision.split("/")
    if not revision.strip() or "\0" in revision or revision.startswith("/") or ".." in parts:
        raise BadOption(
            f"revision {revision!r} for {name}: give a branch, a tag or a commit hash, such as"
            " main, v1.0 or a 40-character commit id.",
            options=("revision",),
        )


def _resolve_path(name: str, path: Path) -> ModelSource:
    if (gguf := _gguf_of(name, path)) is not None:
        return _resolve_gguf(name, gguf)
    root = path if path.is_dir() else path.parent
    config = root / "config.json"
    if not config.is_file():
        raise ModelNotFound(
            f"{name}: no config.json in {root}. devicemap needs the model's config.json next to its"
            " weights: copy it from the model's hub page or the folder the weights came from."
        )
    if path.is_dir():
        files, fmt = _weights_in(path)
    elif path.name.endswith(".index.json"):
        fmt = "bin" if path.name.startswith("pytorch_model") else "safetensors"
        files = _shards_from_index(path)
    elif path.suffix in _SUFFIX_FORMATS:
        files, fmt = (path,), _SUFFIX_FORMATS[path.suffix]
    else:  # config.json itself, or some other file next to it: planning only
        files, fmt = (), None
    return ModelSource(name=name, config_path=config, root=root, weight_files=files, format=fmt)


def _gguf_of(name: str, path: Path) -> Path | None:
    """The GGUF file `path` means: itself, or the one GGUF file of a directory that has no
    config.json and no safetensors or .bin weights; None when it means something else."""
    if not path.is_dir():
        return path if gguf_files.is_gguf(path) else None
    if (path / "config.json").is_file() or any(_weight_files(path)):
        return None
    found = gguf_files.gguf_files(path)
    if len(found) > 1:
        listed = _listing([f.name for f in found])
        raise ModelNotFound(
            f"{name}: {len(found)} GGUF files in {path} and no config.json; give the one to"
            f" use, such as {path / found[0].name}:\n{listed}"
        )
    return found[0] if found else None


def _weight_files(directory: Path) -> Iterator[Path]:
    for suffix in _SUFFIX_FORMATS:
        yield from directory.glob(f"*{suffix}")


def _resolve_gguf(name: str, gguf: Path) -> ModelSource:
    """The converted directory of a GGUF file, under the name the user typed."""
    return _resolve_path(name, gguf_files.converted_dir(gguf))


def _weights_in(directory: Path) -> tuple[tuple[Path, ...], Format | None]:
    """The weight files of a model directory; safetensors win over .bin when both exist."""
    fmt: Format
    for fmt in ("safetensors", "bin"):
        index = directory / _INDEX_NAMES[fmt]
        if index.is_file():
            return _shards_from_index(index), fmt
        single = directory / _SINGLE_NAMES[fmt]
        if single.is_file():
            return (single,), fmt
    return (), None


def _shards_from_index(index: Path) -> tuple[Path, ...]:
    """Every shard the index's weight_map names, in sorted order (some may be missing).

    Each must be a relative path that stays inside the index's directory as written
    ("../x", "/etc/x" and "a/../../x" do not). Only the string is checked, never where it
    resolves: the Hugging Face cache links every snapshot file to ../../blobs/<hash>.
    """
    weight_map = _weight_map(index)
    problems = []
    for key, value in weight_map.items():
        if (problem := _shard_name_problem(value)) is not None:
            problems.append(f"weight_map[{_shown(key)}] = {_shown(value)}: {problem}")
    if problems:
        raise CorruptCheckpoint(
            f"{index}: the weight_map names shard files devicemap will not open:\n"
            f"{_listing(problems)}\n{_REDOWNLOAD}"
        )
    names = sorted({os.path.normpath(name) for name in weight_map.values()})
    return tuple(index.parent / name for name in names)


def _weight_map(index: Path) -> dict[str, Any]:
    """The index file's weight_map object (tensor name -> shard file), or CorruptCheckpoint."""
    if index.stat().st_size > _MAX_JSON:
        raise CorruptCheckpoint(f"{index}: over 100 MB, too large to be a checkpoint index.")
    data, what = None, "not a JSON object"
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except RecursionError:  # the C decoder refuses nesting deeper than the recursion limit
        what = "nested too deeply"
    except ValueError:  # also UnicodeDecodeError
        what = "not valid JSON"
    if not isinstance(data, dict):
        raise CorruptCheckpoint(
            f"{index}: not a valid checkpoint index: it is {what}; an index is a JSON object"
            f' whose "weight_map" maps each tensor name to its shard file. {_REDOWNLOAD}'
        )
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpoint(
            f'{index}: not a valid checkpoint index: its "weight_map" field is'
            f" {_json_kind(weight_map) if 'weight_map' in data else 'missing'}; it must be an"
            f" object mapping each tensor name to its shard file. {_REDOWNLOAD}"
        )
    return weight_map


def _shard_name_problem(name: object) -> str | None:
    """Why an index's shard file name is unsafe or meaningless, or None when it is fine."""
    if not isinstance(name, str):
        return f"a shard file name must be a string, not {_json_kind(name)}"
    if not name or "\0" in name:
        return "not a file name"
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:
        return "an absolute path; shard files are named relative to the index's directory"
    normal = os.path.normpath(name)  # lexical: "a/../b" -> "b", symlinks untouched
    if normal == os.curdir:
        return "names the directory itself, not a file"
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        return "leaves the index's directory; shard files must be inside it"
    return None


def _resolve_hub(name: str, revision: str | None) -> ModelSource:
    """A hub id already in the local Hugging Face cache; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
    )

    cache = _hub_cache_dir()
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=cache, local_files_only=True)
    except IncompleteSnapshotError as error:
        raise ModelNotFound(
            f"hub model {name!r}{_at(revision)} is only partly in the Hugging Face cache"
            f" ({cache}): {_first_line(error)} There is no network here: finish the download on"
            f" a connected machine with `{_download(name, revision)}` and copy the cache here."
        ) from None
    except (LocalEntryNotFoundError, HFValidationError):
        raise _not_cached(name, revision, cache) from None
    return _resolve_path(name, Path(folder))


def _not_cached(name: str, revision: str | None, cache: Path) -> ModelNotFound:
    download = _download(name, revision)
    if revision is None:
        return ModelNotFound(
            f"{name!r} is not a local path, and hub model {name!r} is not in the Hugging Face cache"
            f" ({cache}). There is no network here, so nothing can be downloaded. Point devicemap"
            f" at a local copy instead: a model directory path, or run `{download}` on a"
            " connected machine and copy the folder here."
        )
    cached = _cached_revisions(name, cache)
    held = f"; the cache holds {', '.join(cached)}" if cached else ""
    return ModelNotFound(
        f"hub model {name!r} at revision {revision!r} is not in the Hugging Face cache"
        f" ({cache}){held}. There is no network here, so nothing can be downloaded: run"
        f" `{download}` on a connected machine and copy the cache here, or point devicemap at"
        " a local copy of that revision."
    )


def _at(revision: str | None) -> str:
    return "" if revision is None else f" at revision {revision!r}"


def _download(name: str, revision: str | None) -> str:
    """The command that puts this model (at this revision) into the cache."""
    return f"hf download {name}" + ("" if revision is None else f" --revision {revision}")


def _cached_revisions(name: str, cache: Path) -> list[str]:
    """The revisions of `name` in the cache, as "main (0123456789ab)"; [] when unreadable."""
    from huggingface_hub import scan_cache_dir

    try:
        repos = scan_cache_dir(cache).repos
    except Exception:  # no cache, a corrupt one: the listing is only a hint
        return []
    found = []
    for repo in repos:
        if repo.repo_id == name and repo.repo_type == "model":
            for rev in sorted(repo.revisions, key=lambda r: (sorted(r.refs), r.commit_hash)):
                refs = ", ".join(sorted(rev.refs))
                found.append(f"{refs} ({rev.commit_hash[:12]})" if refs else rev.commit_hash)
    return found


def _first_line(error: BaseException) -> str:
    return next(iter(str(error).strip().splitlines()), "")


def _hub_cache_dir() -> Path:
    """The hub cache as the environment says now (huggingface_hub reads it once at import)."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# --- reading the index ------------------------------------------------------


def read_index(source: ModelSource) -> CheckpointIndex:
    """Read every tensor's location from the weight files' headers.

    Every problem of every file (bad header entries, bytes that belong to no tensor or to
    two, the same tensor in two shards) is reported in one CorruptCheckpoint.
    """
    _check_shards_exist(source)
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for file in source.weight_files:
        if source.format == "bin":
            found = _read_bin_header(file)
        else:
            found, bad = _read_safetensors_header(file)
            problems += bad
        for key, info in found.items():
            if key in tensors:
                problems.append(
                    f"tensor {_shown(key)} is in both {tensors[key].file} and {file};"
                    " a checkpoint holds each tensor once"
                )
            else:
                tensors[key] = info
    if problems:
        raise CorruptCheckpoint(f"corrupt checkpoint:\n{_listing(problems)}\n{_REDOWNLOAD}")
    return CheckpointIndex(source=source, tensors=tensors)


def _check_shards_exist(source: ModelSource) -> None:
    missing = [f for f in source.weight_files if not f.is_file()]
    if not missing:
        return
    index = missing[0].parent / _INDEX_NAMES[source.format or "safetensors"]
    names = ", ".join(f.name for f in missing[:_LISTED])
    more = f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
    raise MissingShard(
        f"{len(missing)} shard(s) named in {index} are not on disk: {names}{more}. The download"
        " is incomplete: download the missing files again, or point at a complete copy."
    )


# --- safetensors headers ------------------------------------------------------
#
# Checked as strictly as the safetensors library checks them: an 8-byte little-endian
# length (at most 100 MB), then a JSON object in UTF-8 (no NaN, no "-0") holding one entry
# per tensor ({"dtype": known code, "shape": [counts], "data_offsets": [begin, end]}) and an
# optional "__metadata__" of strings; sorted by begin, the tensors' byte ranges tile the data
# section exactly, with no gap and no overlap, and each range holds exactly its shape's
# bytes. Stricter in one way: a key repeated in one object is an error (which copy a reader
# keeps is a guess), where the library keeps one of the tensors silently.

_U64 = 2**64  # offsets and dimensions are u64 in the format
_FIELDS = ("dtype", "shape", "data_offsets")
_NOT_SAFETENSORS = (
    "not a safetensors file: one starts with its header's length (8 bytes, little-endian,"
    " at most 100 MB) followed by that many bytes of JSON, and this file's first bytes are not"
    " such a length"
)
_LFS_POINTER = (
    "a Git LFS pointer, not the weights themselves: run `git lfs pull` in the model's"
    " repository, or download the file again"
)


def _read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """Tensors from one file's header, or (nothing and) everything that is wrong with it."""
    size = file.stat().st_size  # bytes
    parsed = _parse_header(file, size)
    if isinstance(parsed, str):
        return {}, [f"{file}: {parsed}"]
    header_len, header, problems = parsed
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(_is_text(v) for v in metadata.values())
    ):
        problems.append(f"__metadata__ must map names to strings, not {_shown(metadata)}")
    spans: dict[str, tuple[int, int]] = {}  # tensor -> [begin, end) in the data section
    for key, entry in header.items():
        if (problem := _entry_problem(entry)) is not None:
            problems.append(f"tensor {_shown(key)}: {problem}")
        if (span := _entry_span(entry)) is not None:
            spans[key] = span
    if len(spans) == len(header):  # else the layout has holes already reported as bad entries
        problems += _layout_problems(spans, size - 8 - header_len)
    if problems:
        return {}, [f"{file}: {p}" for p in problems]
    data_start = 8 + header_len  # bytes; data_offsets count from here
    return {key: _tensor_info(file, key, entry, data_start) for key, entry in header.items()}, []


def _parse_header(file: Path, size: int) -> tuple[int, dict[str, Any], list[str]] | str:
    """The header's length, its JSON object and what its objects break; or why it is none."""
    with open(file, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        if prefix == b"version ":  # "version https://git-lfs.github.com/spec/v1"
            return _LFS_POINTER
        if not 2 <= header_len <= _MAX_JSON:  # "{}" is the shortest header
            return _NOT_SAFETENSORS
        if 8 + header_len > size:
            return (
                f"the {header_len}-byte header runs past the end of the {size}-byte file: truncated"
            )
        raw = f.read(header_len)
    problems: list[str] = []  # repeated keys, keys that are not text
    try:  # UTF-8 only: json.loads(bytes) would also guess UTF-16 and UTF-32
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=lambda pairs: _json_object(pairs, problems),
            parse_constant=_no_constant,
            parse_int=_json_int,
        )
    except RecursionError:  # the C decoder refuses nesting deeper than the recursion limit
        return "the header is nested too deeply to be a safetensors header"
    except ValueError:  # also UnicodeDecodeError
        header = None
    if not isinstance(header, dict):
        return "the header is not a JSON object (not a safetensors file?)"
    return header_len, header, problems


def _json_object(pairs: list[tuple[str, Any]], problems: list[str]) -> dict[str, Any]:
    """A JSON object as a dict, noting each key it repeats (json.loads would keep the last
    silently, the library one of them) and each key that is not valid Unicode."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            problems.append(f"key {_shown(key)} appears more than once in the header")
        elif not _is_text(key):
            problems.append(f"key {_shown(key)} is not valid Unicode (a lone surrogate)")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> float:
    """NaN and Infinity are not JSON, though json.loads reads them by default."""
    raise ValueError(f"{name} is not JSON")


def _json_int(text: str) -> int | float:
    """An integer as the library's parser reads it: "-0" is a float there, never a count."""
    return -0.0 if text == "-0" else int(text)


def _is_text(value: object) -> bool:
    """A string that is valid Unicode (JSON's \\ud800 escapes can make one that is not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one tensor's header entry on its own, or None when it is well-formed."""
    if not isinstance(entry, dict):
        return f"the entry is {_json_kind(entry)}, not an object with dtype, shape and data_offsets"
    if missing := [field for field in _FIELDS if field not in entry]:
        return f"the entry has no {' and no '.join(missing)}"
    code, shape = entry["dtype"], entry["shape"]
    if not isinstance(code, str):
        return f"dtype must be a string such as 'BF16', not {_json_kind(code)}"
    if code not in _DTYPES:
        return f"dtype {_shown(code)} is not supported by this torch"
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        return f"shape must be a list of non-negative integers, not {_shown(shape)}"
    span = _entry_span(entry)
    if span is None:
        return (
            "data_offsets must be [begin, end] with integers 0 <= begin <= end, not"
            f" {_shown(entry['data_offsets'])}"
        )
    expected = _nbytes(shape, _DTYPES[code].itemsize)
    if expected is None:
        return f"shape {_shown(shape)} of {code} is larger than 2**64 bytes"
    if span[1] - span[0] != expected:
        spanned = span[1] - span[0]
        shown = f"shape {_shown(shape)} of {code}"
        return f"{shown} needs {expected} bytes but data_offsets span {spanned}"
    return None


def _entry_span(entry: object) -> tuple[int, int] | None:
    """An entry's data_offsets as (begin, end) when they are two counts in order, else None."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        return None
    begin, end = offsets
    return (begin, end) if begin <= end else None


def _is_count(value: object) -> bool:
    """A JSON integer that fits the format's u64 counts: not a bool, a float or negative."""
    return type(value) is int and 0 <= value < _U64


def _nbytes(shape: list[int], itemsize: int) -> int | None:
    """Bytes of a tensor of `shape`, or None past 2**64 (checked as it grows, like the
    library's checked multiplication: a hostile shape never makes a huge integer)."""
    nbytes = itemsize
    for dim in shape:
        nbytes *= dim
        if nbytes >= _U64:
            return None
    return nbytes


def _layout_problems(spans: dict[str, tuple[int, int]], data_size: int) -> list[str]:
    """Where the tensors' byte ranges, sorted by begin, fail to tile the data section exactly."""
    problems = []
    covered, last = 0, ""  # bytes of data accounted for so far, and the tensor ending there
    for key, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
        if begin > covered:
            problems.append(
                f"data bytes {covered}..{begin}, before tensor {_shown(key)}, belong to no tensor"
            )
        elif begin < covered:
            problems.append(
                f"tensor {_shown(key)} (data bytes {begin}..{end}) overlaps tensor"
                f" {_shown(last)} (which ends at data byte {covered})"
            )
        if end > data_size:
            problems.append(
                f"tensor {_shown(key)}: data ends {end - data_size} bytes past the end of the"
                " file: truncated"
            )
        if end >= covered:
            covered, last = end, key
    if covered < data_size:
        problems.append(f"the last {data_size - covered} bytes of the file belong to no tensor")
    return problems


def _tensor_info(file: Path, key: str, entry: dict[str, Any], data_start: int) -> TensorInfo:
    """A checked header entry as a TensorInfo."""
    dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    return TensorInfo(key, file, dtype, shape, data_start + begin, end - begin)


def _read_bin_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor metadata from a pickled PyTorch checkpoint, reading no tensor data.

    With map_location="meta", torch.load builds meta storages for every record and never reads
    the data records: only the zip directory and the small pickle are read (tests measure it).
    """
    try:
        state = torch.load(file, map_location="meta", weights_only=True)
    except Exception as e:  # zip, pickle and weights_only errors have no common base
        reason = next(iter(str(e).strip().splitlines()), "")  # its first line, clipped below
        raise CorruptCheckpoint(
            f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {_shown(reason)});"
            f" expected a zip archive written by torch.save. {_REDOWNLOAD}"
        ) from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(
            f"{file}: holds {type(state).__name__}, not a dict of tensors. {_REDOWNLOAD}"
        )
    _check_mappable(file)
    return {
        k: TensorInfo(k, file, t.dtype, tuple(t.shape), -1, t.numel() * t.element_size())
        for k, t in state.items()
        if isinstance(k, str) and isinstance(t, torch.Tensor)
    }


def _check_mappable(file: Path) -> None:
    """CorruptCheckpoint unless every record of the .bin is stored as is, as torch.save writes.

    torch.load(mmap=True) maps each record's bytes in place: a re-zipped (deflated) archive
    would give the compressed bytes as weights, and the legacy pre-1.6 format cannot be
    mapped at all.
    """
    fix = (
        "devicemap maps .bin weights in place and needs them stored uncompressed, as torch.save"
        " writes them: re-save the checkpoint, best as safetensors (safetensors.torch.save_file"
        " or save_pretrained(..., safe_serialization=True))."
    )
    if not zipfile.is_zipfile(file):
        raise CorruptCheckpoint(f"{file}: in PyTorch's legacy (pre-1.6) format, not a zip; {fix}")
    try:
        with zipfile.ZipFile(file) as archive:
            packed = [i.filename for i in archive.infolist() if _packed(i)]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{file}: a damaged zip archive ({e}). {_REDOWNLOAD}") from None
    if packed:
        raise CorruptCheckpoint(
            f"{file}: {len(packed)} record(s) are compressed or encrypted (such as"
            f" {_shown(packed[0])}); {fix}"
        )


def _packed(record: zipfile.ZipInfo) -> bool:
    """Whether a zip record's bytes on disk are not its content (compressed, or encrypted)."""
    return record.compress_type != zipfile.ZIP_STORED or bool(record.flag_bits & 0x1)


# --- zero-copy tensor access ------------------------------------------------

_lock = threading.Lock()  # the prefetch thread and the loader share the caches
_mmaps: dict[Path, mmap.mmap] = {}  # one read-only map per safetensors file
_bin_states: dict[Path, dict[str, torch.Tensor]] = {}  # torch.load(mmap=True) per .bin file


def tensor_view(info: TensorInfo, *, mapping: mmap.mmap | None = None) -> torch.Tensor:
    """The tensor as a CPU view of the file's page cache: no copy, no ordinary RAM until touched.

    By default a view of the file's one shared read-only map (PROT_READ): writing into it
    crashes the process, though torch cannot mark it read-only; devicemap only reads such
    views. The loader gives every weight it keeps as file pages (cpu and disk tiers) a
    `mapping` from `private_map` instead, copy-on-write, as safetensors gives transformers:
    a write copies that page into the process and the file never changes.
    """
    if info.offset < 0:  # pickled .bin: torch's own mmap of the zip, also zero-copy
        return _bin_state(info.file)[info.name]
    numel = math.prod(info.shape)
    if numel == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buffer = mapping if mapping is not None else _mmap_for(info.file)
    if info.offset + info.nbytes > len(buffer):
        raise CorruptCheckpoint(
            f"{info.file}: tensor {info.name!r} ends past the end of the file, which changed"
            f" after it was indexed. {_REDOWNLOAD}"
        )
    with warnings.catch_warnings():  # "buffer is not writable": known, see the docstring
        warnings.filterwarnings("ignore", message=".*not writable.*")
        flat = torch.frombuffer(buffer, dtype=info.dtype, count=numel, offset=info.offset)
    return flat.view(info.shape)


_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


def private_map(file: Path) -> mmap.mmap:
    """A new copy-on-write map of the whole file, for one load's views (never shared, so a
    write through one loaded model is never seen by another, and never reaches the file).

    Reads come from the page cache; a write copies that page into the process (RWKV
    rescales two weights per layer in place at its first forward). MAP_NORESERVE: the
    kernel reserves nothing up front for pages that may never be written, so a disk tier
    larger than RAM maps like a read-only one (under strict overcommit, mode 2, it counts).
    """
    with open(file, "rb") as f, _address_space(file):  # the map outlives the open file
        if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: copy-on-write by access mode
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flags = mmap.MAP_PRIVATE | _MAP_NORESERVE
        return mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


@contextlib.contextmanager
def _address_space(file: Path) -> Iterator[None]:
    """A map refused for want of address space (RLIMIT_AS, `ulimit -v`) -> DeviceOutOfMemory
    naming cpu, not a bare OSError."""
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOMEM:
            raise
        size = os.stat(file).st_size
        raise DeviceOutOfMemory(
            f"cpu: mapping {file} ({size} bytes) needs more address space than this process"
            " may use (ulimit -v / RLIMIT_AS, or a container's limit): raise that limit, or"
            " plan with a smaller cpu/disk budget so that fewer checkpoint files are mapped"
        ) from error


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor in ordinary, writable CPU memory (one copy from the page cache)."""
    return tensor_view(info).clone()


def close_mmaps() -> None:
    """Drop the cached file maps; each is unmapped once no view refers to it any more.

    Never mmap.close(): torch.frombuffer keeps a reference to the map but no buffer export,
    so closing would unmap memory that live views still point at (a segfault, not an error).
    """
    with _lock:
        _mmaps.clear()
        _bin_states.clear()


def _mmap_for(file: Path) -> mmap.mmap:
    with _lock:
        if file not in _mmaps:
            _mmaps[file] = _map(file, mmap.ACCESS_READ)
        return _mmaps[file]


def _map(file: Path, access: int) -> mmap.mmap:
    with open(file, "rb") as f, _address_space(file):  # the map outlives the open file
        return mmap.mmap(f.fileno(), 0, access=access)


def _bin_state(file: Path) -> dict[str, torch.Tensor]:
    with _lock:
        if file not in _bin_states:
            _bin_states[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return _bin_states[file]
