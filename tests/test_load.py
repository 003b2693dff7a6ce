"""devicemap.load: weights streamed from the checkpoint to where the plan puts them.

Every loaded model is compared with transformers' own `from_pretrained` of the same
checkpoint: logits bit for bit (same inputs, float32 and bfloat16) and greedy tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from devicemap import load as load_module
from devicemap.checkpoint import read_index
from devicemap.devices import parse_device
from devicemap.load import place
from devicemap.plan import DeviceUsage, Plan, PlanOptions
from devicemap.skeleton import Skeleton, build_skeleton
from tiny import CAUSAL, model_class

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


def disk_params(model: Any) -> dict[str, torch.Tensor]:
    plan = model.devicemap_plan
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        block = load_module._block_of(name, plan.device_map)
        if block is not None and plan.device_map[block] == "disk":
            out[name] = param
    return out


def mapped_files() -> list[tuple[int, int, str]]:
    """This process's file mappings: (start, end, path) from /proc/self/maps."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end, fields[5]))
    return spans


def backing_file(tensor: torch.Tensor, spans: list[tuple[int, int, str]]) -> str | None:
    ptr = tensor.data_ptr()
    return next((path for start, end, path in spans if start <= ptr < end), None)


# --- parity with transformers ----------------------------------------------------------


@pytest.mark.parametrize("arch", sorted((*CAUSAL, "t5", "llava")))
def test_every_arch_all_cpu_matches_from_pretrained(
    tiny_models: dict[str, Path], arch: str
) -> None:
    path = tiny_models[arch]
    model = hand_load(path, lambda s: every_block(s, "cpu"))
    assert torch.equal(logits(model, arch), logits(reference(path, arch), arch))
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())


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


def test_cpu_parameters_are_not_file_backed(tiny_models: dict[str, Path]) -> None:
    model = hand_load(tiny_models["llama"], lambda s: every_block(s, "cpu"))
    spans = mapped_files()
    assert all(backing_file(p, spans) is None for p in model.parameters())


def test_fused_experts_on_disk_come_from_one_cache_written_once(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_models["mixtral"]
    model = hand_load(path, lambda s: every_block(s, "disk"), offload_dir=tmp_path)
    (cache,) = tmp_path.iterdir()  # one file for every converted tensor
    assert cache.suffix == ".safetensors"
    spans = mapped_files()
    experts = model.model.layers[1].mlp.experts.gate_up_proj
    assert backing_file(experts, spans) == str(cache)
    norm = model.model.layers[1].input_layernorm.weight  # 1:1 key: straight from its shard
    assert backing_file(norm, spans) in {str(f) for f in path.glob("*.safetensors")}
    assert torch.equal(logits(model, "mixtral"), logits(reference(path, "mixtral"), "mixtral"))
    before = cache.stat()
    again = hand_load(path, lambda s: every_block(s, "disk"), offload_dir=tmp_path)
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert torch.equal(logits(again, "mixtral"), logits(model, "mixtral"))


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
