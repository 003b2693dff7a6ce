"""devicemap.offload: block weights, the successor predictor, the page prefetcher.

The GPU streamer needs CUDA: it is covered in tests/gpu/test_gpu_dispatch.py.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from devicemap.dispatch import _STATE, dispatch
from devicemap.offload import (
    ALIGN,
    PAGE,
    PagePrefetcher,
    Successors,
    block_weights,
    fault_in,
    page_ranges,
)
from test_dispatch import batch_for, blocks_of, make_plan, place, storage_for
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


def test_page_ranges_cover_each_tensor_one_byte_per_page() -> None:
    big = torch.zeros(3 * PAGE // 4 + 10)  # float32: spans 3 pages and a bit
    ranges = page_ranges([big[5:]])  # not page-aligned
    ((start, length, touches),) = ranges
    ptr = big[5:].data_ptr()
    assert start % PAGE == 0 and start <= ptr and start + length == ptr + big[5:].nbytes
    pages = {(ptr + i * PAGE) // PAGE for i in range(len(touches[0]))} | {
        (ptr + big[5:].nbytes - 1) // PAGE
    }
    assert pages == set(range(start // PAGE, (start + length - 1) // PAGE + 1))


# --- page residency (mincore) ----------------------------------------------------------------


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def resident(tensors: list[torch.Tensor]) -> float:
    """The fraction of the tensors' pages that are in memory."""
    total = present = 0
    for start, length, _ in page_ranges(tensors):
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
    prefetcher = PagePrefetcher(blocks)
    try:
        prefetcher.enter("model.layers.1")  # block 1 runs: block 3 is next
        prefetcher.wait()
        assert resident(list(blocks[1].host)) == 1.0
        assert resident(list(blocks[0].host)) == 0.0  # nobody asked for the running block
        assert list(prefetcher.requests) == ["model.layers.3"]
    finally:
        prefetcher.close()


def test_fault_in_reads_every_page(disk_llama: tuple[Any, Any, Path]) -> None:
    model, _, root = disk_llama
    block = block_weights("model.layers.3", model.model.layers[3])
    evict([root / "model.layers.3.safetensors"])
    fault_in(page_ranges(block.host))
    assert resident(list(block.host)) == 1.0


@torch.no_grad()
def test_dispatched_forwards_request_each_next_disk_block(
    disk_llama: tuple[Any, Any, Path],
) -> None:
    model, plan, _ = disk_llama
    dispatch(model, plan)
    (prefetcher,) = model.__dict__[_STATE].offloads
    assert isinstance(prefetcher, PagePrefetcher)
    batch = batch_for("llama")
    model(**batch)
    prefetcher.wait()
    # begin(): the first disk block; each disk block asks for the next, the last for the first
    cycle = ["model.layers.3", "model.norm", "model.layers.1"]
    assert list(prefetcher.requests) == ["model.layers.1", *cycle]
    model(**batch)  # the first block was requested at the end of the last forward: not again
    prefetcher.wait()
    assert list(prefetcher.requests) == ["model.layers.1", *cycle, *cycle]


def test_prefetch_off_attaches_no_block_hooks(disk_llama: tuple[Any, Any, Path]) -> None:
    model, plan, _ = disk_llama
    dispatch(model, plan, prefetch=False)
    assert model.__dict__[_STATE].offloads == []
    hooked = {n for n, m in model.named_modules() if m._forward_pre_hooks}
    assert hooked == {""}
