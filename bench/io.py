"""Disk and page-cache probes behind the loader's and the page prefetcher's design.

- warm copy: the checkpoint's bytes (page cache warm) into fresh memory, by one thread
  in whole-file reads vs the loader's ReadPool (reader.py: a thread per core, 8 MiB
  chunks). Why reader.py exists.
- cold populate: madvise(MADV_POPULATE_READ) over spans of block size, page cache
  evicted: one reader in file order, two readers at once, and spans in shuffled order.
  Why the page prefetcher keeps one reader of the file (offload.py, `enter` waits).

    python bench/io.py                      # tinyllama bf16 shards, 3 rounds each
    python bench/io.py --model smollm --rounds 5
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from decode import MODELS
from devicemap.load.reader import ReadPool, threads
from devicemap.model.checkpoint import TensorInfo
from models import bench_model
from report import median, write

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_DONTNEED, MADV_POPULATE_READ = 4, 22
PAGE = mmap.PAGESIZE


def warm_copy(files: list[Path], rounds: int) -> dict[str, float]:
    """GB/s copying the files (page cache warm) into fresh tensors: one thread vs ReadPool."""
    for f in files:
        f.read_bytes()

    def one_thread() -> None:
        for f in files:
            out = torch.empty(f.stat().st_size, dtype=torch.uint8)
            view = out.numpy().data
            with open(f, "rb", buffering=0) as fh:
                done = 0
                while done < len(view):
                    done += os.preadv(fh.fileno(), [view[done:]], done)

    def pool() -> None:
        with ReadPool() as reads:
            for f in files:
                size = f.stat().st_size
                info = TensorInfo(f.name, f, torch.uint8, (size,), 0, size)
                reads.start(info, torch.empty(size, dtype=torch.uint8))
            reads.wait()

    total = sum(f.stat().st_size for f in files)
    return {
        "one thread GB/s": total / _timed(one_thread, rounds, lambda: None) / 1e9,
        f"ReadPool ({threads()} threads) GB/s": total / _timed(pool, rounds, lambda: None) / 1e9,
    }


def cold_populate(file: Path, span: int, rounds: int) -> dict[str, float]:
    """GB/s mapping block-sized spans of `file` in from a cold page cache, three ways."""
    size = file.stat().st_size
    count = max(2, min(32, size // span))
    fd = os.open(file, os.O_RDONLY)
    mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    base = _address(mapping)
    spans = [(base + i * span, span) for i in range(count)]
    shuffled = random.Random(0).sample(spans, len(spans))

    def evict() -> None:
        _libc.madvise(base, size, MADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def populate(start: int, length: int) -> None:
        if _libc.madvise(start, length, MADV_POPULATE_READ) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_READ) failed")

    def in_order() -> None:
        for s in spans:
            populate(*s)

    def two_readers() -> None:
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda s: populate(*s), spans))

    def out_of_order() -> None:
        for s in shuffled:
            populate(*s)

    total = count * span
    try:
        ways = {"one reader, file order": in_order, "two readers": two_readers,
                "one reader, shuffled": out_of_order}  # fmt: skip
        return {
            f"populate {k} GB/s": total / _timed(f, rounds, evict) / 1e9 for k, f in ways.items()
        }
    finally:
        del mapping
        os.close(fd)


def _address(mapping: mmap.mmap) -> int:
    view = torch.frombuffer(mapping, dtype=torch.uint8, count=1)  # read-only: never written
    return int(view.data_ptr())


def _timed(fn: Callable[[], None], rounds: int, before: Callable[[], None]) -> float:
    """Median seconds of `fn` over `rounds`, `before` run untimed ahead of each."""
    times = []
    for _ in range(rounds):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyllama", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--span-mib", type=int, default=14, help="block size for populate")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("bench/io.py needs Linux (madvise, posix_fadvise)")
    path = bench_model(args.model, MODELS[args.model])
    files = sorted(path.glob("*.safetensors"))
    largest = max(files, key=lambda f: f.stat().st_size)
    row: dict[str, object] = {"model": args.model}
    row.update(warm_copy(files, args.rounds))
    row.update(cold_populate(largest, args.span_mib << 20, args.rounds))
    command = "python bench/io.py " + " ".join(sys.argv[1:])
    write("io", [row], notes={"command": command.strip()})


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*not writable.*")
    main()
