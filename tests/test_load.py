"""devicemap.load: weights streamed from the checkpoint to where the plan puts them.

Every loaded model is compared with transformers' own `from_pretrained` of the same
checkpoint: logits bit for bit (same inputs, float32 and bfloat16) and greedy tokens.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import devicemap
from devicemap.devices import format_size, parse_device
from devicemap.errors import (
    CorruptCheckpoint,
    DeviceNotPresent,
    DeviceOutOfMemory,
    KeyMismatch,
    OffloadError,
    PlanMismatch,
)
from devicemap.load import cache as cache_module
from devicemap.load import loader as load_module
from devicemap.load import reader
from devicemap.load.loader import load, place
from devicemap.model.checkpoint import read_index
from devicemap.model.skeleton import Skeleton, build_skeleton
from devicemap.plan.options import PlanOptions
from devicemap.plan.planner import DeviceUsage, Plan
from devicemap.run.pages import FileMapping, file_mappings
from tiny import CAUSAL, make_tiny, model_class

# --- helpers ---------------------------------------------------------------------


def reference(path: Path, arch: str, dtype: torch.dtype = torch.float32) -> Any:
    """transformers' own load of the checkpoint: the answer every devicemap load must give."""
    return model_class(arch).from_pretrained(path, dtype=dtype).eval()


def inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250]])  # [B=1, T=8]
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    if arch == "llava":
        return {
            "input_ids": ids,
            "pixel_values": torch.linspace(-1, 1, 3 * 28 * 28).view(1, 3, 28, 28),
        }
    return {"input_ids": ids}


@torch.no_grad()
def logits(model: Any, arch: str) -> torch.Tensor:
    batch = inputs(arch)
    if arch == "llava":  # 4 image tokens for the 2x2 patches, so the vision tower runs too
        batch["input_ids"] = torch.tensor([[1, 300, 300, 300, 300, 7, 3, 250]])
    out: torch.Tensor = model(**batch).logits
    return out.float()


def hand_plan(
    skeleton: Skeleton,
    device_map: dict[str, int | str],
    exec_map: dict[str, int | str] | None = None,
) -> Plan:
    """A Plan built by hand: what `devicemap.plan` returns, for any placement a test needs."""
    devices = sorted({parse_device(v) for v in device_map.values()}, key=lambda d: d.sort_key)
    usage = tuple(DeviceUsage(d, 2**30, 0, 0, 0, 0, 0) for d in devices)
    exec_map = exec_map or {k: ("cpu" if v == "disk" else v) for k, v in device_map.items()}
    return Plan(
        model=skeleton.source.name,
        fingerprint=skeleton.fingerprint,
        dtype=skeleton.dtype,
        options=PlanOptions(context=64),
        device_map=dict(device_map),
        exec_map=dict(exec_map),
        devices=usage,
        max_context=64,
        order=skeleton.order,
        reasons=(),
    )


def every_block(skeleton: Skeleton, device: int | str) -> dict[str, int | str]:
    return {b.name: device for b in skeleton.blocks}


def alternate(skeleton: Skeleton) -> dict[str, int | str]:
    """Blocks alternating cpu / disk in execution order (tied blocks with the first of them)."""
    mapping: dict[str, int | str] = {
        b.name: ("cpu", "disk")[i % 2] for i, b in enumerate(skeleton.blocks)
    }
    for group in skeleton.tied:
        for name in group:
            mapping[name] = mapping[group[0]]
    return mapping


def hand_load(path: Path, device_map: Any, *, dtype: torch.dtype | None = None, **kw: Any) -> Any:
    """load() through build_skeleton + a hand-made plan (device_map: dict or skeleton -> dict)."""
    skeleton = build_skeleton(path, dtype=dtype)
    mapping = device_map(skeleton) if callable(device_map) else device_map
    plan = hand_plan(skeleton, mapping)
    return place(skeleton, plan, read_index(skeleton.source), progress=False, **kw)


def pinned_load(path: Path, pins: dict[str, str], offload_dir: Path, **options: Any) -> Any:
    """load() with roomy cpu and disk budgets, `pins`, context 64, offloaded blocks on the CPU."""
    return load(
        path,
        max_memory={"cpu": "1GiB", "disk": "1GiB"},
        pins=pins,
        context=64,
        offload_exec="cpu",
        offload_dir=offload_dir,
        progress=False,
        **options,
    )


def disk_params(model: Any) -> dict[str, torch.Tensor]:
    plan = model.devicemap_plan
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        block = load_module._block_of(name, plan.device_map)
        if block is not None and plan.device_map[block] == "disk":
            out[name] = param
    return out


def mapped_files() -> list[FileMapping]:
    """This process's file mappings (/proc/self/maps)."""
    found = file_mappings()
    assert found is not None, "these tests read /proc/self/maps (Linux)"
    return found


def backing_file(tensor: torch.Tensor, spans: list[FileMapping]) -> str | None:
    ptr = tensor.data_ptr()
    return next((m.path for m in spans if m.start <= ptr < m.end), None)


# --- parity with transformers ----------------------------------------------------------


@pytest.mark.parametrize("arch", sorted((*CAUSAL, "t5", "llava")))
def test_every_arch_all_cpu_matches_from_pretrained(
    tiny_models: dict[str, Path], arch: str
) -> None:
    path = tiny_models[arch]
    model = hand_load(path, lambda s: every_block(s, "cpu"))
    expected = reference(path, arch)
    assert torch.equal(logits(model, arch), logits(expected, arch))
    kept = tuple(  # fused experts kept as the checkpoint's per-expert tensors stay meta
        f"{n}." for n, m in model.named_modules() if "_devicemap_experts" in m.__dict__
    )
    assert all(
        p.device.type == "cpu" for n, p in model.named_parameters() if not n.startswith(kept)
    )
    grads = {n: p.requires_grad for n, p in expected.named_parameters()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads  # as transformers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral", "qwen2_moe", "gpt2", "llava"])
def test_alternating_cpu_disk_matches_from_pretrained(
    tiny_models: dict[str, Path], arch: str, tmp_path: Path
) -> None:
    path = tiny_models[arch]
    model = hand_load(path, alternate, offload_dir=tmp_path)
    assert disk_params(model), "the plan put nothing on disk"
    assert torch.equal(logits(model, arch), logits(reference(path, arch), arch))


def test_all_disk_parameters_are_the_checkpoint_file(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models["llama"]
    model = hand_load(path, lambda s: every_block(s, "disk"), offload_dir=tmp_path)
    spans = mapped_files()
    shards = {str(f) for f in path.glob("*.safetensors")}
    params = disk_params(model)
    assert len(params) == len(list(model.parameters()))
    for name, param in params.items():
        assert backing_file(param, spans) in shards, f"{name} is not a view of a checkpoint shard"
    assert list(tmp_path.iterdir()) == [], "same dtype, 1:1 keys: no cache may be written"
    assert torch.equal(logits(model, "llama"), logits(reference(path, "llama"), "llama"))


def test_cpu_parameters_are_the_checkpoint_copy_on_write(tiny_models: dict[str, Path]) -> None:
    """Same dtype: the file's pages, mapped in at load (no copy); a write stays private."""
    path = tiny_models["llama"]
    shards = {f: f.read_bytes() for f in path.glob("*.safetensors")}
    model = hand_load(path, lambda s: every_block(s, "cpu"))
    spans = mapped_files()
    params = dict(model.named_parameters())
    assert all(backing_file(p, spans) in map(str, shards) for p in params.values())
    expected = logits(reference(path, "llama"), "llama")
    assert torch.equal(logits(model, "llama"), expected)
    with torch.no_grad():
        params["model.norm.weight"].mul_(2.0)  # a user's in-place edit: no crash
    assert not torch.equal(logits(model, "llama"), expected)
    assert all(f.read_bytes() == data for f, data in shards.items()), "the checkpoint changed"


def test_cpu_parameters_beside_a_disk_tier_are_ordinary_memory(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """With disk blocks streaming through the page cache, the cpu tier is kept out of it."""
    path = tiny_models["llama"]
    model = hand_load(path, alternate, offload_dir=tmp_path)
    spans = mapped_files()
    disk = disk_params(model)
    ram = {n: p for n, p in model.named_parameters() if n not in disk}
    assert disk and ram
    assert all(backing_file(p, spans) is None for p in ram.values())
    assert all(backing_file(p, spans) is not None for p in disk.values())
    assert torch.equal(logits(model, "llama"), logits(reference(path, "llama"), "llama"))


def test_two_loads_of_one_checkpoint_do_not_share_writes(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama"]
    first = hand_load(path, lambda s: every_block(s, "cpu"))
    second = hand_load(path, lambda s: every_block(s, "cpu"))
    with torch.no_grad():
        first.model.norm.weight.fill_(3.0)
    assert not torch.equal(second.model.norm.weight, first.model.norm.weight)
    assert torch.equal(logits(second, "llama"), logits(reference(path, "llama"), "llama"))


def test_cpu_parameters_in_another_dtype_are_ordinary_memory(
    tiny_models: dict[str, Path],
) -> None:
    model = hand_load(tiny_models["llama"], lambda s: every_block(s, "cpu"), dtype=torch.bfloat16)
    spans = mapped_files()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(backing_file(p, spans) is None for p in model.parameters())


def test_disk_experts_are_the_checkpoints_tensors_with_no_converted_copy(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models["mixtral"]
    model = hand_load(path, lambda s: every_block(s, "disk"), offload_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing converted: per-expert tensors as saved
    spans = mapped_files()
    shards = {str(f) for f in path.glob("*.safetensors")}
    pieces = model.model.layers[1].mlp.experts.__dict__["_devicemap_experts"]
    assert all(backing_file(t, spans) in shards for t in pieces.tensors(range(4)))
    norm = model.model.layers[1].input_layernorm.weight  # 1:1 key: straight from its shard
    assert backing_file(norm, spans) in shards
    assert torch.equal(logits(model, "mixtral"), logits(reference(path, "mixtral"), "mixtral"))


def test_fused_experts_in_another_dtype_come_from_one_cache_written_once(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path, bf16 = tiny_models["mixtral"], torch.bfloat16
    model = hand_load(path, lambda s: every_block(s, "disk"), dtype=bf16, offload_dir=tmp_path)
    (cache,) = tmp_path.iterdir()  # one file for every converted tensor
    assert cache.suffix == ".safetensors"
    experts = model.model.layers[1].mlp.experts.gate_up_proj
    assert backing_file(experts, mapped_files()) == str(cache)
    expected = logits(reference(path, "mixtral", bf16), "mixtral")
    assert torch.equal(logits(model, "mixtral"), expected)
    before = cache.stat()
    again = hand_load(path, lambda s: every_block(s, "disk"), dtype=bf16, offload_dir=tmp_path)
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert torch.equal(logits(again, "mixtral"), expected)


def test_other_dtype_on_disk_uses_cache_and_matches_from_pretrained(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models["qwen2"]  # fp32 checkpoint, tied embeddings
    model = hand_load(path, alternate, dtype=torch.bfloat16, offload_dir=tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    (cache,) = tmp_path.iterdir()
    spans = mapped_files()
    assert all(backing_file(p, spans) == str(cache) for p in disk_params(model).values())
    expected = reference(path, "qwen2", torch.bfloat16)
    assert torch.equal(logits(model, "qwen2"), logits(expected, "qwen2"))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_greedy_generate_matches_token_for_token(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models["mistral"]
    model = hand_load(path, alternate, offload_dir=tmp_path)
    expected = reference(path, "mistral")
    ids = inputs("mistral")["input_ids"]
    ours = model.generate(ids, max_new_tokens=8, do_sample=False)
    theirs = expected.generate(ids, max_new_tokens=8, do_sample=False)
    assert ours.shape == (1, 16)
    assert torch.equal(ours, theirs)


def test_tied_weights_are_one_tensor_after_loading(tiny_models: dict[str, Path]) -> None:
    model = hand_load(tiny_models["t5"], lambda s: every_block(s, "cpu"))
    shared = model.shared.weight
    assert model.encoder.embed_tokens.weight is shared
    assert model.decoder.embed_tokens.weight is shared


def test_non_persistent_buffers_go_to_the_execution_device(tiny_models: dict[str, Path]) -> None:
    model = hand_load(tiny_models["llama"], alternate)
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and not inv_freq.is_meta
    assert torch.equal(inv_freq, reference(tiny_models["llama"], "llama").model.rotary_emb.inv_freq)


def test_plan_is_recorded_on_the_model(tiny_models: dict[str, Path]) -> None:
    skeleton = build_skeleton(tiny_models["llama"])
    plan = hand_plan(skeleton, every_block(skeleton, "cpu"))
    model = place(skeleton, plan, read_index(skeleton.source), progress=False)
    assert model.devicemap_plan is plan
    assert not model.training


def test_progress_bar_reports_bytes_and_speed_per_device_on_stderr(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    skeleton = build_skeleton(tiny_models["llama"])
    plan = hand_plan(skeleton, alternate(skeleton))
    place(skeleton, plan, read_index(skeleton.source), offload_dir=tmp_path, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cpu" in captured.err and "disk" in captured.err and "GB/s" in captured.err
    skeleton = build_skeleton(tiny_models["llama"])
    place(
        skeleton,
        hand_plan(skeleton, alternate(skeleton)),
        read_index(skeleton.source),
        progress=False,
    )
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["as is", "converted"])
def test_progress_counts_every_byte_once_converted_disk_tensors_included(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    counted: dict[Any, int] = {}
    totals: dict[Any, int] = {}

    class Spy:
        def advance(self, device: Any, nbytes: int) -> None:
            counted[device] = counted.get(device, 0) + nbytes

    @contextlib.contextmanager
    def spy_bar(wanted: Any, enabled: bool) -> Any:
        totals.update(wanted)
        yield Spy()

    monkeypatch.setattr(load_module, "progress_bar", spy_bar)
    for _ in range(2):  # converting, then from the offload cache
        counted.clear()
        skeleton = build_skeleton(tiny_models["llama"], dtype=dtype)
        plan = hand_plan(skeleton, alternate(skeleton))
        place(skeleton, plan, read_index(skeleton.source), offload_dir=tmp_path, progress=True)
        assert counted == totals and totals[parse_device("disk")] > 0


# --- the public entry: load(path, ...) plans, loads, dispatches ---------------------------


@pytest.mark.parametrize("arch", sorted((*CAUSAL, "t5", "llava")))
def test_load_with_a_budget_matches_from_pretrained(
    tiny_models: dict[str, Path], arch: str
) -> None:
    path = tiny_models[arch]
    model = load(path, max_memory={"cpu": "1GiB"}, progress=False)
    assert set(model.devicemap_plan.device_map.values()) == {"cpu"}
    assert torch.equal(logits(model, arch), logits(reference(path, arch), arch))


def test_budget_that_holds_half_the_layers_puts_the_rest_on_disk(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models["llama"]
    options: dict[str, Any] = {"context": 64, "offload_exec": "cpu"}
    roomy = devicemap.plan(path, max_memory={"cpu": "1GiB", "disk": "1GiB"}, **options)
    layer = next(b.nbytes for b in build_skeleton(path).blocks if b.name == "model.layers.0")
    budget = roomy.usage("cpu").used - 2 * layer  # bytes: two of the four layers do not fit
    model = load(
        path,
        max_memory={"cpu": budget, "disk": "1GiB"},
        offload_dir=tmp_path,
        progress=False,
        **options,
    )
    placed = model.devicemap_plan.device_map
    on_disk = [k for k, v in placed.items() if k.startswith("model.layers.") and v == "disk"]
    assert len(on_disk) >= 2 and "cpu" in placed.values()
    assert torch.equal(logits(model, "llama"), logits(reference(path, "llama"), "llama"))


def test_pins_alternate_blocks_and_put_lm_head_on_disk(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models["phi3"]
    pins = {"model.layers.1": "disk", "model.layers.3": "disk", "lm_head": "disk"}
    model = pinned_load(path, pins, tmp_path)
    placed = model.devicemap_plan.device_map
    assert [placed[f"model.layers.{i}"] for i in range(4)] == ["cpu", "disk", "cpu", "disk"]
    assert placed["lm_head"] == "disk"
    spans = mapped_files()
    assert backing_file(model.lm_head.weight, spans) in {str(f) for f in path.glob("*.safetensors")}
    assert torch.equal(logits(model, "phi3"), logits(reference(path, "phi3"), "phi3"))


def test_bf16_plan_of_fp32_checkpoint_matches_from_pretrained_bf16(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models["llama"]
    pins = {"model.layers.0": "disk", "model.layers.2": "disk"}
    model = pinned_load(path, pins, tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = reference(path, "llama", torch.bfloat16)
    assert torch.equal(logits(model, "llama"), logits(expected, "llama"))
    ids = inputs("llama")["input_ids"]
    ours = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, expected.generate(ids, max_new_tokens=8, do_sample=False))


def test_saved_plan_loads_the_same_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = tiny_models["gpt2"]
    plan = devicemap.plan(
        path,
        max_memory={"cpu": "1GiB", "disk": "1GiB"},
        pins={"transformer.h.2": "disk"},
        context=64,
        offload_exec="cpu",
    )
    plan.save(tmp_path / "plan.json")
    model = load(path, Plan.load(tmp_path / "plan.json"), offload_dir=tmp_path, progress=False)
    assert model.devicemap_plan.device_map["transformer.h.2"] == "disk"
    assert torch.equal(logits(model, "gpt2"), logits(reference(path, "gpt2"), "gpt2"))


def test_checkpoint_without_base_model_prefix_loads(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    source = tiny_models["llama"]
    target = tmp_path / "bare"
    target.mkdir()
    shutil.copy(source / "config.json", target)
    tensors: dict[str, torch.Tensor] = {}
    for shard in source.glob("*.safetensors"):
        tensors.update(load_file(shard))
    bare = {
        k.removeprefix("model."): v for k, v in tensors.items()
    }  # "layers.0...", "lm_head.weight"
    save_file(bare, target / "model.safetensors", metadata={"format": "pt"})
    model = load(target, max_memory={"cpu": "1GiB"}, progress=False)
    assert torch.equal(logits(model, "llama"), logits(reference(source, "llama"), "llama"))


# --- bad input: a typed error naming the thing and the fix; nothing left half-done ----------


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_plan_for_another_model_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    llama_plan = devicemap.plan(tiny_models["llama"], max_memory={"cpu": "1GiB"})
    llama_plan.save(tmp_path / "llama.json")
    with pytest.raises(PlanMismatch, match="make a new plan"):
        load(tiny_models["mistral"], Plan.load(tmp_path / "llama.json"), progress=False)


def test_plan_naming_modules_the_model_lacks_is_refused(tiny_models: dict[str, Path]) -> None:
    skeleton = build_skeleton(tiny_models["llama"])
    mapping = every_block(skeleton, "cpu")
    mapping["model.layers.7"] = "cpu"  # a bigger llama's plan
    with pytest.raises(PlanMismatch, match=r"model\.layers\.7"):
        place(skeleton, hand_plan(skeleton, mapping), read_index(skeleton.source), progress=False)
    del mapping["model.layers.7"], mapping["lm_head"]
    with pytest.raises(PlanMismatch, match=r"lm_head\.weight"):
        place(skeleton, hand_plan(skeleton, mapping), read_index(skeleton.source), progress=False)


def test_missing_unexpected_and_misshapen_tensors_are_reported_together(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    path = copy_checkpoint(tiny_models["llama"], tmp_path / "broken")
    shards = {}
    for shard in sorted(path.glob("*.safetensors")):
        shards[shard] = load_file(shard)
    owner = {k: shard for shard, ts in shards.items() for k in ts}
    gone = ["model.layers.2.mlp.up_proj.weight", "model.norm.weight"]
    for key in gone:
        del shards[owner[key]][key]
    wide = "model.layers.1.self_attn.o_proj.weight"
    shards[owner[wide]][wide] = torch.zeros(64, 65)
    first = next(iter(shards))
    shards[first]["model.layers.9.extra.weight"] = torch.zeros(3)
    for shard, ts in shards.items():
        save_file(ts, shard, metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    for key in gone:
        del index["weight_map"][key]
    index["weight_map"]["model.layers.9.extra.weight"] = first.name
    (path / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(KeyMismatch) as caught:
        load(path, max_memory={"cpu": "1GiB"}, progress=False)
    message = str(caught.value)
    for key in [*gone, "model.layers.9.extra.weight"]:
        assert key in message
    assert f"{wide}: model [64, 64] vs checkpoint [64, 65]" in message
    assert "Fix:" in message


def test_unexpected_keys_transformers_ignores_are_no_error(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    path = copy_checkpoint(tiny_models["llama"], tmp_path / "old")
    shard = sorted(path.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints
    save_file(tensors, shard, metadata={"format": "pt"})
    model = load(path, max_memory={"cpu": "1GiB"}, progress=False)
    assert torch.equal(
        logits(model, "llama"), logits(reference(tiny_models["llama"], "llama"), "llama")
    )


def test_truncated_shard_fails_before_reading_any_tensor(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = copy_checkpoint(tiny_models["llama"], tmp_path / "cut")
    shard = sorted(path.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)

    def no_reads(fd: int, info: Any, *rest: Any) -> Any:
        raise AssertionError(f"read {info.name} from a truncated checkpoint")

    monkeypatch.setattr(reader, "_pread", no_reads)
    with pytest.raises(CorruptCheckpoint, match=shard.name):
        load(path, max_memory={"cpu": "1GiB"}, progress=False)


def test_unwritable_offload_dir_names_the_directory(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # experts converted to another dtype on disk need the cache
    skeleton = build_skeleton(tiny_models["mixtral"], dtype=torch.bfloat16)
    plan = hand_plan(skeleton, every_block(skeleton, "disk"))
    with pytest.raises(OffloadError) as caught:
        place(
            skeleton,
            plan,
            read_index(skeleton.source),
            offload_dir=blocker / "cache",
            progress=False,
        )
    assert str(blocker / "cache") in str(caught.value) and "offload_dir" in str(caught.value)
    assert all(p.is_meta for p in skeleton.model.parameters()), "a failed load keeps nothing"


def test_full_disk_leaves_no_cache_and_the_next_load_writes_a_whole_one(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, bf16 = tiny_models["qwen2_moe"], torch.bfloat16  # converted: the cache is needed
    written = []

    def full(f: Any, data: memoryview) -> None:
        if written:  # the second tensor finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(data))
        f.write(data)

    monkeypatch.setattr(cache_module, "_write_bytes", full)
    with pytest.raises(OffloadError) as caught:
        hand_load(path, lambda s: every_block(s, "disk"), dtype=bf16, offload_dir=tmp_path)
    assert str(tmp_path) in str(caught.value) and "It needs " in str(caught.value)
    assert list(tmp_path.iterdir()) == [], "the half-written temp file must be removed"

    monkeypatch.undo()
    model = hand_load(path, lambda s: every_block(s, "disk"), dtype=bf16, offload_dir=tmp_path)
    (cache,) = tmp_path.iterdir()
    assert torch.equal(
        logits(model, "qwen2_moe"), logits(reference(path, "qwen2_moe", bf16), "qwen2_moe")
    )

    with open(cache, "r+b") as f:  # a cache cut short (a crash, a full disk) is never reused
        f.truncate(cache.stat().st_size - 64)
    model = hand_load(path, lambda s: every_block(s, "disk"), dtype=bf16, offload_dir=tmp_path)
    assert torch.equal(
        logits(model, "qwen2_moe"), logits(reference(path, "qwen2_moe", bf16), "qwen2_moe")
    )


def test_default_offload_dir_is_under_devicemap_cache(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVICEMAP_CACHE", str(tmp_path))
    hand_load(tiny_models["llama"], lambda s: every_block(s, "disk"), dtype=torch.bfloat16)
    (cache,) = (tmp_path / "offload").iterdir()
    assert cache.suffix == ".safetensors"


def test_device_out_of_memory_names_device_sizes_and_a_plan_and_frees_everything(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    skeleton = build_skeleton(tiny_models["llama"])
    mapping = every_block(skeleton, "cpu")
    for name in ("model.layers.2", "model.layers.3", "model.norm", "lm_head"):
        mapping[name] = 0  # cuda:0, which this test pretends is full
    copy = load_module._copy

    def fake_gpu(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 144.00 KiB")
        return copy(tensor, device, dtype)

    monkeypatch.setattr(load_module, "_copy", fake_gpu)
    monkeypatch.setattr(load_module, "present", lambda device: True)  # a cuda:0 "exists"
    plan = hand_plan(skeleton, mapping)
    with pytest.raises(DeviceOutOfMemory) as caught:
        place(skeleton, plan, read_index(skeleton.source), progress=False)
    message = str(caught.value)
    needed = sum(b.nbytes for b in skeleton.blocks if mapping[b.name] == 0)  # bytes
    assert "cuda:0 ran out of memory while loading model.layers.2." in message
    assert f"the plan puts {format_size(needed)} of weights there" in message
    assert "max_memory=" in message and "'cuda:0'" in message
    assert all(p.is_meta for p in skeleton.model.parameters()), "a failed load keeps nothing"


def test_a_plan_for_devices_this_machine_lacks_fails_before_allocating(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A what-if plan (GPUs 6 and 7 that are not here) is refused with the devices named."""
    path = tiny_models["llama"]
    budgets = {6: "1GiB", 7: "1GiB", "cpu": "1GiB"}
    plan = devicemap.plan(path, max_memory=budgets, context=32, pins={"lm_head": 7})
    assert set(plan.device_map.values()) == {6, 7}
    plan.save(tmp_path / "elsewhere.json")
    skeleton = build_skeleton(path)
    with pytest.raises(DeviceNotPresent) as caught:
        load(skeleton, plan=devicemap.Plan.load(tmp_path / "elsewhere.json"), progress=False)
    message = str(caught.value)
    assert "uses cuda:6, cuda:7, which this machine does not have" in message
    assert "devicemap.plan(model, ...)" in message
    assert all(p.is_meta for p in skeleton.model.parameters()), "nothing was allocated"


def test_cpu_out_of_memory_beside_a_disk_tier_is_device_out_of_memory(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cpu-tier weights read into RAM (a disk tier exists): the CPU allocator's plain
    RuntimeError becomes DeviceOutOfMemory naming the cpu, and nothing stays loaded."""
    skeleton = build_skeleton(tiny_models["llama"])
    mapping = alternate(skeleton)
    plan = hand_plan(skeleton, mapping)
    victim = skeleton.model.model.layers[2].mlp.up_proj.weight  # layer 2: cpu
    assert mapping["model.layers.2"] == "cpu"
    empty = torch.empty

    def full_ram(*args: Any, **kwargs: Any) -> torch.Tensor:
        shape = args[0] if args and isinstance(args[0], tuple | torch.Size) else None
        if shape is not None and tuple(shape) == tuple(victim.shape) and "dtype" in kwargs:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ...")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", full_ram)
    with pytest.raises(DeviceOutOfMemory) as caught:
        place(skeleton, plan, read_index(skeleton.source), offload_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert "cpu ran out of memory while loading model.layers." in str(caught.value)
    assert "max_memory=" in str(caught.value)
    assert all(p.is_meta for p in skeleton.model.parameters()), "a failed load keeps nothing"


# --- memory: peak RSS while loading, measured in a fresh process -----------------------------

_RSS_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    import devicemap
    from devicemap.load.loader import load
    from devicemap.model.skeleton import build_skeleton

    path, where, offload, dtype = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    skeleton = build_skeleton(path, dtype=dtype)  # imports warm before measuring
    pins = {b.name: where for b in skeleton.blocks if b.nbytes > 1024}
    plan = devicemap.plan(skeleton, max_memory={"cpu": "8GiB", "disk": "8GiB"}, pins=pins,
                          context=64, offload_exec="cpu")

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # bytes
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
    before = status("VmRSS")
    model = load(skeleton, plan, offload_dir=offload, progress=False)
    nbytes = sum(p.nbytes for p in model.parameters())
    print(json.dumps({"before": before, "peak": status("VmHWM"), "model": nbytes}))
    """
)


@pytest.fixture(scope="module")
def mid_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 121 MB float32 llama (hidden 512, 8 layers) in 50 MB shards."""
    return make_tiny(
        "llama",
        tmp_path_factory.mktemp("mid") / "llama",
        shard_size="50MB",
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
    )


def peak_growth(path: Path, where: str, offload: Path, dtype: str) -> tuple[int, int]:
    """(peak RSS growth during load, model bytes), from a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(path), where, str(offload), dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    return numbers["peak"] - numbers["before"], numbers["model"]


def test_loading_to_disk_barely_grows_rss(mid_llama: Path, tmp_path: Path) -> None:
    growth, model = peak_growth(mid_llama, "disk", tmp_path, "float32")
    assert model > 100e6
    assert growth < 0.2 * model, (
        f"peak RSS grew {growth / 1e6:.0f} MB for a {model / 1e6:.0f} MB model"
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: converted on the way
def test_loading_to_cpu_grows_rss_by_the_model_not_twice(
    mid_llama: Path, tmp_path: Path, dtype: str
) -> None:
    growth, model = peak_growth(mid_llama, "cpu", tmp_path, dtype)
    assert 0.9 * model < growth < 1.3 * model, (
        f"peak RSS grew {growth / 1e6:.0f} MB for a {model / 1e6:.0f} MB model"
    )


def test_a_plan_and_planning_options_together_are_refused(tiny_models: dict[str, Path]) -> None:
    plan = devicemap.plan(tiny_models["llama"], max_memory={"cpu": "1GiB"})
    with pytest.raises(TypeError, match="max_memory"):
        load(tiny_models["llama"], plan, max_memory={"cpu": "2GiB"}, progress=False)


def test_a_skeleton_loads_once(tiny_models: dict[str, Path]) -> None:
    skeleton = build_skeleton(tiny_models["llama"])
    plan = devicemap.plan(skeleton, max_memory={"cpu": "1GiB"})
    model = load(skeleton, plan, progress=False)
    expected = logits(model, "llama")
    with pytest.raises(devicemap.errors.LoadError, match="build a new one"):
        load(skeleton, plan, progress=False)
    assert torch.equal(logits(model, "llama"), expected), "the refused load changed nothing"


def test_a_quantized_checkpoint_is_refused_by_name_not_a_key_mismatch(tmp_path: Path) -> None:
    from devicemap.errors import CheckpointError
    from tiny import make_tiny

    directory = make_tiny("llama", tmp_path / "gptq")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (directory / "config.json").write_text(json.dumps(config))
    planned = devicemap.plan(directory, max_memory={"cpu": "1GiB"})  # a what-if: it says so
    assert any(
        r.startswith("the checkpoint is gptq (quantization_config)") for r in planned.reasons
    )
    assert "the unquantized model" in planned.explain()
    with pytest.raises(CheckpointError, match=r"is a gptq checkpoint .* unquantized release"):
        load(directory, max_memory={"cpu": "1GiB"}, progress=False)
