"""devicemap.run.offload: block weights, the successor predictor, the page prefetcher.

The GPU streamer needs CUDA: it is covered in tests/gpu/test_gpu_dispatch.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from devicemap.errors import OffloadError
from devicemap.run import offload
from devicemap.run.dispatch import _STATE, dispatch
from devicemap.run.offload import (
    ALIGN,
    QUIET_MAX,
    BlockWeights,
    GpuStreamer,
    PagePrefetcher,
    Successors,
    _typed,
    block_weights,
    lookahead,
)
from devicemap.run.pages import PAGE, any_missing, fault_in, page_ranges
from test_dispatch import batch_for, blocks_of, make_plan, modules_with_hooks, place, storage_for
from tiny import build_tiny

# --- successors ---------------------------------------------------------------------------


def test_successors_start_in_plan_order_and_wrap() -> None:
    s = Successors(["a", "b", "c"])
    assert s.peek() == "a"
    assert [s.observe(n) for n in "abc"] == ["b", "c", "a"]
    assert s.peek() == "a"


def test_successors_learn_what_actually_runs() -> None:
    s = Successors(["enc0", "enc1", "dec0", "dec1"])
    for name in ["enc0", "enc1", "dec0", "dec1", "dec0", "dec1"]:  # the encoder runs once
        s.observe(name)
    assert s.peek() == "dec0"  # after dec1 comes dec0 again, not enc0
    assert s.observe("dec0") == "dec1"


def test_successors_ignore_a_block_called_twice_in_a_row() -> None:
    s = Successors(["a", "b"])
    s.observe("a")
    assert s.observe("a") == "b"


# --- block weights -------------------------------------------------------------------------


def test_block_weights_align_offsets_and_count_tied_weights_once() -> None:
    emb = torch.nn.Embedding(10, 6)
    head = torch.nn.Linear(6, 10, bias=True)
    head.weight = emb.weight  # tied
    block = torch.nn.ModuleDict({"emb": emb, "head": head})
    block.register_buffer("scale", torch.ones(3))
    block.register_buffer("elsewhere", torch.ones(2, device="meta"), persistent=False)
    weights = block_weights("b", block)
    assert [t.shape for t in weights.tensors] == [(10, 6), (10,), (3,)]  # meta buffer skipped
    assert weights.offsets == (0, 256, 512) and all(o % ALIGN == 0 for o in weights.offsets)
    assert weights.nbytes == 768
    pairs = zip(weights.host, weights.tensors, strict=True)
    assert all(h.data_ptr() == t.data_ptr() for h, t in pairs)


def test_page_ranges_merge_adjacent_tensors() -> None:
    big = torch.zeros(3 * PAGE // 4 + 10)  # float32: spans 3 pages and a bit
    a, b = big[5:100], big[100:]  # not page-aligned, adjacent
    pages = page_ranges([b, a])
    ((start, length),) = pages.spans
    assert start % PAGE == 0 and start <= a.data_ptr() < start + PAGE
    assert start + length == big.data_ptr() + big.nbytes
    assert [r.data_ptr() for r in pages.raws] == [a.data_ptr(), b.data_ptr()]
    assert [r.numel() for r in pages.raws] == [a.nbytes, b.nbytes]
    far = torch.zeros(4 * PAGE)
    assert len(page_ranges([a, far[PAGE:]]).spans) == 2


def test_any_missing_sees_untouched_pages() -> None:
    written = torch.ones(3 * PAGE)
    ((start, length),) = page_ranges([written]).spans
    assert not any_missing(start, length)
    area = mmap.mmap(-1, 4 * PAGE)  # anonymous, never touched: nothing resident
    fresh = torch.frombuffer(area, dtype=torch.uint8)
    ((start, length),) = page_ranges([fresh]).spans
    assert any_missing(start, length)
    fresh[::PAGE].sum()
    assert not any_missing(start, length)


# --- page residency (mincore) ----------------------------------------------------------------


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def resident(tensors: list[torch.Tensor]) -> float:
    """The fraction of the tensors' pages that are in memory."""
    total = present = 0
    for start, length in page_ranges(tensors).spans:
        vec = ctypes.create_string_buffer((length + PAGE - 1) // PAGE)
        assert _libc().mincore(start, length, vec) == 0, os.strerror(ctypes.get_errno())
        total += len(vec.raw)
        present += sum(b & 1 for b in vec.raw)
    return present / total


def evict(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture
def disk_llama(tmp_path: Path) -> tuple[Any, Any, Path]:
    model = build_tiny("llama", hidden_size=128, intermediate_size=512)  # ~0.5 MiB per layer
    plan = make_plan(storage_for("llama", blocks_of("llama", model)))
    return place(model, plan, tmp_path), plan, tmp_path


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise and mincore")
def test_prefetcher_faults_in_the_next_block(disk_llama: tuple[Any, Any, Path]) -> None:
    model, plan, root = disk_llama
    disk = [n for n, v in plan.device_map.items() if v == "disk"]
    assert disk == ["model.layers.1", "model.layers.3", "model.norm"]
    blocks = [block_weights(n, model.get_submodule(n)) for n in disk]
    evict([root / f"{n}.safetensors" for n in disk])
    if resident(list(blocks[1].host)) > 0.0:
        pytest.skip("this filesystem keeps pages cached after POSIX_FADV_DONTNEED")
    prefetcher = PagePrefetcher(blocks, depth=1)
    try:
        prefetcher.enter("model.layers.1")  # block 1 runs: block 3 is next
        prefetcher.wait()
        assert resident(list(blocks[1].host)) == 1.0
        assert resident(list(blocks[0].host)) == 0.0  # nobody asked for the running block
        assert list(prefetcher.requests) == ["model.layers.3"]
    finally:
        prefetcher.close()


def test_a_read_that_fails_in_the_worker_is_raised_by_the_forward_not_waited_on(
    disk_llama: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, plan, _ = disk_llama
    disk = [n for n, v in plan.device_map.items() if v == "disk"]
    blocks = [block_weights(n, model.get_submodule(n)) for n in disk]

    def broken(pages: Any, **_: Any) -> bool:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(offload, "fault_in", broken)
    prefetcher = PagePrefetcher(blocks, depth=1)
    try:
        prefetcher.begin()  # asks for model.layers.1: the worker fails on it
        done = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                prefetcher.enter("model.layers.1")
                prefetcher.enter("model.layers.3")
            except OffloadError as error:
                errors.append(error)
            done.set()

        threading.Thread(target=run, daemon=True).start()
        assert done.wait(10), "enter() hung on a worker that had failed"
        assert len(errors) == 1
        assert "model.layers.1" in str(errors[0]) and "Input/output error" in str(errors[0])
    finally:
        prefetcher.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT, mincore")
def test_a_streamed_block_is_dropped_once_it_has_run_and_resident_ones_stay(
    disk_llama: tuple[Any, Any, Path],
) -> None:
    # the disk tier's cache policy (issue 11): blocks the plan streams are let go after they
    # run, so cyclic access cannot evict the resident ones (an LRU drops those first)
    model, plan, root = disk_llama
    disk = [n for n, v in plan.device_map.items() if v == "disk"]
    blocks = [block_weights(n, model.get_submodule(n)) for n in disk]
    evict([root / f"{n}.safetensors" for n in disk])
    prefetcher = PagePrefetcher(blocks, depth=1, streamed={"model.layers.1"})
    streamed, kept = blocks[0], blocks[1]
    seen = []
    try:
        for _ in range(2):  # two forwards
            prefetcher.begin()
            for block in blocks:
                prefetcher.enter(block.name)
                sum(float(t.float().sum()) for t in block.host)  # it runs: reads its pages
                prefetcher.exit(block.name)
                prefetcher.wait()
                if block is kept:  # before the last block asks for the first one again
                    seen.append((resident(list(streamed.host)), resident(list(kept.host))))
        assert all(gone < 0.5 and stays == 1.0 for gone, stays in seen), seen
        assert list(prefetcher.dropped) == ["model.layers.1"] * 2
        assert resident(list(streamed.host)) == 1.0  # read ahead again for the next forward
    finally:
        prefetcher.close()


def test_resident_blocks_are_checked_ever_less_often_missing_ones_every_pass(
    disk_llama: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, plan, _ = disk_llama
    disk = [n for n, v in plan.device_map.items() if v == "disk"]
    blocks = [block_weights(n, model.get_submodule(n)) for n in disk]
    missing = {"now": False}  # what the worker's residency check finds
    monkeypatch.setattr(offload, "fault_in", lambda pages, **_: missing["now"])
    prefetcher = PagePrefetcher(blocks, depth=1)

    def checks_in(passes: int) -> int:
        before = len(prefetcher.checks)
        for _ in range(passes):
            for name in disk:
                prefetcher.enter(name)
                prefetcher.wait()
        return len(prefetcher.checks) - before

    try:
        assert checks_in(1) == 3  # each block once, as the one after the running block
        assert checks_in(1) == 0  # all found resident: quiet for one pass
        # quiet 1, 2, 4 .. QUIET_MAX passes: a handful of checks, not 3 per pass
        assert checks_in(300) <= 3 * (7 + 300 // QUIET_MAX + 1)
        missing["now"] = True
        checks_in(QUIET_MAX + 1)  # every quiet period runs out; the check finds pages missing
        assert checks_in(5) == 15  # pages keep going missing: checked on every pass again
        assert len(prefetcher.requests) == 3 * (1 + 1 + 300 + QUIET_MAX + 1 + 5)  # all asked
    finally:
        prefetcher.close()


def test_missing_pages_at_a_forwards_start_wake_every_quiet_block(
    disk_llama: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a long warm run every block is quiet for QUIET_MAX passes; when the cache is
    dropped, the forced check of the first block sees it and the rest follow that pass."""
    model, plan, _ = disk_llama
    disk = [n for n, v in plan.device_map.items() if v == "disk"]
    blocks = [block_weights(n, model.get_submodule(n)) for n in disk]
    missing = {"now": False}
    monkeypatch.setattr(offload, "fault_in", lambda pages, **_: missing["now"])
    prefetcher = PagePrefetcher(blocks, depth=1)

    def forward() -> list[str]:
        before = len(prefetcher.checks)
        prefetcher.begin()
        for name in disk:
            prefetcher.enter(name)
        prefetcher.wait()
        return list(prefetcher.checks)[before:]

    try:
        for _ in range(4 * QUIET_MAX):
            forward()
        assert forward() == [disk[0]]  # warm: only the forced check of the first block
        missing["now"] = True  # the page cache was dropped
        assert set(forward()) == set(disk)  # every block checked within the same pass
    finally:
        prefetcher.close()


def test_the_page_worker_is_joined_on_close_and_at_interpreter_exit(
    disk_llama: tuple[Any, Any, Path],
) -> None:
    """A daemon thread still in torch code when the interpreter finalizes aborts the process
    (pthread_exit through C++ frames): the worker must be stopped before that, at exit."""
    model, plan, _ = disk_llama
    disk = [n for n, v in plan.device_map.items() if v == "disk"]
    prefetcher = PagePrefetcher([block_weights(n, model.get_submodule(n)) for n in disk])
    assert prefetcher._stop.atexit and prefetcher._stop.alive  # runs at exit if never closed
    prefetcher.close()
    assert not prefetcher._thread.is_alive() and not prefetcher._stop.alive
    prefetcher.close()  # twice is fine


def test_a_block_the_worker_has_in_hand_is_waited_for_not_faulted_twice(
    disk_llama: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One reader of the file at a time: entering a block whose pages the worker is still
    reading waits for it instead of faulting the same file from a second thread."""
    model, plan, _ = disk_llama
    disk = [n for n, v in plan.device_map.items() if v == "disk"]
    blocks = [block_weights(n, model.get_submodule(n)) for n in disk]
    events: list[str] = []
    gate = threading.Event()

    def slow_fault_in(pages: Any, **_: Any) -> bool:
        gate.wait(5)
        events.append("worker done")
        return True

    monkeypatch.setattr(offload, "fault_in", slow_fault_in)
    prefetcher = PagePrefetcher(blocks, depth=1)
    try:
        prefetcher.begin()  # asks for model.layers.1, the first disk block
        entered = threading.Thread(
            target=lambda: (prefetcher.enter("model.layers.1"), events.append("entered"))
        )
        entered.start()
        entered.join(0.2)
        assert entered.is_alive() and events == []  # still waiting on the worker
        gate.set()
        entered.join(5)
        assert events[0] == "worker done" and "entered" in events  # (the next block may follow)
    finally:
        gate.set()
        prefetcher.close()


def test_fault_in_reads_every_page(disk_llama: tuple[Any, Any, Path]) -> None:
    model, _, root = disk_llama
    block = block_weights("model.layers.3", model.model.layers[3])
    evict([root / "model.layers.3.safetensors"])
    fault_in(page_ranges(block.host))
    assert resident(list(block.host)) == 1.0


@torch.no_grad()
def test_dispatched_forwards_request_each_next_disk_block(
    disk_llama: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, plan, _ = disk_llama
    monkeypatch.setattr(offload, "LOOKAHEAD", 1)  # bytes: the least look-ahead, 2 blocks
    dispatch(model, plan)
    (prefetcher,) = model.__dict__[_STATE].offloads
    assert isinstance(prefetcher, PagePrefetcher)
    batch = batch_for("llama")
    model(**batch)
    prefetcher.wait()
    # depth 2: begin() asks for the first two disk blocks, each block for the one two ahead
    l1, l3, norm = "model.layers.1", "model.layers.3", "model.norm"
    assert list(prefetcher.requests) == [l1, l3, norm, l1, l3]
    model(**batch)  # begin() asks again for the first two: their pages may have gone since
    prefetcher.wait()
    assert list(prefetcher.requests) == [l1, l3, norm, l1, l3, l1, l3, norm, l1, l3]
    assert prefetcher.checks.count(l1) >= 2  # forced at each forward's start, even if quiet


def test_lookahead_keeps_a_fixed_amount_of_bytes_on_the_way() -> None:
    def blocks(*mib: int) -> list[BlockWeights]:
        return [BlockWeights(f"b{i}", (), (), (), n << 20) for i, n in enumerate(mib)]

    assert offload.LOOKAHEAD == 64 << 20
    assert lookahead(blocks(14, 14, 14, 100)) == 5  # smollm-sized blocks: 5 x 14 MiB
    assert lookahead(blocks(88, 88, 88)) == 2  # tinyllama-sized: never fewer than 2
    assert lookahead(blocks(1700, 1700)) == 2  # a 70B layer: 2, not gigabytes more
    assert lookahead(blocks(1, 1, 1)) == 8  # tiny blocks: at most 8
    assert lookahead(blocks(0)) == 8  # (empty blocks do not divide by zero)


def test_prefetch_off_attaches_no_block_hooks(disk_llama: tuple[Any, Any, Path]) -> None:
    model, plan, _ = disk_llama
    dispatch(model, plan, prefetch=False)
    assert model.__dict__[_STATE].offloads == []
    assert modules_with_hooks(model) == {""}


# --- the GPU streamer's bookkeeping, on the CPU with fake streams and events ------------------


class FakeEvent:
    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class FakeStream:
    def __init__(self, device: Any = None) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def _fake_stream_context(stream: Any) -> Iterator[None]:
    yield


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamer's CUDA calls as no-ops: copies on the CPU finish at once, so the test
    checks its bookkeeping (buffers, views, re-pointing, prefetch), not stream ordering."""
    compute = FakeStream()
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", _fake_stream_context)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


def stream_blocks(
    model: Any, names: list[str], in_ram: tuple[str, ...] = ()
) -> tuple[GpuStreamer, list[Any]]:
    blocks = [block_weights(n, model.get_submodule(n)) for n in names]
    blocks = [dataclasses.replace(b, in_ram=b.name in in_ram) for b in blocks]
    streamer = GpuStreamer(torch.device("cpu"), blocks, prefetch=True)
    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: streamer.enter(n)))
        exit_ = functools.partial(lambda n, m, a, o: streamer.exit(n), name)
        handles.append(module.register_forward_hook(exit_, always_call=True))
    return streamer, handles


def _inside(tensor: torch.Tensor, buffers: list[torch.Tensor]) -> bool:
    ptr = tensor.data_ptr()
    return any(b.data_ptr() <= ptr < b.data_ptr() + b.numel() for b in buffers)


@torch.no_grad()
def test_streamer_runs_blocks_from_its_buffers_and_points_back(
    fake_cuda: None, disk_llama: tuple[Any, Any, Path]
) -> None:
    model, _, _ = disk_llama
    plain = build_tiny("llama", hidden_size=128, intermediate_size=512)
    names = ["model.layers.1", "model.layers.2", "model.layers.3"]  # disk, cpu, disk
    host = {n: model.get_submodule(n).mlp.up_proj.weight.data_ptr() for n in names}
    streamer, _ = stream_blocks(model, names)
    seen: dict[str, bool] = {}
    for name in names:
        proj = model.get_submodule(name).mlp.up_proj
        proj.register_forward_pre_hook(
            lambda m, a, n=name: seen.__setitem__(n, _inside(m.weight, streamer._buffers))
        )
    batch = batch_for("llama")
    assert torch.equal(model(**batch).logits, plain(**batch).logits)
    assert seen == dict.fromkeys(names, True)  # each block computed from a device buffer
    for name in names:  # and afterwards its weights are the storage again
        assert model.get_submodule(name).mlp.up_proj.weight.data_ptr() == host[name]
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(**batch, **greedy), plain.generate(**batch, **greedy))
    streamer.close()


@torch.no_grad()
def test_streamer_prefetches_the_next_block_and_keeps_what_fits(
    fake_cuda: None, disk_llama: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _, _ = disk_llama
    copies: list[str] = []
    copy_in = GpuStreamer._copy_in
    monkeypatch.setattr(
        GpuStreamer, "_copy_in", lambda self, n, s: (copies.append(n), copy_in(self, n, s))[1]
    )
    streamer, _ = stream_blocks(model, ["model.layers.1", "model.layers.3"])
    batch = batch_for("llama")
    streamer.begin()
    model(**batch)
    assert copies == ["model.layers.1", "model.layers.3"]  # layer 3 staged while 1 ran
    for _ in range(3):
        streamer.begin()
        model(**batch)
    assert copies == ["model.layers.1", "model.layers.3"]  # two blocks, two buffers: no copy
    streamer.close()


def test_streamer_re_entry_and_nesting(fake_cuda: None, disk_llama: tuple[Any, Any, Path]) -> None:
    model, _, _ = disk_llama
    names = ["model.layers.0", "model.layers.1", "model.layers.2"]
    weight = {n: model.get_submodule(n).mlp.up_proj.weight for n in names}
    host = {n: w.data_ptr() for n, w in weight.items()}
    blocks = [block_weights(n, model.get_submodule(n)) for n in names]
    streamer = GpuStreamer(torch.device("cpu"), blocks, prefetch=False)
    streamer.enter(names[0])
    streamer.enter(names[0])  # re-entered while running
    streamer.exit(names[0])
    assert _inside(weight[names[0]], streamer._buffers)  # still running: still on the buffer
    streamer.exit(names[0])
    assert weight[names[0]].data_ptr() == host[names[0]]
    streamer.enter(names[0])
    streamer.enter(names[1])  # nested: both buffers busy
    with pytest.raises(OffloadError, match="cannot nest"):
        streamer.enter(names[2])
    streamer.exit(names[1])
    streamer.exit(names[0])
    streamer.close()
    assert all(weight[n].data_ptr() == host[n] for n in names)


@pytest.fixture
def fake_pin(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """cudaHostRegister/Unregister as bookkeeping: which buffers were locked, unlocked."""
    calls: dict[str, list[int]] = {"pin": [], "unpin": []}
    monkeypatch.setattr(offload, "pin", lambda b: calls["pin"].append(b.data_ptr()) or True)
    monkeypatch.setattr(offload, "unpin", lambda b: calls["unpin"].append(b.data_ptr()))
    return calls


@torch.no_grad()
def test_cpu_tier_blocks_are_pinned_in_place_once(
    fake_cuda: None,
    fake_pin: dict[str, list[int]],
    disk_llama: tuple[Any, Any, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _, _ = disk_llama
    read_in: list[Any] = []
    real_fault_in = offload.fault_in
    monkeypatch.setattr(offload, "fault_in", lambda p: (read_in.append(p), real_fault_in(p))[1])
    plain = build_tiny("llama", hidden_size=128, intermediate_size=512)
    names = ["model.layers.1", "model.layers.2", "model.layers.3"]  # disk, cpu, disk
    streamer, _ = stream_blocks(model, names, in_ram=("model.layers.2",))
    (buffer,) = streamer._pinned.values()
    assert fake_pin["pin"] == [buffer.data_ptr()]
    weight = model.model.layers[2].mlp.up_proj.weight
    assert _inside(weight, [buffer])  # the cpu-tier weights now live in the locked buffer
    disk_bytes = [streamer._blocks[n].nbytes for n in (names[0], names[2])]
    chunk = min(GpuStreamer.RING_CHUNK, max(disk_bytes))
    assert streamer._ring.shape == (GpuStreamer.RING_SLOTS, chunk)  # stages disk blocks only
    assert set(streamer._pages) == {names[0], names[2]}
    batch = batch_for("llama")
    assert torch.equal(model(**batch).logits, plain(**batch).logits)
    assert _inside(weight, [buffer])  # and point back there after running
    disk_pages = [streamer._pages[names[0]], streamer._pages[names[2]]]
    assert read_in and all(any(p is d for d in disk_pages) for p in read_in)  # disk only
    streamer.close()
    assert fake_pin["unpin"] == fake_pin["pin"]
    assert _inside(weight, [buffer]) and not streamer._pinned  # memory still valid, unlocked


@torch.no_grad()
def test_a_pinned_block_is_copied_to_the_device_without_staging(
    fake_cuda: None, fake_pin: dict[str, list[int]], disk_llama: tuple[Any, Any, Path]
) -> None:
    model, _, _ = disk_llama
    plain = build_tiny("llama", hidden_size=128, intermediate_size=512)
    streamer, _ = stream_blocks(model, ["model.layers.2"], in_ram=("model.layers.2",))
    assert streamer._ring.numel() == 0  # nothing to stage: any staging copy would fail
    batch = batch_for("llama")
    for _ in range(2):
        streamer.begin()
        assert torch.equal(model(**batch).logits, plain(**batch).logits)
    streamer.close()


def test_a_block_the_driver_will_not_lock_is_staged(
    fake_cuda: None, disk_llama: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _, _ = disk_llama
    monkeypatch.setattr(offload, "pin", lambda buffer: False)
    weight = model.model.layers[2].mlp.up_proj.weight
    host = weight.data_ptr()
    streamer, _ = stream_blocks(model, ["model.layers.2"], in_ram=("model.layers.2",))
    assert not streamer._pinned and weight.data_ptr() == host  # left where it was
    nbytes = streamer._blocks["model.layers.2"].nbytes
    assert streamer._ring.shape == (GpuStreamer.RING_SLOTS, min(GpuStreamer.RING_CHUNK, nbytes))
    streamer.close()


@torch.no_grad()
def test_disk_blocks_staged_in_chunks_that_cut_through_tensors_arrive_whole(
    fake_cuda: None, disk_llama: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1000-byte ring: chunk edges fall inside tensors and inside the ALIGN padding, and
    every ring slot is reused many times per block; the device buffer must still hold each
    tensor's exact bytes."""
    model, _, _ = disk_llama
    plain = build_tiny("llama", hidden_size=128, intermediate_size=512)
    monkeypatch.setattr(GpuStreamer, "RING_CHUNK", 1000)
    names = ["model.layers.1", "model.layers.3"]  # both on disk
    streamer, _ = stream_blocks(model, names)
    assert streamer._ring.shape == (GpuStreamer.RING_SLOTS, 1000)
    batch = batch_for("llama")
    for _ in range(2):
        streamer.begin()
        assert torch.equal(model(**batch).logits, plain(**batch).logits)
    block = streamer._blocks[names[1]]
    slot = streamer._find(names[1])
    assert slot is not None
    for host, offset in zip(block.host, block.offsets, strict=True):
        assert torch.equal(_typed(streamer._buffers[slot], offset, host), host)
    streamer.close()
