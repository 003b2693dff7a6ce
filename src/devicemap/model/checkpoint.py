"""Checkpoint index: tensor name -> (file, dtype, shape, offset), from file headers only.

Opens a model directory, a single weights file, a bare config.json, or a hub id
already in the local Hugging Face cache (offline). No tensor data is read here.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import CorruptCheckpoint, MissingShard, ModelNotFound

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


# --- resolving a model argument ---------------------------------------------


def resolve_model(model: str | os.PathLike[str]) -> ModelSource:
    """Find config and weights for a directory, weights file, config.json or cached hub id."""
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_path(name, path)
    if _HUB_ID.match(name) and not name.endswith((".json", ".safetensors", ".bin")):
        return _resolve_hub(name)
    raise ModelNotFound(
        f"{name}: no such file or directory. Give a model directory, a weights file"
        " or a config.json."
    )


def _resolve_path(name: str, path: Path) -> ModelSource:
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
    """Every shard the index's weight_map names, in sorted order (some may be missing)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(
            f"{index}: not a valid checkpoint index ({e}). {_REDOWNLOAD}"
        ) from e
    return tuple(index.parent / n for n in names)


def _resolve_hub(name: str) -> ModelSource:
    """A hub id already in the local Hugging Face cache; never touches the network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    cache = _hub_cache_dir()
    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=cache)
    except HFValidationError:
        found = None
    if not isinstance(found, str):
        raise ModelNotFound(
            f"{name!r} is not a local path, and hub model {name!r} is not in the Hugging Face cache"
            f" ({cache}). There is no network here, so nothing can be downloaded. Point devicemap"
            " at a local copy instead: a model directory path, or run"
            f" `huggingface-cli download {name}` on a connected machine and copy the folder here."
        )
    return _resolve_path(name, Path(found).parent)


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
    """Read every tensor's location from the weight files' headers."""
    _check_shards_exist(source)
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for file in source.weight_files:
        if source.format == "bin":
            tensors.update(_read_bin_header(file))
        else:
            found, bad = _read_safetensors_header(file)
            tensors.update(found)
            problems += bad
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise CorruptCheckpoint(f"corrupt safetensors checkpoint:\n{listing}\n{_REDOWNLOAD}")
    return CheckpointIndex(source=source, tensors=tensors)


def _check_shards_exist(source: ModelSource) -> None:
    missing = [f for f in source.weight_files if not f.is_file()]
    if not missing:
        return
    index = missing[0].parent / _INDEX_NAMES[source.format or "safetensors"]
    names = ", ".join(f.name for f in missing)
    raise MissingShard(
        f"{len(missing)} shard(s) named in {index} are not on disk: {names}. The download is"
        " incomplete: download the missing files again, or point at a complete copy."
    )


def _read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """Tensors from one file's header (8-byte little-endian length + JSON), and what is wrong."""
    size = file.stat().st_size  # bytes
    with open(file, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            return {}, [f"{file}: header length {header_len} bytes does not fit a {size}-byte file"]
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        header = None
    if not isinstance(header, dict):
        return {}, [f"{file}: the header is not a JSON object (not a safetensors file?)"]
    data_start = 8 + header_len  # bytes; data_offsets count from here
    tensors, problems = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        info = _tensor_info(file, key, entry, data_start, size)
        if isinstance(info, str):
            problems.append(f"{file}: tensor {key!r}: {info}")
        else:
            tensors[key] = info
    return tensors, problems


def _tensor_info(file: Path, key: str, entry: Any, data_start: int, size: int) -> TensorInfo | str:
    """One header entry as a TensorInfo, or a sentence saying what is wrong with it."""
    try:
        code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        numbers = (*shape, begin, end)
    except (KeyError, TypeError, ValueError):
        numbers = (-1,)
    if not all(isinstance(n, int) and n >= 0 for n in numbers):
        return f"malformed header entry {entry!r}"
    if code not in _DTYPES:
        return f"dtype {code!r} is not supported by this torch"
    dtype = _DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # bytes
    if end - begin != expected:
        return f"shape {shape} of {code} needs {expected} bytes but data_offsets span {end - begin}"
    if data_start + end > size:
        end_byte = data_start + end
        return f"data ends at byte {end_byte}, past the end of the {size}-byte file: truncated"
    offset = data_start + begin
    return TensorInfo(key, file, dtype, tuple(shape), offset, expected)


def _read_bin_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor metadata from a pickled PyTorch checkpoint, reading no tensor data.

    With map_location="meta", torch.load builds meta storages for every record and never reads
    the data records: only the zip directory and the small pickle are read (tests measure it).
    """
    try:
        state = torch.load(file, map_location="meta", weights_only=True)
    except Exception as e:  # zip, pickle and weights_only errors have no common base
        state = e
    if not isinstance(state, dict):
        raise CorruptCheckpoint(
            f"{file}: not a readable PyTorch checkpoint ({state!r}). {_REDOWNLOAD}"
        )
    return {
        k: TensorInfo(k, file, t.dtype, tuple(t.shape), -1, t.numel() * t.element_size())
        for k, t in state.items()
        if isinstance(t, torch.Tensor)
    }


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
    with open(file, "rb") as f:  # the map stays valid after the file is closed
        if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: copy-on-write by access mode
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flags = mmap.MAP_PRIVATE | _MAP_NORESERVE
        return mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


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
    with open(file, "rb") as f:  # the map stays valid after the file is closed
        return mmap.mmap(f.fileno(), 0, access=access)


def _bin_state(file: Path) -> dict[str, torch.Tensor]:
    with _lock:
        if file not in _bin_states:
            _bin_states[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return _bin_states[file]
