"""The offload cache: converted tensors of a disk tier, in one safetensors file per load.

A disk-stored tensor that the checkpoint does not hold as-is (another dtype, a fused MoE
parameter) is converted once into `<offload dir>/<fingerprint>.safetensors` and read from
there afterwards. Nothing in it is trusted on its name, size or header alone:

- **written safely**: to a temp file `<name>.tmp-<pid>-<random>` created exclusively
  without following links (`O_CREAT | O_EXCL | O_NOFOLLOW`), mode 0600, in a 0700
  directory; fsynced, then renamed over the final name (the rename replaces whatever is
  there, a planted symlink included, and never follows it). A killed writer leaves only
  its temp file, which the next load (or `devicemap cache prune`) removes once that pid
  is gone.
- **named by its sources**: the fingerprint covers the model, dtype, the converted tensors
  and each source file's size, mtime, inode and ctime, so a checkpoint rewritten in place
  with the same size and mtime (`cp -p`, `rsync -a`, `tar x`) still changes the ctime and
  gets a new cache; older caches whose sources changed are deleted when a new one is
  written.
- **checked by content**: the header records an xxh3-128 digest of every tensor, computed
  while writing; the first use of a cache file in a process reads it whole and compares
  (about 4 GB/s of hashing, plus the read); a mismatch (flipped bytes) deletes the file and
  converts again.

`entries(directory)` lists what is cached (for `devicemap cache ls|rm|prune`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import re
import secrets
import shutil
import stat
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash

from ..devices import format_size
from ..errors import OffloadError
from ..model import checkpoint
from ..model.checkpoint import TensorInfo
from ..model.gguf import cache_root
from ..run.pages import file_identity

Shape = tuple[int, ...]
ALIGN = 64  # bytes: every cached tensor starts here (CPU kernels round differently unaligned)
_CODES = {dtype: code for code, dtype in checkpoint._DTYPES.items()}  # torch dtype -> "BF16"
_DIGEST = 32  # hex characters of one xxh3-128 digest
_TEMP = re.compile(r"^(?P<final>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")  # a writer's temp file
_verified: set[tuple[str, int, int, int]] = set()  # (path, dev, inode, size) checked this process

# one source file as the fingerprint sees it: path, size, mtime, inode, ctime (ns)
Source = tuple[str, int, int, int, int]


def default_dir() -> Path:
    """`$DEVICEMAP_CACHE/offload`, else `~/.cache/devicemap/offload`."""
    return cache_root() / "offload"


def source_identity(path: str | os.PathLike[str]) -> Source:
    return (str(path), *file_identity(path))


@dataclass(frozen=True)
class CacheFile:
    """One safetensors file of converted tensors: its header, and where each tensor lies."""

    path: Path
    header: bytes  # the JSON header (digests zeroed), padded so the data starts aligned
    tensors: Mapping[str, TensorInfo]

    @property
    def size(self) -> int:
        return max(i.offset + i.nbytes for i in self.tensors.values())  # bytes

    def usable(self) -> bool:
        """Written in full for exactly these tensors, and (once per process) its bytes match
        the digests written with them. A damaged file is deleted (it is only derived data)."""
        found = _header(self.path)
        if found is None or not isinstance(found[1].get("digests"), str):
            return False
        header, meta, st = found
        digests = meta["digests"]
        if _without_digests(header) != _without_digests(self.header) or st.st_size != self.size:
            return False
        key = (str(self.path), st.st_dev, st.st_ino, st.st_size)
        if key not in _verified:
            if _digests(self.path, self.tensors) != digests:
                with contextlib.suppress(OSError):
                    self.path.unlink()
                return False
            _verified.add(key)
        with contextlib.suppress(OSError):  # its last use, for `devicemap cache ls`
            os.utime(self.path, ns=(time.time_ns(), st.st_mtime_ns))  # the atime only
        return True

    def write(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Stream `tensors` (in layout order) to a new temp file, digests into the header,
        fsync, rename; OffloadError if not (nothing half-written is kept)."""
        directory, free = self.path.parent, None
        tmp = directory / f"{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}"
        fd = -1
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            free = shutil.disk_usage(directory).free
            if free < self.size:  # before writing a byte
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
            with os.fdopen(fd, "wb") as f:
                fd = -1  # the file object owns it now
                f.write(struct.pack("<Q", len(self.header)) + self.header)
                digests = {}
                for name, tensor in tensors:
                    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data
                    f.seek(self.tensors[name].offset)  # past a pad: the gap reads as zeros
                    _write_bytes(f, data)
                    digests[name] = xxhash.xxh3_128(data).hexdigest()
                f.seek(8)
                f.write(_with_digests(self.header, [digests[n] for n in self.tensors]))
                f.flush()
                os.fsync(f.fileno())
            st = os.stat(tmp)
            os.replace(tmp, self.path)
            _fsync_dir(directory)
            _verified.add((str(self.path), st.st_dev, st.st_ino, st.st_size))
        except OSError as error:
            _discard(fd, tmp)
            raise OffloadError(
                f"cannot write the offload cache in {directory}: {error.strerror or error}."
                f" It needs {format_size(self.size)}"
                + (f" and {format_size(free)} is free" if free is not None else "")
                + ". Free space there, or give load(..., offload_dir=...) a writable directory"
                f" with at least {format_size(self.size)} free; nothing half-written was kept."
            ) from error
        except BaseException:
            _discard(fd, tmp)
            raise


def _discard(fd: int, tmp: Path) -> None:
    if fd >= 0:
        os.close(fd)
    with contextlib.suppress(OSError):
        tmp.unlink()


def cache_layout(
    directory: Path,
    fingerprint: str,
    specs: list[tuple[str, torch.dtype, Shape]],
    *,
    model: str = "",
    sources: Sequence[Source] = (),
) -> CacheFile:
    """Where each (name, dtype, shape) goes in `<directory>/<fingerprint>.safetensors`.

    Every tensor starts on a 64-byte boundary; the gaps are explicit u8 pad tensors, as
    safetensors allows no holes. The metadata names the model and the sources (for
    `devicemap cache ls` and pruning) and holds room for one digest per tensor.
    """
    path = directory / f"{fingerprint[:32]}.safetensors"
    meta = {
        "format": "pt",
        "devicemap": fingerprint,
        "model": model,
        "sources": json.dumps([list(s) for s in sources]),
        "digests": "0" * (_DIGEST * len(specs)),
    }
    entries: dict[str, Any] = {"__metadata__": meta}
    spans, begin = {}, 0
    for name, dtype, shape in specs:
        if pad := -begin % ALIGN:
            span = [begin, begin + pad]
            entries[f"__pad{len(entries)}__"] = {
                "dtype": "U8",
                "shape": [pad],
                "data_offsets": span,
            }
            begin += pad
        nbytes = math.prod(shape) * dtype.itemsize
        span = [begin, begin + nbytes]
        entries[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": span}
        spans[name] = (dtype, shape, begin, nbytes)
        begin += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)  # the data starts 64-byte aligned too
    start = 8 + len(header)
    tensors = {
        name: TensorInfo(name, path, dtype, shape, start + begin, nbytes)
        for name, (dtype, shape, begin, nbytes) in spans.items()
    }
    return CacheFile(path, header, tensors)


def _with_digests(header: bytes, digests: list[str]) -> bytes:
    """`header` with its zeroed digests replaced (same length: the data does not move)."""
    zeros = b'"digests":"' + b"0" * (_DIGEST * len(digests)) + b'"'
    filled = b'"digests":"' + "".join(digests).encode() + b'"'
    assert header.count(zeros) == 1 and len(zeros) == len(filled)
    return header.replace(zeros, filled)


def _without_digests(header: bytes) -> bytes:
    return re.sub(rb'"digests":"[0-9a-f]*"', lambda m: re.sub(rb"[0-9a-f]", b"0", m[0]), header)


def _header(path: Path) -> tuple[bytes, dict[str, Any], os.stat_result] | None:
    """(the JSON header, its __metadata__, stat) of a devicemap cache: a regular file of this
    user's, not reached through a symlink; None for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            return None
        head = f.read(8)
        if len(head) < 8:
            return None
        (length,) = struct.unpack("<Q", head)
        if length > 100 << 20 or length > st.st_size:
            return None
        header = f.read(length)
    try:
        meta = json.loads(header).get("__metadata__")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(meta, dict) or "devicemap" not in meta:
        return None
    return header, meta, st


def _digests(path: Path, tensors: Mapping[str, TensorInfo]) -> str:
    """The digests of the tensors' bytes as they are in the file now, in layout order
    (hashed straight from a read-only map of it: no copy)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if any(i.offset + i.nbytes > size for i in tensors.values()):
            return ""  # cut short
        if size == 0:
            return ""
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            view = memoryview(data)
            try:
                return "".join(
                    xxhash.xxh3_128(view[i.offset : i.offset + i.nbytes]).hexdigest()
                    for i in tensors.values()
                )
            finally:
                view.release()


def _write_bytes(f: Any, data: memoryview) -> None:
    f.write(data)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable, where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- what is cached: listing, pruning ---------------------------------------------------

Status = Literal["ok", "stale", "partial", "writing", "other"]


@dataclass(frozen=True)
class Entry:
    """One file in an offload directory, as `devicemap cache ls` shows it."""

    path: Path
    status: Status  # ok; stale (a source changed or is gone); partial (a dead writer's temp
    # file); writing (a live writer's); other (not a devicemap cache)
    model: str
    size: int  # bytes
    last_used: float  # seconds since the epoch (its atime, set at each use)


def entries(directory: Path) -> list[Entry]:
    """Every file of `directory` (not recursing), classified; [] if it does not exist."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        path = directory / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        found.append(_entry(path, st))
    return found


def _entry(path: Path, st: os.stat_result) -> Entry:
    temp = _TEMP.match(path.name)
    if temp is not None and stat.S_ISREG(st.st_mode):
        status: Status = "writing" if _alive(int(temp["pid"])) else "partial"
        return Entry(path, status, "", st.st_size, st.st_atime)
    if not stat.S_ISREG(st.st_mode) or path.suffix != ".safetensors":
        return Entry(path, "other", "", st.st_size, st.st_atime)
    found = _header(path)
    if found is None:
        return Entry(path, "other", "", st.st_size, st.st_atime)
    meta = found[1]
    # no sources recorded: written by an older devicemap, whose names no load makes now
    fresh = "sources" in meta and all(_unchanged(s) for s in _sources(meta))
    return Entry(
        path, "ok" if fresh else "stale", str(meta.get("model", "")), st.st_size, st.st_atime
    )


def _sources(meta: Mapping[str, str]) -> list[Source]:
    try:
        return [tuple(s) for s in json.loads(meta.get("sources", "[]"))]  # type: ignore[misc]
    except (ValueError, TypeError):
        return []


def _unchanged(source: Source) -> bool:
    try:
        return source_identity(source[0]) == tuple(source)
    except (OSError, IndexError, TypeError):
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return False
    return True


def sweep(directory: Path, *, keep: Path | None = None) -> list[Path]:
    """Delete dead writers' temp files and caches whose sources changed (`keep` aside);
    return what was deleted. Called by every load that uses the cache."""
    gone = []
    for entry in entries(directory):
        if entry.status in ("partial", "stale") and entry.path != keep:
            with contextlib.suppress(OSError):
                entry.path.unlink()
                gone.append(entry.path)
    return gone


def age(seconds: float) -> str:
    """'3 min ago' for `devicemap cache ls`."""
    ago = max(0.0, time.time() - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if ago >= size:
            return f"{int(ago // size)} {unit} ago"
    return "just now"
