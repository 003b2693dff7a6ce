"""Page residency of memory-mapped weights: which pages are in memory, and mapping them in.

The checkpoint's pages are the disk tier (and, in the checkpoint's dtype, the cpu tier):
the page prefetcher (offload.py), the loader's read threads (reader.py) and `devicemap
bench` (measure.py) ask the kernel about them with mincore and madvise.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PAGE = mmap.PAGESIZE  # bytes
MADV_WILLNEED = 3
MADV_PAGEOUT = 21  # Linux 5.4+
MADV_POPULATE_READ = 22  # Linux 5.14+


@dataclass(frozen=True)
class Pages:
    """Where a block's weights lie in memory, for faulting them in."""

    spans: tuple[tuple[int, int], ...]  # page-aligned (address, bytes), adjacent ones merged
    raws: tuple[torch.Tensor, ...]  # each tensor's bytes as uint8, for the touch fallback


def page_ranges(tensors: Iterable[torch.Tensor]) -> Pages:
    """The page-aligned address spans of `tensors` (merged) and their bytes as uint8 views."""
    spans: list[tuple[int, int]] = []
    raws = []
    for tensor in sorted(tensors, key=lambda t: t.data_ptr()):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            continue
        start = tensor.data_ptr() // PAGE * PAGE
        end = tensor.data_ptr() + nbytes
        if spans and start <= spans[-1][0] + spans[-1][1]:  # touches the previous span
            prev = spans[-1][0]
            spans[-1] = (prev, max(spans[-1][1], end - prev))
        else:
            spans.append((start, end - start))
        flat = torch.as_strided(tensor.detach(), (tensor.numel(),), (1,))
        raws.append(flat.view(torch.uint8))  # [nbytes]
    return Pages(tuple(spans), tuple(raws))


def merged(pages: Iterable[Pages]) -> Pages:
    """Several `Pages` as one (spans side by side, not re-merged)."""
    listed = list(pages)
    return Pages(
        tuple(span for p in listed for span in p.spans), tuple(r for p in listed for r in p.raws)
    )


def _libc() -> Any:
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.madvise.restype = libc.mincore.restype = ctypes.c_int
    return libc


_LIBC = _libc()
_POPULATE = _LIBC is not None and sys.platform.startswith("linux")


_WHOLE_PAGES = 2048  # spans up to 8 MiB are checked page by page in one mincore call
_RESIDENT = bytes(b & 1 for b in range(256))  # mincore's byte -> its residency bit


def any_missing(start: int, length: int, *, samples: int = 32) -> bool:
    """Whether some of `samples` pages spread over the span is not in memory (mincore);
    every page of a span of at most _WHOLE_PAGES (an expert's tensors).

    A full check costs ~70 ns per page (8 ms per 441 MiB, measured), too much to pay on
    every warm pass; a page the sample misses is faulted in by the compute itself.
    True when residency cannot be asked.
    """
    if _LIBC is None:
        return True
    npages = (length + PAGE - 1) // PAGE
    if npages <= _WHOLE_PAGES:  # one call over every page costs less than the samples
        vec = ctypes.create_string_buffer(npages)
        if _LIBC.mincore(start, length, vec) != 0:
            return True
        return b"\x00" in vec.raw.translate(_RESIDENT)
    vec = ctypes.create_string_buffer(1)
    for i in range(min(samples, npages)):
        page = start + (i * (npages - 1) // max(min(samples, npages) - 1, 1)) * PAGE
        if _LIBC.mincore(page, PAGE, vec) != 0 or not vec.raw[0] & 1:
            return True
    return False


def resident_bytes(pages: Pages) -> int | None:
    """Bytes of `pages` in memory now (mincore, every page); None when it cannot be asked."""
    if _LIBC is None:
        return None
    total = 0
    for start, length in pages.spans:
        npages = (length + PAGE - 1) // PAGE
        vec = ctypes.create_string_buffer(npages)
        if _LIBC.mincore(start, length, vec) != 0:
            return None
        total += sum(b & 1 for b in vec.raw) * PAGE
    return total


def fault_in(pages: Pages, *, exact: bool = False) -> bool:
    """Read in and map the pages not yet in memory; a resident span costs one mincore.

    MADV_POPULATE_READ (Linux 5.14+) reads a whole span and fills the page tables in one
    call, so the compute later takes no fault at all; measured on 441 MiB cold: 157 ms,
    vs 190 ms touching one byte per page and 270 ms with MADV_WILLNEED first (it hurt).
    Elsewhere one byte per page is read by torch (C loops). Both release the GIL.

    `exact`: read only these bytes. A fault in a file mapping reads the kernel's read-around
    window (read_ahead_kb, 8 MiB on this machine's disk) centred on it, right for a block read
    in file order but up to 3x the bytes of a 3 MB expert among unselected neighbours; with
    `exact` the spans are first asked for with MADV_WILLNEED, which reads exactly them (all
    at once, queued together), so the faults that follow find every page cached.
    Returns whether anything was missing.
    """
    missing = [(start, length) for start, length in pages.spans if any_missing(start, length)]
    if not missing:
        return False
    if exact and _LIBC is not None:
        for start, length in missing:
            _LIBC.madvise(start, length, MADV_WILLNEED)
    map_in(Pages(tuple(missing), pages.raws))
    return True


def map_in(pages: Pages) -> None:
    """Map every page of `pages` into this process now, reading it if the page cache lacks
    it (mincore calls a page that is cached but unmapped resident: this maps it anyway)."""
    if _POPULATE and all(_LIBC.madvise(s, n, MADV_POPULATE_READ) == 0 for s, n in pages.spans):
        return
    for raw in pages.raws:
        raw[::PAGE].sum()  # one byte per page
        raw[-1:].sum()  # the tail page, which the stride can skip


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int, int, int]:
    """(size, mtime, inode, ctime) in ns: a file rewritten in place keeps its inode and can
    keep size and mtime (`cp -p`, `rsync -a`), never its ctime; a replaced one changes inode."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@dataclass(frozen=True)
class FileRanges:
    """Where a block's pages come from: (path, offset, bytes) of each file-backed span."""

    ranges: tuple[tuple[str, int, int], ...]


def file_ranges(pages: Pages, mappings: Sequence[FileMapping] | None = None) -> FileRanges:
    """The file byte ranges behind `pages` (spans not backed by a file are left out)."""
    found = []
    for mapping in mappings if mappings is not None else (file_mappings() or []):
        for start, length in pages.spans:
            lo, hi = max(start, mapping.start), min(start + length, mapping.end)
            if lo < hi:
                found.append((mapping.path, lo - mapping.start + mapping.offset, hi - lo))
    return FileRanges(tuple(found))


def drop(pages: Pages, files: FileRanges) -> None:
    """Let the page cache forget a block that has run: MADV_PAGEOUT reclaims its pages from
    this process's maps (a page the model wrote, copied privately, is swapped out or kept,
    never discarded), then POSIX_FADV_DONTNEED drops the now unmapped clean pages of its
    files. So a block streamed through once per token never pushes out the resident ones,
    which an LRU page cache would evict first under cyclic access."""
    if _POPULATE:  # Linux
        for start, length in pages.spans:
            _LIBC.madvise(start, length, MADV_PAGEOUT)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for path, offset, length in files.ranges:
        by_file.setdefault(path, []).append((offset, length))
    for path, spans in by_file.items():  # a block's tensors lie in one file or two
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                for offset, length in spans:
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@dataclass(frozen=True)
class FileMapping:
    """One file-backed mapping of this process, from /proc/self/maps."""

    start: int  # address
    end: int  # address, exclusive
    offset: int  # bytes into the file mapped at `start`
    path: str


def file_mappings() -> list[FileMapping] | None:
    """This process's file-backed mappings; None where /proc/self/maps does not exist."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return None
    found = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)  # range, perms, offset, dev, inode, path
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append(FileMapping(start, end, int(fields[2], 16), fields[5].strip()))
    return found
