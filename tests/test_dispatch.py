"""devicemap.run.dispatch: hooks at device boundaries, nested moves, release.

Models here execute on the CPU with some blocks stored on "disk" (weights re-pointed at
read-only mmaps of safetensors files, as the loader leaves them); every output is compared
with the plain model. Cross-device moves are tested as pure functions with a real move to
the meta device; moves between real devices are in tests/gpu.
"""

from __future__ import annotations

import gc
import json
import mmap
import warnings
import weakref
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from devicemap.devices import parse_device
from devicemap.errors import LoadError, PlanError, UnknownDevice
from devicemap.plan.options import PlanOptions
from devicemap.plan.planner import Plan
from devicemap.run.dispatch import (
    Layout,
    attach,
    boundaries,
    dispatch,
    hook_count,
    layout_of,
    release,
    releasing,
)
from devicemap.run.mover import Mover, first_device
from devicemap.run.pages import file_mappings
from tiny import build_tiny

# --- helpers (tests/gpu imports them too) ------------------------------------------------

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


def blocks_of(arch: str, model: Any) -> list[str]:
    """Block names in execution order, as the skeleton gives them."""
    if arch == "t5":
        enc = [f"encoder.block.{i}" for i in range(len(model.encoder.block))]
        dec = [f"decoder.block.{i}" for i in range(len(model.decoder.block))]
        # encoder/decoder.embed_tokens share `shared.weight`: tied aliases, not blocks
        return [
            "shared",
            *enc,
            "encoder.final_layer_norm",
            *dec,
            "decoder.final_layer_norm",
            "lm_head",
        ]
    base = "model.language_model" if arch == "llava" else "model"
    layers = [f"{base}.layers.{i}" for i in range(len(model.get_submodule(f"{base}.layers")))]
    head = [f"{base}.embed_tokens"]
    if arch == "llava":
        head += ["model.vision_tower", "model.multi_modal_projector"]
    return [*head, f"{base}.rotary_emb", *layers, f"{base}.norm", "lm_head"]


def make_plan(storage: dict[str, Any], execution: dict[str, Any] | None = None) -> Plan:
    """A Plan with just the two maps dispatch reads."""
    execution = execution or {n: ("cpu" if v in ("cpu", "disk") else v) for n, v in storage.items()}
    return Plan(
        model="tiny",
        fingerprint="",
        dtype=torch.float32,
        options=PlanOptions(context=64),
        device_map=dict(storage),
        exec_map=dict(execution),
        devices=(),
        max_context=64,
        order="forward",
        reasons=(),
    )


def place(model: Any, plan: Plan, root: Path) -> Any:
    """Put every weight on its storage device as load.py does; non-persistent buffers on exec."""
    for name, where in plan.device_map.items():
        module = model.get_submodule(name)
        if where == "disk":
            to_mmap(module, root / f"{name}.safetensors")
        elif parse_device(where).kind == "cuda":
            for tensor in _weights(module):
                tensor.data = tensor.data.to(parse_device(where).torch())
        runs = parse_device(plan.exec_map[name]).torch()
        for sub in module.modules():
            for leaf in sub._non_persistent_buffers_set:
                sub._buffers[leaf] = sub._buffers[leaf].to(runs)
    return model


def _weights(module: torch.nn.Module) -> list[torch.Tensor]:
    unique: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for tensor in sub._parameters.values():
            if tensor is not None:
                unique.setdefault(id(tensor), tensor)
        for leaf, tensor in sub._buffers.items():
            if tensor is not None and leaf not in sub._non_persistent_buffers_set:
                unique.setdefault(id(tensor), tensor)
    return list(unique.values())


def to_mmap(module: torch.nn.Module, path: Path) -> None:
    """Save the module's weights with safetensors; point them at a read-only mmap of the file."""
    tensors = _weights(module)
    if not tensors:
        return
    save_file({str(i): t.detach().contiguous() for i, t in enumerate(tensors)}, str(path))
    with open(path, "rb") as f:  # the header through read(): no page of the map is touched
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    for i, tensor in enumerate(tensors):
        entry = header[str(i)]
        start, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        count = (end - start) // dtype.itemsize
        with warnings.catch_warnings():  # the map is read-only, as the loader's is
            warnings.filterwarnings("ignore", message=".*not writable.*")
            flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + header_len + start)
        tensor.data = flat.view(tensor.shape)


def is_mmap(tensor: torch.Tensor, path: Path) -> bool:
    ptr = tensor.data_ptr()
    maps = file_mappings() or []
    return any(str(path) in m.path and m.start <= ptr < m.end for m in maps)


def batch_for(arch: str) -> dict[str, torch.Tensor]:
    if arch == "t5":
        ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
        return {"input_ids": ids, "decoder_input_ids": torch.tensor([[0, 9, 4]])}
    if arch == "llava":  # 4 image tokens for the 2x2 patches, so the vision tower runs
        pixels = torch.linspace(-1, 1, 3 * 28 * 28).view(1, 3, 28, 28)
        return {
            "input_ids": torch.tensor([[1, 300, 300, 300, 300, 7, 3, 250]]),
            "pixel_values": pixels,
        }
    return {"input_ids": torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250]])}


# storage per arch: a mix of cpu and disk, tied groups kept together
def storage_for(arch: str, names: list[str]) -> dict[str, str]:
    storage = dict.fromkeys(names, "cpu")
    for i, name in enumerate(names):
        if (".layers." in name or ".block." in name) and i % 2 == 1:
            storage[name] = "disk"
    for name in ("model.norm", "encoder.final_layer_norm", "model.vision_tower"):
        if name in storage:
            storage[name] = "disk"
    return storage


@pytest.fixture
def llama(tmp_path: Path) -> tuple[Any, Any, Plan]:
    plain = build_tiny("llama")
    model = build_tiny("llama")
    plan = make_plan(storage_for("llama", blocks_of("llama", model)))
    return plain, place(model, plan, tmp_path), plan


# --- boundaries -----------------------------------------------------------------------


def layout(devices: dict[str, Any], *, traced: bool = True) -> Layout:
    parsed = {n: parse_device(d) for n, d in devices.items()}
    return Layout(order=tuple(devices), storage=parsed, execution=parsed, traced=traced)


def test_boundaries_one_device_needs_no_block_hooks() -> None:
    assert boundaries(layout(dict.fromkeys("abcd", "cpu"))) == frozenset()
    assert boundaries(layout(dict.fromkeys("abcd", 0))) == frozenset()


def test_boundaries_start_at_the_first_device_change() -> None:
    # emb, l0 on cuda:0; l1, l2 on cuda:1; head back on cuda:0
    devices = {"emb": 0, "l0": 0, "l1": 1, "l2": 1, "norm": 1, "head": 0}
    assert boundaries(layout(devices)) == {"l1", "l2", "norm", "head"}


def test_boundaries_when_the_second_block_leaves_home() -> None:
    devices = {"emb": "cpu", "l0": 0, "l1": 0, "head": 0}
    assert boundaries(layout(devices)) == {"l0", "l1", "head"}


def test_boundaries_llama_cpp_style_cpu_run_in_the_middle() -> None:
    devices = {"emb": 0, "l0": 0, "l1": 0, "l2": "cpu", "l3": "cpu", "norm": 0, "head": 0}
    assert boundaries(layout(devices)) == {"l2", "l3", "norm", "head"}


def test_boundaries_without_traced_order_hook_every_block() -> None:
    devices = {"vision": 1, "proj": 1, "emb": 0, "l0": 0}
    assert boundaries(layout(devices, traced=False)) == set(devices)


def test_layout_of_parses_both_maps_once() -> None:
    plan = make_plan({"a": 0, "b": "disk", "c": "cpu"}, {"a": 0, "b": 0, "c": "cpu"})
    got = layout_of(plan)
    assert got.order == ("a", "b", "c")
    assert [str(got.storage[n]) for n in got.order] == ["cuda:0", "disk", "cpu"]
    assert [str(got.execution[n]) for n in got.order] == ["cuda:0", "cuda:0", "cpu"]


def test_layout_of_names_blocks_missing_from_one_map() -> None:
    plan = make_plan({"a": 0, "b": "cpu"}, {"a": 0, "c": "cpu"})
    with pytest.raises(PlanError, match="b, c"):
        layout_of(plan)


# --- the mover ------------------------------------------------------------------------

META = torch.device("meta")


class Spy:
    """A copy function that really moves (to meta) and counts what it moved."""

    def __init__(self) -> None:
        self.moved: list[int] = []

    def __call__(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.moved.append(id(tensor))
        return tensor.to(device)


@dataclass
class Extra:
    mask: torch.Tensor
    scale: float = 1.0


Pair = namedtuple("Pair", "cos sin")


def test_mover_moves_every_nested_tensor_and_keeps_the_containers() -> None:
    t = [torch.randn(2) for _ in range(6)]
    out = BaseModelOutputWithPast(last_hidden_state=t[5])
    args = (t[0], [t[1], 3], {"pos": Pair(t[2], t[3]), "extra": Extra(t[4])}, out, "text", None)
    moved = Mover(Spy()).move(args, META)
    assert isinstance(moved, tuple) and isinstance(moved[1], list)
    assert isinstance(moved[2]["pos"], Pair) and isinstance(moved[2]["extra"], Extra)
    assert isinstance(moved[3], BaseModelOutputWithPast)
    flat = [moved[0], moved[1][0], *moved[2]["pos"], moved[2]["extra"].mask, moved[3][0]]
    assert all(x.device == META for x in flat)
    assert moved[1][1] == 3 and moved[4] == "text" and moved[5] is None
    assert moved[2]["extra"].scale == 1.0
    assert args[0].device.type == "cpu"  # the caller's objects are not modified


def test_mover_leaves_caches_alone() -> None:
    cache = DynamicCache()
    spy = Spy()
    kwargs = {"past_key_values": cache, "x": torch.ones(1)}
    moved = Mover(spy).move(kwargs, META)
    assert moved["past_key_values"] is cache and len(spy.moved) == 1


def test_mover_returns_the_same_object_when_nothing_moves() -> None:
    args = ({"a": torch.ones(2), "b": (torch.zeros(1),)}, [torch.ones(1)])
    spy = Spy()
    assert Mover(spy).move(args, torch.device("cpu")) is args
    assert spy.moved == []


def test_mover_moves_a_tensor_once_however_many_blocks_receive_it() -> None:
    mask, pos = torch.ones(4), torch.zeros(4)
    spy = Spy()
    mover = Mover(spy)
    first = mover.move({"mask": mask, "pos": pos}, META)
    for _ in range(5):  # five more blocks on the same device get the same tensors
        again = mover.move({"mask": mask, "pos": pos}, META)
        assert again["mask"] is first["mask"] and again["pos"] is first["pos"]
    assert len(spy.moved) == 2
    mover.reset()  # the next forward moves them again
    mover.move({"mask": mask}, META)
    assert len(spy.moved) == 3


def test_mover_moves_again_after_an_in_place_change() -> None:
    spy = Spy()
    mover, x = Mover(spy), torch.ones(3)
    mover.move(x, META)
    x.add_(1)
    mover.move(x, META)
    assert len(spy.moved) == 2


def test_mover_drops_a_moved_copy_when_its_source_dies() -> None:
    mover = Mover(lambda t, d: t.clone())  # a "move" that keeps the data, to watch its lifetime
    src = torch.ones(3)
    moved = mover.move(src, META)
    copy_ref = weakref.ref(moved)
    del moved, src
    gc.collect()
    assert copy_ref() is None


def test_first_device_is_the_first_top_level_tensor() -> None:
    assert first_device((), {"use_cache": True, "input_ids": torch.ones(1)}) == torch.device("cpu")
    assert first_device((None,), {}) is None


# --- dispatched models on the CPU, some blocks on disk ----------------------------------


def modules_with_hooks(model: Any) -> set[str]:
    """Modules carrying devicemap hooks (transformers adds output-capturing hooks of its own)."""
    return {n for n, m in model.named_modules() if hook_count(m) > hook_count_below(m)}


def hook_count_below(module: Any) -> int:
    return sum(hook_count(child) for child in module.children())


def test_hooks_only_on_the_model_and_disk_blocks(llama: tuple[Any, Any, Plan]) -> None:
    _, model, plan = llama
    dispatch(model, plan)
    disk = {n for n, v in plan.device_map.items() if v == "disk"}
    assert disk == {"model.layers.1", "model.layers.3", "model.norm"}
    assert modules_with_hooks(model) == {"", *disk}  # entry hooks + page prefetch
    assert hook_count(model) == 2 + len(disk)
    assert model.hf_device_map == dict.fromkeys(plan.device_map, "cpu")


def test_disk_blocks_run_from_the_mmap(llama: tuple[Any, Any, Plan], tmp_path: Path) -> None:
    _, model, plan = llama
    dispatch(model, plan)
    weight = model.model.layers[1].mlp.up_proj.weight
    assert is_mmap(weight, tmp_path / "model.layers.1.safetensors")


@torch.no_grad()
def test_llama_logits_greedy_and_sampling_equal_plain(llama: tuple[Any, Any, Plan]) -> None:
    plain, model, plan = llama
    dispatch(model, plan)
    batch = batch_for("llama")
    assert torch.equal(model(**batch).logits, plain(**batch).logits)
    greedy = {"max_new_tokens": 12, "do_sample": False}
    assert torch.equal(model.generate(**batch, **greedy), plain.generate(**batch, **greedy))
    sample = {"max_new_tokens": 12, "do_sample": True, "top_k": 50, "temperature": 1.5}
    torch.manual_seed(7)
    ours = model.generate(**batch, **sample)
    torch.manual_seed(7)
    assert torch.equal(ours, plain.generate(**batch, **sample))


@torch.no_grad()
def test_every_block_hooked_still_equals_plain(llama: tuple[Any, Any, Plan]) -> None:
    plain, model, plan = llama
    layout = layout_of(plan)
    attach(model, layout, hooked=frozenset(layout.order))
    assert modules_with_hooks(model) == {"", *layout.order}
    batch = batch_for("llama")
    assert torch.equal(model(**batch).logits, plain(**batch).logits)
    greedy = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(model.generate(**batch, **greedy), plain.generate(**batch, **greedy))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["t5", "llava"])
def test_encoder_decoder_and_vision_language_equal_plain(arch: str, tmp_path: Path) -> None:
    plain, model = build_tiny(arch), build_tiny(arch)
    plan = make_plan(storage_for(arch, blocks_of(arch, model)))
    dispatch(place(model, plan, tmp_path), plan)
    assert "disk" in plan.device_map.values()
    batch = batch_for(arch)
    assert torch.equal(model(**batch).logits, plain(**batch).logits)
    gen = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(**gen, **greedy), plain.generate(**gen, **greedy))
    # hooks only, never a replaced forward (generate would add accelerate's to the encoder)
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
    if arch == "t5":
        assert model.encoder._hf_hook.io_same_device  # generate's flag, set on our shim
        assert model.encoder._forward_pre_hooks and model.encoder._forward_hooks  # an entry
    release(model)
    assert hook_count(model) == 0
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@torch.no_grad()
def test_text_generation_pipeline(llama: tuple[Any, Any, Plan]) -> None:
    from transformers import pipeline

    plain, model, plan = llama
    dispatch(model, plan)
    tok = tiny_tokenizer()
    prompt = "w5 w17 w42 w99"
    options = {"max_new_tokens": 6, "do_sample": False}
    ours = pipeline("text-generation", model=model, tokenizer=tok)(prompt, **options)
    theirs = pipeline("text-generation", model=plain, tokenizer=tok)(prompt, **options)
    assert ours == theirs
    assert ours[0]["generated_text"].startswith(prompt) and len(ours[0]["generated_text"]) > len(
        prompt
    )


# --- release ------------------------------------------------------------------------------


def test_release_removes_every_hook_and_drops_the_weights(llama: tuple[Any, Any, Plan]) -> None:
    _, model, plan = llama
    dispatch(model, plan)
    ref = weakref.ref(model.model.layers[1].mlp.up_proj.weight)  # an mmap-backed weight
    ref_cpu = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    assert hook_count(model) > 0
    release(model)
    gc.collect()
    assert hook_count(model) == 0
    assert ref() is None and ref_cpu() is None
    assert all(p.is_meta for p in model.parameters())
    assert not hasattr(model, "hf_device_map")
    release(model)  # twice: nothing left to do


def test_release_of_a_model_never_dispatched_frees_it_too() -> None:
    model = build_tiny("llama")
    ref = weakref.ref(model.lm_head.weight)
    release(model)
    assert ref() is None and all(p.is_meta for p in model.parameters())


def test_releasing_context_manager(llama: tuple[Any, Any, Plan]) -> None:
    plain, model, plan = llama
    batch = batch_for("llama")
    with releasing(dispatch(model, plan)) as running, torch.no_grad():
        assert torch.equal(running(**batch).logits, plain(**batch).logits)
        assert hook_count(running) > 0
    assert hook_count(model) == 0 and all(p.is_meta for p in model.parameters())


def test_release_then_dispatch_again(llama: tuple[Any, Any, Plan]) -> None:
    _, model, plan = llama
    dispatch(model, plan)
    with pytest.raises(PlanError, match="already dispatched"):
        dispatch(model, plan)
    release(model, drop_weights=False)
    assert hook_count(model) == 0
    dispatch(model, plan)
    assert hook_count(model) > 0


# --- bad plans ------------------------------------------------------------------------------


def test_blocks_the_model_lacks_are_listed_together() -> None:
    model = build_tiny("llama")
    plan = make_plan(
        {**dict.fromkeys(blocks_of("llama", model), "cpu"), "model.nope": "cpu", "x.y": "cpu"}
    )
    with pytest.raises(PlanError, match=r"model\.nope, x\.y"):
        dispatch(model, plan)
    assert hook_count(model) == 0


def test_weights_off_their_storage_device_are_reported(tmp_path: Path) -> None:
    model = build_tiny("llama")
    names = blocks_of("llama", model)
    plan = make_plan(
        {**dict.fromkeys(names, "cpu"), "model.layers.2": 0}, dict.fromkeys(names, "cpu")
    )
    with pytest.raises(LoadError, match=r"model\.layers\.2\.self_attn\.q_proj\.weight on cpu"):
        dispatch(model, plan)
    assert hook_count(model) == 0 and not hasattr(model, "hf_device_map")


def test_weights_outside_every_block_are_reported() -> None:
    model = build_tiny("llama")
    names = [n for n in blocks_of("llama", model) if n != "lm_head"]
    with pytest.raises(PlanError, match="lm_head"):
        dispatch(model, make_plan(dict.fromkeys(names, "cpu")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_streaming_to_a_gpu_without_cuda_says_so(tmp_path: Path) -> None:
    model = build_tiny("llama")
    names = blocks_of("llama", model)
    plan = make_plan(dict.fromkeys(names, "cpu"), dict.fromkeys(names, 0))
    with pytest.raises(UnknownDevice, match="CUDA is not available"):
        dispatch(model, plan)
    assert hook_count(model) == 0
