"""Reading checkpoint tensors into memory: several threads, each `pread`ing a chunk.

Used for tensors that are converted (another dtype, fused experts), go to a GPU, or stay
in RAM beside a disk tier, and to map in the pages of cpu-stored weights that stay views
of the file. Copying from the page cache into fresh memory is CPU-bound (the kernel
zeroes and maps each new page, then copies): `python bench/io.py` on 2 cores, tinyllama's
shards warm: one thread 2.1 GB/s, this pool (2 threads, 8 MiB chunks) 3.7 GB/s. Reads
of a cold file overlap in the disk's queue the same way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import torch

from ..errors import CorruptCheckpoint
from ..model.checkpoint import TensorInfo
from ..run.pages import map_in, page_ranges

CHUNK = 8 << 20  # bytes per pread: big enough for few syscalls, small enough to spread


def threads() -> int:
    """Reader threads: one per core this process may use, 2..8 (2 even on one core: the
    disk's latency overlaps with the copy)."""
    return min(8, max(2, len(os.sched_getaffinity(0))))


class ReadPool:
    """Tensors read from their files by a pool of threads, chunk by chunk.

    `start` queues a read and returns at once (the tensor fills in the background);
    `read` waits for its own chunks; `wait` for every read started. Leaving the `with`
    block cancels what has not begun and waits for the rest, so no thread writes into a
    tensor after the pool is gone.
    """

    def __init__(self, workers: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(workers or threads(), thread_name_prefix="devicemap-read")
        self._pending: list[Future[None]] = []
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> ReadPool:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def start(
        self, info: TensorInfo, out: torch.Tensor, done: Callable[[int], None] | None = None
    ) -> None:
        """Queue the reads that fill `out` with `info`'s bytes; `done(nbytes)` after each chunk."""
        self._pending += self._submit(info, out, done)

    def populate(self, view: torch.Tensor, done: Callable[[int], None] | None = None) -> None:
        """Queue mapping in the pages of `view` (a file's map), chunk by chunk: afterwards
        touching them takes no page fault, and a cold file is read in parallel."""
        raw = view.reshape(-1).view(torch.uint8)  # [nbytes]
        self._pending += [
            self._pool.submit(_populate, raw[start : start + CHUNK], done)
            for start in range(0, raw.numel(), CHUNK)
        ]

    def read(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Fill `out` now (its chunks still spread over the threads)."""
        for future in self._submit(info, out, None):
            future.result()

    def wait(self) -> None:
        """Wait for every read started; the first failure is raised."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _submit(
        self, info: TensorInfo, out: torch.Tensor, done: Callable[[int], None] | None
    ) -> list[Future[None]]:
        assert out.is_contiguous() and out.nbytes == info.nbytes, info.name
        if info.nbytes == 0:
            return []
        buffer = out.reshape(-1).view(torch.uint8).numpy().data  # [nbytes] u8, same memory
        fd = self._fd(info.file)
        return [
            self._pool.submit(_pread, fd, info, buffer[start : start + CHUNK], start, done)
            for start in range(0, info.nbytes, CHUNK)
        ]

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]


def _pread(
    fd: int,
    info: TensorInfo,
    buffer: memoryview,
    start: int,
    done: Callable[[int], None] | None,
) -> None:
    """Fill `buffer` from the tensor's bytes at `start` (relative to the tensor)."""
    got = 0
    while got < len(buffer):  # pread may return less than asked
        n = os.preadv(fd, [buffer[got:]], info.offset + start + got)
        if n <= 0:
            raise CorruptCheckpoint(
                f"{info.file}: tensor {info.name!r} ends past the end of the file, which"
                " changed after it was indexed. Re-download the checkpoint and try again."
            )
        got += n
    if done is not None:
        done(got)


def _populate(raw: torch.Tensor, done: Callable[[int], None] | None) -> None:
    map_in(page_ranges([raw]))
    if done is not None:
        done(raw.numel())
