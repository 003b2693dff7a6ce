"""Dispatch on a real GPU: mixed cuda:0 / cpu / disk plans, offloaded blocks streamed with
prefetch, llama.cpp-style CPU execution, no device synchronisation on the hot path.

Skipped without CUDA (tests/gpu/conftest.py). Compared with the plain model on cuda:0.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch

from devicemap.run.dispatch import _STATE, dispatch, hook_count, release, releasing
from devicemap.run.offload import GpuStreamer, PagePrefetcher
from test_dispatch import batch_for, blocks_of, make_plan, modules_with_hooks, place
from tiny import build_tiny, model_class

CUDA = torch.device("cuda:0")


def mixed_storage(arch: str, names: list[str]) -> dict[str, Any]:
    """cuda:0 / cpu / disk alternating over the layers; a norm on disk; ties kept together."""
    storage: dict[str, Any] = dict.fromkeys(names, 0)
    kinds = [0, "cpu", "disk"]
    layers = [n for n in names if ".layers." in n or ".block." in n]
    for i, name in enumerate(layers):
        storage[name] = kinds[i % 3]
    for name in ("model.norm", "encoder.final_layer_norm", "model.vision_tower"):
        if name in storage:
            storage[name] = "disk"
    return storage


def gpu_exec(storage: dict[str, Any]) -> dict[str, Any]:
    return dict.fromkeys(storage, 0)


def cpu_exec(storage: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp style: cpu/disk-stored blocks execute on the CPU."""
    return {n: ("cpu" if v in ("cpu", "disk") else v) for n, v in storage.items()}


def build(
    arch: str, tmp_path: Path, exec_of: Any = gpu_exec, **dispatch_options: Any
) -> tuple[Any, Any]:
    plain = build_tiny(arch).to(CUDA)
    model = build_tiny(arch)
    storage = mixed_storage(arch, blocks_of(arch, model))
    plan = make_plan(storage, exec_of(storage))
    return plain, dispatch(place(model, plan, tmp_path), plan, **dispatch_options)


def on(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def assert_same_logits(model: Any, plain: Any, arch: str, *, atol: float = 1e-5) -> None:
    batch = batch_for(arch)
    ours = model(**batch).logits  # inputs on the CPU: logits come back there
    assert ours.device.type == "cpu"
    torch.testing.assert_close(ours, plain(**on(CUDA, batch)).logits.cpu(), rtol=1e-4, atol=atol)
    assert model(**on(CUDA, batch)).logits.device == CUDA  # and on the GPU when they were


def assert_same_greedy(model: Any, plain: Any, arch: str) -> None:
    batch = {k: v for k, v in batch_for(arch).items() if k != "decoder_input_ids"}
    greedy = {"max_new_tokens": 10, "do_sample": False}
    ours = model.generate(**on(CUDA, batch), **greedy)
    assert torch.equal(ours, plain.generate(**on(CUDA, batch), **greedy))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "t5", "llava"])
def test_mixed_plan_streamed_to_the_gpu_equals_plain(arch: str, tmp_path: Path) -> None:
    plain, model = build(arch, tmp_path)
    offloads = model.__dict__[_STATE].offloads
    assert [type(o) for o in offloads] == [GpuStreamer]
    assert_same_logits(model, plain, arch)
    assert_same_greedy(model, plain, arch)
    release(model)


@torch.no_grad()
def test_only_the_model_and_streamed_blocks_have_hooks(tmp_path: Path) -> None:
    _, model = build("llama", tmp_path)
    streamed = {"model.layers.1", "model.layers.2", "model.norm"}
    assert modules_with_hooks(model) == {"", *streamed}
    assert hook_count(model) == 2 + 2 * len(streamed)  # entry pre+post; enter+exit per block
    release(model)


@torch.no_grad()
def test_prefetch_off_gives_the_same_answers(tmp_path: Path) -> None:
    plain, model = build("llama", tmp_path, prefetch=False)
    assert_same_logits(model, plain, "llama")
    assert_same_greedy(model, plain, "llama")
    release(model)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_cpu_execution_of_offloaded_blocks(arch: str, tmp_path: Path) -> None:
    plain, model = build(arch, tmp_path, exec_of=cpu_exec)
    assert any(isinstance(o, PagePrefetcher) for o in model.__dict__[_STATE].offloads)
    assert_same_logits(model, plain, arch, atol=1e-4)  # CPU and GPU kernels round differently
    assert_same_greedy(model, plain, arch)


@torch.no_grad()
def test_kv_cache_stays_on_each_layers_execution_device(tmp_path: Path) -> None:
    _, model = build("llama", tmp_path, exec_of=cpu_exec)
    batch = on(CUDA, batch_for("llama"))
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    want = [torch.device(d) for d in ("cuda:0", "cpu", "cpu", "cuda:0")]  # layers 0..3
    assert [layer.keys.device for layer in out.past_key_values.layers] == want
    release(model)


@torch.no_grad()
def test_each_tensor_moves_once_per_forward(tmp_path: Path) -> None:
    _, model = build("llama", tmp_path, exec_of=cpu_exec)
    mover = model.__dict__[_STATE].mover
    moved: list[tuple[int, torch.device]] = []
    copy = mover._copy
    mover._copy = lambda t, d: (moved.append((id(t), d)), copy(t, d))[1]
    model(**on(CUDA, batch_for("llama")))
    assert moved, "layers 1-2 run on the CPU: hidden states and positions must move"
    assert len(moved) == len(set(moved))  # layer 2 reused what layer 1 needed
    release(model)


@torch.no_grad()
def test_no_device_sync_or_cache_flush_on_the_hot_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, model = build("llama", tmp_path)
    batch = on(CUDA, batch_for("llama"))
    model.generate(**batch, max_new_tokens=2, do_sample=False)  # warm up outside the guard
    calls: list[str] = []

    def forbid(name: str) -> Any:
        def guard(*args: Any, **kwargs: Any) -> None:
            calls.append(name)
            raise AssertionError(f"{name} called on the hot path")

        return guard

    monkeypatch.setattr(torch.cuda, "synchronize", forbid("torch.cuda.synchronize"))
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", forbid("Stream.synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", forbid("torch.cuda.empty_cache"))
    greedy = {"max_new_tokens": 10, "do_sample": False}
    ours = model.generate(**batch, **greedy)
    monkeypatch.undo()
    assert calls == []
    assert torch.equal(ours, plain.generate(**batch, **greedy))
    release(model)


def test_release_frees_the_gpu_memory(tmp_path: Path) -> None:
    with torch.no_grad():  # cuBLAS keeps a workspace from its first matmul: make it first
        build_tiny("llama").to(CUDA)(**on(CUDA, batch_for("llama")))
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(CUDA)
    model = build_tiny("llama")
    storage = mixed_storage("llama", blocks_of("llama", model))
    plan = make_plan(storage, gpu_exec(storage))
    with releasing(dispatch(place(model, plan, tmp_path), plan)) as running, torch.no_grad():
        running(**on(CUDA, batch_for("llama")))
        assert torch.cuda.memory_allocated(CUDA) > before
    assert hook_count(model) == 0
    assert torch.cuda.memory_allocated(CUDA) == before


@torch.no_grad()
def test_cpu_stored_blocks_are_pinned_in_place_and_unpinned_on_release(tmp_path: Path) -> None:
    plain, model = build("llama", tmp_path)
    (streamer,) = model.__dict__[_STATE].offloads
    cpu_weight = model.model.layers[1].mlp.up_proj.weight  # layer 1: stored on cpu
    disk_weight = model.model.layers[2].mlp.up_proj.weight  # layer 2: on disk (a file map)
    assert cpu_weight.device.type == "cpu" and cpu_weight.is_pinned()
    assert list(streamer._pinned) == ["model.layers.1"]
    assert not disk_weight.is_pinned()
    assert_same_logits(model, plain, "llama")
    release(model, drop_weights=False)
    assert not cpu_weight.is_pinned()  # page-locked no more; the memory is still its own
    assert cpu_weight.abs().sum().item() > 0


@torch.no_grad()
def test_load_streams_cpu_stored_layers_to_the_gpu(tiny_models: dict[str, Path]) -> None:
    """devicemap.load end to end: layers pinned to cpu, executed on cuda:0 (the default)."""
    import devicemap

    path = tiny_models["llama"]
    pins = {"model.layers.1": "cpu", "model.layers.2": "disk"}
    model = devicemap.load(path, max_memory={0: "1GiB", "cpu": "1GiB", "disk": "1GiB"},
                           pins=pins, context=64, progress=False)  # fmt: skip
    plan = model.devicemap_plan
    assert plan.exec_map["model.layers.1"] == plan.exec_map["model.layers.2"] == 0  # cuda:0
    plain = model_class("llama").from_pretrained(path).to(CUDA).eval()
    assert_same_logits(model, plain, "llama")
    assert_same_greedy(model, plain, "llama")
    release(model)
