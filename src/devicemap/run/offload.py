"""Offloaded blocks: weights stored on cpu or disk, used where the block executes.

A block's storage (`cuda:N`, `cpu`, `disk`) and its execution device are separate
(DESIGN.md). Two ways to run a block stored off its execution device, one class each:

- `PagePrefetcher`: disk-stored blocks executing on the CPU compute straight from the
  memory-mapped checkpoint; while block k runs, a background thread faults in block
  k+1's pages (madvise(MADV_POPULATE_READ): read and map in one call).
- `GpuStreamer`: cpu/disk-stored blocks executing on a GPU are copied in whole into
  one of two preallocated device buffers, on a side CUDA stream ordered by events: a
  cpu-tier block in one copy from its own page-locked buffer, a disk block through one
  pinned staging ring (allocated once, a few chunks). While block k runs from one
  buffer, block k+1 is copied into the other. The block's parameters point at views of
  its buffer only while it runs.

Both share the hook protocol `begin()` (a forward starts), `enter(name)` (block
pre-hook), `exit(name)` (block forward hook) and `close()`. Nothing on the hot path
synchronises the device or empties the allocator cache. Inference only: re-pointing
`param.data` under a graph that autograd will differentiate is not supported.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import weakref
from collections import deque
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import OffloadError
from .pages import FileRanges, Pages, drop, fault_in, file_mappings, file_ranges, page_ranges

ALIGN = 256  # bytes: each tensor's offset inside a staging buffer (CUDA's allocation alignment)


class Offload(Protocol):
    """What dispatch calls from its hooks."""

    def begin(self) -> None: ...  # the outermost forward starts
    def enter(self, name: str) -> None: ...  # block `name` is about to run
    def exit(self, name: str) -> None: ...  # block `name` finished (also on error)
    def close(self) -> None: ...  # stop threads, drop buffers, point weights back at storage


@dataclass(frozen=True)
class BlockWeights:
    """The tensors one block holds on the host, and where each goes in a staging buffer."""

    name: str
    tensors: tuple[torch.Tensor, ...]  # the Parameter/buffer objects the modules hold
    host: tuple[torch.Tensor, ...]  # their storage data (cpu memory or a read-only mmap)
    offsets: tuple[int, ...]  # bytes into a staging buffer, ALIGN-aligned
    nbytes: int  # staging bytes for the whole block
    in_ram: bool = False  # stored on the cpu tier (not disk): a GPU streamer pins it in place


def block_weights(name: str, module: torch.nn.Module) -> BlockWeights:
    """Collect the host (cpu/mmap) parameters and buffers of `module`, tied ones once."""
    seen: set[int] = set()
    tensors: list[torch.Tensor] = []
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in seen or tensor.device.type != "cpu":
            continue  # non-persistent buffers already sit on the execution device
        seen.add(id(tensor))
        tensors.append(tensor)
    offsets, end = [], 0
    for tensor in tensors:
        offsets.append(end)
        end += _aligned(tensor.numel() * tensor.element_size())
    host = tuple(t.data for t in tensors)  # aliases of the storage, kept to point back at
    return BlockWeights(name, tuple(tensors), host, tuple(offsets), end)


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class Successors:
    """Which block runs after which: plan order at first, then what was last seen to run.

    Learning handles forwards that skip blocks (the encoder of an encoder-decoder runs
    once per generate; a vision tower only at prefill) and wraps from the last block of
    one forward to the first of the next.
    """

    def __init__(self, order: Sequence[str]):
        assert order, "Successors needs at least one block"
        self._next = dict(zip(order, [*order[1:], order[0]], strict=True))
        self._last: str | None = None
        self._first = order[0]

    def observe(self, name: str) -> str:
        """Record that `name` runs now; return the block expected next."""
        if self._last is not None and self._last != name:
            self._next[self._last] = name
        self._last = name
        return self._next[name]

    def after(self, name: str) -> str:
        """The block expected after `name`."""
        return self._next[name]

    def peek(self) -> str:
        """The block expected to run next."""
        return self._first if self._last is None else self._next[self._last]


# --- CPU execution of disk-stored blocks ------------------------------------------


QUIET_MAX = 64  # passes a block found resident goes unchecked, at most


LOOKAHEAD = 64 << 20  # bytes of disk blocks a page prefetcher keeps on their way


def lookahead(blocks: Sequence[BlockWeights]) -> int:
    """Blocks to fault in ahead: LOOKAHEAD bytes' worth of the typical block, 2 to 8.

    Measured (`python bench/decode.py --models smollm --fractions 0.75 --runs 1
    --lookahead-mib N`: 14 MB blocks, evicted before every step, 9 rounds): 0.93x the disk
    bound with 2 blocks ahead (N=1), 0.95x with 5 (N=64); tinyllama's 88 MB blocks get 2."""
    sizes = sorted(b.nbytes for b in blocks)
    typical = max(sizes[len(sizes) // 2], 1)  # bytes, the median block
    return min(8, max(2, -(-LOOKAHEAD // typical)))


class PagePrefetcher:
    """Disk-stored blocks executing on the CPU: while block k runs, fault in k+1 .. k+depth.

    `depth` defaults to `lookahead(blocks)`: enough blocks to keep LOOKAHEAD bytes on
    their way (2 to 8 blocks), so the reader does not idle while the CPU computes the
    blocks that are not on disk, without reading gigabytes ahead for large blocks.
    Each block is asked for once per pass. Measured (2 cores, llama hidden 1024, 9 of 12
    layers on disk = 441 MiB, page cache evicted before every decode step): 224 ms per
    step with prefetch = 1.00x the time to read those files cold, 241-264 ms without.

    A block the worker finds fully resident is not handed to it again for 1, 2, 4 ...
    QUIET_MAX passes; once a block is found with missing pages, every block is checked on
    every pass again (each forward's first blocks are always checked, so an eviction is
    seen at the next forward's start). Warm,
    a check per block per token cost 7% of decode speed on 2 cores (bench/decode.py,
    smollm 75% on disk: 0.93x vs 1.01x RAM without prefetch): the worker's wake-ups
    contend for the GIL and the cores. The price: pages of a quiet block evicted while
    the first blocks stay resident are faulted in by the compute itself until its check.
    """

    def __init__(
        self,
        blocks: Sequence[BlockWeights],
        *,
        depth: int | None = None,
        log: int = 4096,
        streamed: Collection[str] = (),
    ):
        depth = depth or lookahead(blocks)
        self._pages = {b.name: page_ranges(b.host) for b in blocks}
        # the disk tier's cache policy: blocks streamed through, their pages dropped once
        # they have run, so the others stay resident (the plan chose which: Plan.streamed)
        mappings = (file_mappings() or []) if streamed else []
        self._files = {
            name: file_ranges(self._pages[name], mappings)
            for name in streamed
            if name in self._pages
        }
        self.dropped: deque[str] = deque(maxlen=log)  # streamed blocks let go, oldest first
        self._predict = Successors([b.name for b in blocks])
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._depth = depth
        # asked for and not yet run past (with streamed blocks, up to every block)
        self._recent: deque[str] = deque(maxlen=len(blocks) if streamed else depth)
        self.requests: deque[str] = deque(maxlen=log)  # blocks asked for, oldest first
        self.checks: deque[str] = deque(maxlen=log)  # of those, the ones handed to the worker
        self._quiet: dict[str, int] = {}  # passes left before a resident block is checked
        self._span: dict[str, int] = {}  # the quiet period it got last (worker-written)
        self._inflight: dict[str, threading.Event] = {}  # handed to the worker: set when done
        self._failed: list[BaseException] = []  # what stopped the worker reading, if anything
        self._thread = threading.Thread(
            target=_fault_in_forever,
            args=(self._jobs, self._quiet, self._span, frozenset(self._files), self._failed),
            name="devicemap-pages",
            daemon=True,
        )
        self._thread.start()
        # close(), dropping the prefetcher, or interpreter exit (finalize runs atexit) stop
        # and join the worker while the interpreter is whole: a thread still running torch
        # code during finalization is killed by pthread_exit, which aborts the process
        self._stop = weakref.finalize(self, _stop_worker, self._jobs, self._thread)

    def begin(self) -> None:
        """A forward starts: check its first blocks now, even if quiet or asked for already.

        The last forward's wrap-around asked for them while their pages were still in
        memory; they may have gone since (a cold cache, or a model larger than the page
        cache, whose LRU drops exactly the blocks used longest ago).
        """
        self._recent.clear()
        self._request_from(self._predict.peek(), running=None, force=True)

    def enter(self, name: str) -> None:
        """Wait until `name` is faulted in if the worker has it in hand, then ask for the
        blocks after it.

        Waiting, not faulting its pages here too: two readers of the file interleave and
        defeat the kernel's read-ahead (`python bench/io.py`: 14 MiB spans populated cold,
        one reader in file order 3.4 GB/s, two readers 2.0 GB/s). Asking afterwards: if the
        worker found `name`'s pages missing, the blocks asked for now are checked even if
        they were quiet. The blocks already asked for keep the worker busy meanwhile."""
        pending = self._inflight.pop(name, None)
        if pending is not None:
            pending.wait()
        if self._failed:  # the worker cannot read: say why here, never wait on it forever
            error = self._failed[0]
            raise OffloadError(
                f"reading the disk-stored weights of {name} ahead of need failed: "
                f"{type(error).__name__}: {error}"
            ) from error
        if name in self._recent:  # run now: asked for again when it is next ahead
            self._recent.remove(name)
        self._request_from(self._predict.observe(name), running=name)

    def streams(self, name: str) -> bool:
        """Whether `name` is streamed (its pages dropped once it has run)."""
        return name in self._files

    def exit(self, name: str) -> None:
        """A streamed block has run: the worker drops its pages (after the reads queued
        before, so a block asked for again in this window is read after being dropped)."""
        files = self._files.get(name)
        if files is not None:
            self.dropped.append(name)
            self._jobs.put((name, self._pages[name], threading.Event(), files))

    def wait(self) -> None:
        """Block until every requested block has been faulted in (tests, benchmarks)."""
        self._jobs.join()

    def close(self) -> None:
        self._stop()
        self._pages.clear()

    def _request_from(self, name: str, *, running: str | None, force: bool = False) -> None:
        """Ask for `name` and the blocks expected after it, `depth` in all. With streamed
        blocks, resident blocks found in memory do not count: the reader looks past them to
        the next streamed ones, so their reads overlap the resident blocks' compute (the plan
        keeps room for `depth` blocks on their way, not for the resident ones)."""
        counted = 0
        for _ in range(len(self._pages)):
            if counted >= self._depth or name == running:
                return  # enough on their way, or wrapped around to the block running now
            if name not in self._recent:  # already on its way
                self._recent.append(name)
                self.requests.append(name)
                self._check(name, force=force)
            if not (self._files and name not in self._files and self._quiet.get(name, 0) > 0):
                counted += 1
            name = self._predict.after(name)

    def _check(self, name: str, *, force: bool = False) -> None:
        """Hand `name` to the worker, unless it was found resident lately (and not forced)."""
        left = self._quiet.get(name, 0)
        if left > 0 and not force:
            self._quiet[name] = left - 1
            return
        self.checks.append(name)
        done = threading.Event()
        self._inflight[name] = done
        self._jobs.put((name, self._pages[name], done, None))


_Job = tuple[str, Pages, threading.Event, FileRanges | None]  # FileRanges: drop, not read


def _stop_worker(jobs: queue.Queue[_Job | None], thread: threading.Thread) -> None:
    jobs.put(None)
    thread.join()


def _fault_in_forever(
    jobs: queue.Queue[_Job | None],
    quiet: dict[str, int],
    span: dict[str, int],
    streamed: frozenset[str],
    failed: list[BaseException],
) -> None:
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            if failed:
                continue  # enter() raises the first failure; the rest only release waiters
            name, pages, _, files = job
            if files is not None:
                drop(pages, files)
            elif name in streamed:
                fault_in(pages)  # missing by design: says nothing about the others
            elif fault_in(pages):
                # pages went missing: memory pressure or a dropped cache rarely hits one
                # block alone, so every block is checked on every pass again, not only this
                quiet.clear()
                span.clear()
            else:
                span[name] = quiet[name] = min(2 * span.get(name, 0) or 1, QUIET_MAX)
        except Exception as error:  # handed to the forward that waits
            failed.append(error)
        finally:
            if job is not None:
                job[2].set()
            jobs.task_done()


# --- GPU execution of cpu/disk-stored blocks -----------------------------------------


class GpuStreamer:
    """cpu/disk-stored blocks executing on one GPU, streamed in whole and double-buffered.

    Per block: a worker thread queues, on the side stream and after the device buffer's
    last reader finished (event `free`), the copies that fill that buffer, then records
    `ready`; the compute stream waits on `ready`, and the host never waits on the device.
    A cpu-tier block (`in_ram`) lives in its own page-locked buffer from the start: one
    copy. A disk block goes through a small ring of pinned chunks: the worker copies a
    chunk of the block's bytes into a free ring slot (this reads the file's pages) and
    queues its host -> device copy, so the memcpy of chunk i+1 overlaps the transfer of
    chunk i, and pinned host memory stays RING_SLOTS x RING_CHUNK whatever the block size
    (a whole-block arena would pin 2 x 1.7 GB for a Llama-3-70B layer).
    """

    SLOTS = 2  # double buffer: one block runs, the next arrives
    RING_SLOTS = 4  # pinned chunks a disk block is staged through
    RING_CHUNK = 64 << 20  # bytes per chunk

    def __init__(
        self,
        device: torch.device,
        blocks: Sequence[BlockWeights],
        *,
        prefetch: bool,
        streamed: Collection[str] = (),
    ):
        assert blocks, "GpuStreamer needs at least one block"
        self.device = device
        self.prefetch = prefetch
        self._blocks = {b.name: b for b in blocks}
        # cpu-tier blocks: one page-locked buffer each, laid out like the device buffer, so
        # each block is one host -> device copy at PCIe speed with no staging copy first
        self._pinned = {b.name: p for b in blocks if b.in_ram and (p := self._pin(b)) is not None}
        capacity = max(b.nbytes for b in blocks)  # bytes: the largest block fits one slot
        self._pages = {  # of the staged (disk) blocks: read in before the staging copy
            b.name: page_ranges(b.host) for b in blocks if b.name not in self._pinned
        }
        mappings = (file_mappings() or []) if streamed else []
        # disk blocks the plan streams: their pages dropped once staged (Plan.streamed)
        self._drop = {
            n: file_ranges(self._pages[n], mappings) for n in streamed if n in self._pages
        }
        staged = max((self._blocks[n].nbytes for n in self._pages), default=0)  # bytes
        chunk = min(self.RING_CHUNK, staged)
        pinned = device.type == "cuda" and chunk > 0  # (tests: CPU, fake events)
        self._ring = torch.empty((self.RING_SLOTS, chunk), dtype=torch.uint8, pin_memory=pinned)
        self._ring_free = _events(self.RING_SLOTS)  # the copy out of that chunk finished
        self._ring_next = 0  # the ring slot to fill next (worker thread only)
        self._buffers = [
            torch.empty(capacity, dtype=torch.uint8, device=device) for _ in range(self.SLOTS)
        ]
        self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self._ready = _events(self.SLOTS)  # buffer filled
        self._free = _events(self.SLOTS)  # buffer's reader done
        self._holder: list[str | None] = [None] * self.SLOTS  # block a buffer holds or will
        self._jobs: list[Future[None] | None] = [None] * self.SLOTS
        self._active = [0] * self.SLOTS  # calls running from each buffer (re-entry counts)
        self._views: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._predict = Successors([b.name for b in blocks])
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="devicemap-stream", initializer=self._bind
        )
        weakref.finalize(self, _unpin_all, self._pinned)  # dropped without close()

    def _bind(self) -> None:
        torch.cuda.set_device(self.device)

    def begin(self) -> None:
        if self.prefetch:
            self._prefetch(self._predict.peek(), avoid=None)

    def enter(self, name: str) -> None:
        slot = self._find(name)
        if slot is None:
            slot = self._stage(name, self._idle_slot(avoid=None, name=name))
        job = self._jobs[slot]
        if job is not None:
            job.result()  # host side of the staging done (the copy itself may still run)
        torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        if self._active[slot] == 0:
            self._point(name, self._slot_views(name, slot))
        self._active[slot] += 1
        expected = self._predict.observe(name)
        if self.prefetch:
            self._prefetch(expected, avoid=slot)

    def exit(self, name: str) -> None:
        slot = self._find(name)
        if slot is None or self._active[slot] == 0:
            return  # enter() failed before taking the buffer
        self._free[slot].record(torch.cuda.current_stream(self.device))
        self._active[slot] -= 1
        if self._active[slot] == 0:
            self._point(name, self._blocks[name].host)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        # copies still queued on the side stream write into the buffers: order the compute
        # stream after them (on the device, not the host) before the allocator reuses them
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        for slot, name in enumerate(self._holder):
            if name is not None and self._active[slot]:
                self._point(name, self._blocks[name].host)
        if self._pinned:  # copies out of them must end before the pages are unlocked
            self._stream.synchronize()  # release only, never on the hot path
            _unpin_all(self._pinned)  # the memory stays valid (weights use it), just pageable
        self._views.clear()
        self._buffers.clear()
        self._blocks.clear()
        self._pages.clear()
        del self._ring, self._stream, self._ready, self._free, self._ring_free

    # -- buffers ------------------------------------------------------------------------

    def _find(self, name: str) -> int | None:
        for slot, holder in enumerate(self._holder):
            if holder == name:
                return slot
        return None

    def _idle_slot(self, *, avoid: int | None, name: str) -> int:
        idle = [s for s in range(self.SLOTS) if self._active[s] == 0 and s != avoid]
        if not idle:
            raise OffloadError(
                f"offloaded block {name!r} is called while blocks"
                f" {', '.join(repr(h) for h in self._holder)} are still running on"
                f" {self.device}; offloaded blocks cannot nest. Give the outer module"
                " one block in the device map, or store one of them on the GPU"
            )
        keep = self._predict.after(name)  # do not evict the block expected next
        return next((s for s in idle if self._holder[s] != keep), idle[0])

    def _prefetch(self, name: str, *, avoid: int | None) -> None:
        if self._find(name) is not None:
            return
        idle = [s for s in range(self.SLOTS) if self._active[s] == 0 and s != avoid]
        if idle:
            self._stage(name, idle[0])

    def _stage(self, name: str, slot: int) -> int:
        self._holder[slot] = name
        self._jobs[slot] = self._worker.submit(self._copy_in, name, slot)
        return slot

    def _pin(self, block: BlockWeights) -> torch.Tensor | None:
        """Move a cpu-tier block's tensors into one buffer, page-locked in place, and point
        the weights at it; None (the block is staged like a disk block) if locking fails."""
        buffer = torch.empty(block.nbytes, dtype=torch.uint8)  # [nbytes], like the device's
        if not pin(buffer):
            return None
        pairs = list(zip(block.host, block.offsets, strict=True))
        with torch.inference_mode(False):  # kept across forwards: ordinary tensors
            views = [_typed(buffer, offset, host) for host, offset in pairs]
        for view, host in zip(views, block.host, strict=True):
            view.copy_(host)
        self._blocks[block.name] = dataclasses.replace(block, host=tuple(views))
        self._point(block.name, views)  # the old storage (file pages or RAM) is let go
        return buffer

    def _copy_in(self, name: str, slot: int) -> None:
        """Worker thread: the block's bytes -> device buffer `slot`, copies queued on the
        side stream after the buffer's last reader; then `ready`."""
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(self._free[slot])  # last reader of the buffer is done
            buffer = self._buffers[slot]
            if name in self._pinned:  # page-locked already: one copy
                source = self._pinned[name]
                buffer[: source.numel()].copy_(source, non_blocking=True)
            else:
                self._stage_through_ring(name, buffer)
            self._ready[slot].record(self._stream)

    def _stage_through_ring(self, name: str, buffer: torch.Tensor) -> None:
        """A disk block chunk by chunk: file pages -> a pinned ring slot -> `buffer`."""
        block = self._blocks[name]
        fault_in(self._pages[name])  # one reader of the file (the copies below are threaded)
        chunk = self._ring.shape[1]
        raws = [_raw(host) for host in block.host]
        for start in range(0, block.nbytes, chunk):
            end = min(start + chunk, block.nbytes)
            r, self._ring_next = self._ring_next, (self._ring_next + 1) % self.RING_SLOTS
            self._ring_free[r].synchronize()  # its previous copy to the device finished
            ring = self._ring[r]
            for raw, offset in zip(raws, block.offsets, strict=True):
                lo, hi = max(start, offset), min(end, offset + raw.numel())
                if lo < hi:  # the part of this tensor inside [start, end)
                    ring[lo - start : hi - start].copy_(raw[lo - offset : hi - offset])
            buffer[start:end].copy_(ring[: end - start], non_blocking=True)
            self._ring_free[r].record(self._stream)
        files = self._drop.get(name)
        if files is not None:  # its bytes are in pinned memory or on their way: let go
            drop(self._pages[name], files)

    def _slot_views(self, name: str, slot: int) -> list[torch.Tensor]:
        views = self._views.get((name, slot))
        if views is None:
            block = self._blocks[name]
            buffer = self._buffers[slot]
            with torch.inference_mode(False):  # kept across forwards: ordinary tensors
                pairs = zip(block.host, block.offsets, strict=True)
                views = [_typed(buffer, offset, host) for host, offset in pairs]
            self._views[(name, slot)] = views
        return views

    def _point(self, name: str, data: Sequence[torch.Tensor]) -> None:
        for tensor, target in zip(self._blocks[name].tensors, data, strict=True):
            tensor.data = target


def pin(buffer: torch.Tensor) -> bool:
    """Page-lock a CPU tensor's memory in place (cudaHostRegister): copies from it to a GPU
    run asynchronously at full PCIe speed. Exact size, unlike torch's pinned allocator,
    which rounds each allocation up to a power of two. False if the driver refuses."""
    if buffer.numel() == 0:
        return False
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    return int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) == 0


def unpin(buffer: torch.Tensor) -> None:
    """Undo `pin`: the memory stays the tensor's, pageable again."""
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())  # type: ignore[no-untyped-call]


def _unpin_all(pinned: dict[str, torch.Tensor]) -> None:
    for buffer in pinned.values():
        unpin(buffer)
    pinned.clear()


def _events(count: int) -> list[torch.cuda.Event]:
    return [torch.cuda.Event() for _ in range(count)]  # type: ignore[no-untyped-call]


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view, [nbytes]."""
    return tensor.detach().reshape(-1).view(torch.uint8)


def _typed(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view of `buffer` (uint8) at byte `offset` with the dtype and shape of `like`."""
    nbytes = like.numel() * like.element_size()
    return buffer[offset : offset + nbytes].view(like.dtype).view(like.shape)
