"""Mixture-of-experts: each MoE layer cut into its dense part (attention, norms, router,
shared experts) and its routed experts, placed separately: dense parts and the KV cache on
the GPU first, then routed experts of as many layers as fit, the rest in RAM computed by
the CPU (issue 15). Planned from the real configs in tests/data/configs, for hardware this
machine does not have."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

import devicemap
from devicemap.devices import parse_device
from devicemap.errors import DoesNotFit, PinError
from devicemap.model.skeleton import build_skeleton
from devicemap.plan.planner import Plan, plan_from_json

CONFIGS = Path(__file__).parent / "data" / "configs"
GIB = 2**30


def experts_of(plan: Plan) -> dict[str, Any]:
    return {k: v for k, v in plan.device_map.items() if k.endswith(".experts")}


def attention_of(plan: Plan) -> dict[str, Any]:
    return {k: v for k, v in plan.device_map.items() if k.endswith(".self_attn")}


@pytest.fixture(scope="module")
def qwen3_30b() -> Any:
    return build_skeleton(CONFIGS / "qwen3-30b-a3b", dtype="bfloat16")


def test_an_moe_layer_is_cut_around_its_routed_experts(qwen3_30b: Any) -> None:
    layer = [b for b in qwen3_30b.blocks if b.layer == "model.layers.5"]
    assert [b.name.removeprefix("model.layers.5.") for b in layer] == [
        "input_layernorm",
        "self_attn",
        "post_attention_layernorm",
        "mlp.gate",
        "mlp.experts",
    ]
    experts = layer[-1]
    assert experts.experts and experts.nbytes == 128 * 3 * 2048 * 768 * 2  # 128 experts, bf16
    assert layer[1].kv_bytes_per_token == 2 * 4 * 128 * 2  # the KV is the attention's


def test_qwen3_30b_on_one_24gib_gpu_keeps_attention_there_and_splits_the_experts(
    qwen3_30b: Any,
) -> None:
    plan = devicemap.plan(qwen3_30b, max_memory={0: "24GiB", "cpu": "64GiB"})
    assert set(attention_of(plan).values()) == {0}  # every layer's attention, with its KV
    placed = list(experts_of(plan).values())
    assert 0 in placed and "cpu" in placed
    assert placed == sorted(placed, key=lambda d: d != 0)  # the first layers' experts on the GPU
    for name, device in experts_of(plan).items():  # computed where they are stored
        assert str(parse_device(plan.exec_map[name])) == ("cuda:0" if device == 0 else "cpu")
    assert plan.usage(0).staging == 0  # nothing is streamed to the GPU
    line = next(r for r in plan.reasons if r.startswith("routed experts"))
    assert "on cuda:0" in line and "on cpu" in line


def test_qwen3_235b_keeps_every_layers_attention_on_the_gpu() -> None:
    plan = devicemap.plan(
        CONFIGS / "qwen3-235b-a22b", max_memory={0: "24GiB", "cpu": "512GiB"}, dtype="bfloat16"
    )
    assert len(attention_of(plan)) == 94 and set(attention_of(plan).values()) == {0}
    assert "cpu" in experts_of(plan).values()


def test_deepseek_v3_plans_on_one_gpu_and_lots_of_ram() -> None:
    plan = devicemap.plan(
        CONFIGS / "deepseek-v3", max_memory={0: "24GiB", "cpu": "1536GiB"}, dtype="bfloat16"
    )
    assert len(experts_of(plan)) == 58  # layers 3-60 are MoE, 0-2 dense
    assert plan.usage(0).used <= 24 * GIB  # before: two whole-layer staging buffers, 43 GiB
    assert {plan.exec_map[k] for k, v in experts_of(plan).items() if v == "cpu"} == {"cpu"}


def test_mixtral_on_one_24gib_gpu_splits_its_experts() -> None:
    plan = devicemap.plan(
        CONFIGS / "mixtral-8x7b", max_memory={0: "24GiB", "cpu": "96GiB"}, dtype="bfloat16"
    )
    assert len(attention_of(plan)) == 32 and set(attention_of(plan).values()) == {0}
    placed = list(experts_of(plan).values())
    assert len(placed) == 32 and 0 in placed and "cpu" in placed


def test_the_device_map_has_no_overlapping_keys_and_round_trips(qwen3_30b: Any) -> None:
    plan = devicemap.plan(qwen3_30b, max_memory={0: "24GiB", "cpu": "64GiB"})
    keys = list(plan.device_map)
    assert not [a for a in keys for b in keys if a != b and b.startswith(a + ".")]
    again = plan_from_json(json.loads(json.dumps(plan.to_json())))
    assert again.device_map == plan.device_map and again.exec_map == plan.exec_map


def test_glob_pins_put_every_layers_experts_on_cpu(qwen3_30b: Any) -> None:
    plan = devicemap.plan(
        qwen3_30b,
        max_memory={0: "80GiB", "cpu": "64GiB"},
        pins={"model.layers.*.mlp.experts": "cpu"},
    )
    assert set(experts_of(plan).values()) == {"cpu"} and set(attention_of(plan).values()) == {0}
    with pytest.raises(PinError, match=r"did you mean 'model\.layers"):
        devicemap.plan(qwen3_30b, max_memory={0: "80GiB"}, pins={"model.layerz.*": "cpu"})


def test_experts_pinned_past_the_gpu_say_how_many_layers_fit(qwen3_30b: Any) -> None:
    budgets = {0: "24GiB", "cpu": "64GiB"}
    with pytest.raises(DoesNotFit) as caught:
        devicemap.plan(qwen3_30b, max_memory=budgets, pins={"model.layers.*.mlp.experts": 0})
    auto = devicemap.plan(qwen3_30b, max_memory=budgets)
    fit = sum(1 for v in experts_of(auto).values() if v == 0)
    assert 0 < fit < 48
    message = str(caught.value)
    assert f"the routed experts of {fit} layers (model.layers.0-{fit - 1}) fit on cuda:0" in message
    assert "not the 48 pinned there (model.layers.*.mlp.experts)" in caught.value.suggestions[0]


# --- tiny MoE models of every family: placed by expert, equal to transformers ------------


def tiny_moe(arch: str, directory: Path) -> Path:
    from sweep.tiny_configs import tiny_config

    cls = getattr(tf, MOE[arch])
    torch.manual_seed(0)
    model = cls(tiny_config(arch)).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1)  # spread routing over the experts
    model.save_pretrained(directory, max_shard_size="200KB")
    return directory


MOE = {
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "dbrx": "DbrxForCausalLM",
}
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 120, 33]])


def disk_plan(skeleton: Any, pins: dict[str, str]) -> Plan:
    """Roomy cpu and disk budgets, `pins`, offloaded blocks computed by the CPU."""
    return devicemap.plan(
        skeleton,
        max_memory={"cpu": "1GiB", "disk": "1GiB"},
        pins=pins,
        offload_exec="cpu",
        context=64,
    )


@pytest.mark.parametrize("arch", sorted(MOE))
def test_experts_on_disk_dense_in_ram_equal_transformers(arch: str, tmp_path: Path) -> None:
    path = tiny_moe(arch, tmp_path / arch)
    skeleton = build_skeleton(path)
    pins = {b.name: "disk" for b in skeleton.blocks if b.experts}
    if arch == "dbrx":  # its experts are not computed through the experts interface
        assert not pins and skeleton.whole_moe == ("DbrxExperts",)
        pins = {b.name: "disk" for b in skeleton.blocks if b.no_split}
    plan = disk_plan(skeleton, pins)
    on_disk = [k for k, v in plan.device_map.items() if v == "disk"]
    assert on_disk and all(k.endswith("experts") for k in on_disk) != (arch == "dbrx")
    expected = getattr(tf, MOE[arch]).from_pretrained(path).eval()
    with devicemap.releasing(devicemap.load(skeleton, plan=plan, progress=False)) as model:
        with torch.no_grad():
            ours, theirs = model(IDS).logits, expected(IDS).logits
        assert torch.equal(ours, theirs)
        greedy = {"max_new_tokens": 4, "do_sample": False}
        assert torch.equal(model.generate(IDS, **greedy), expected.generate(IDS, **greedy))


# --- experts kept as the checkpoint's own per-expert tensors ------------------------------


def experts_on_disk(arch: str, tmp_path: Path) -> tuple[Any, Path]:
    path = tiny_moe(arch, tmp_path / arch)
    skeleton = build_skeleton(path)
    plan = disk_plan(skeleton, {b.name: "disk" for b in skeleton.blocks if b.experts})
    offload = tmp_path / "offload"
    return devicemap.load(skeleton, plan=plan, offload_dir=offload, progress=False), offload


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_disk_experts_are_the_checkpoints_own_tensors_no_copy_written(
    arch: str, tmp_path: Path
) -> None:
    from devicemap.run.experts import EXPERTS_ATTR
    from devicemap.run.pages import file_mappings

    model, offload = experts_on_disk(arch, tmp_path)
    sources = [m.__dict__[EXPERTS_ATTR] for m in model.modules() if EXPERTS_ATTR in m.__dict__]
    assert sources and model.config._experts_implementation == "devicemap"
    assert not offload.exists() or not any(offload.rglob("*.safetensors"))  # 0 bytes written
    files = {str(f) for f in (tmp_path / arch).glob("*.safetensors")}
    spans = file_mappings() or []
    for tensor in sources[0].tensors(range(2)):
        address = tensor.data_ptr()
        assert any(s.start <= address < s.end and s.path in files for s in spans)
    experts = next(m for m in model.modules() if EXPERTS_ATTR in m.__dict__)
    assert all(p.is_meta for p in experts.parameters())  # no fused copy, not even in RAM
    devicemap.release(model)
    assert model.config._experts_implementation != "devicemap"  # its own again
    assert not any(EXPERTS_ATTR in m.__dict__ for m in model.modules())


def test_only_the_routed_experts_are_read(tmp_path: Path) -> None:
    from devicemap.run.experts import EXPERTS_ATTR

    model, _ = experts_on_disk("qwen3_moe", tmp_path)
    sources = [m.__dict__[EXPERTS_ATTR] for m in model.modules() if EXPERTS_ATTR in m.__dict__]
    routed: list[set[int]] = []

    def record(module: Any, args: Any, output: Any) -> None:
        routed.append(set(output[2].flatten().tolist()))  # the router's top-k expert ids

    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    handles = [g.register_forward_hook(record) for g in gates]
    with torch.no_grad():
        model(IDS[:, :1])  # one token: top-2 of 4 experts per layer
    for handle in handles:
        handle.remove()
    assert [s.touched for s in sources] == routed and all(len(r) <= 2 for r in routed)
    devicemap.release(model)


class _Recording:
    """libc, with the madvise calls recorded (and still made)."""

    def __init__(self, libc: Any):
        self.libc, self.calls = libc, []

    def madvise(self, start: int, length: int, advice: int) -> int:
        self.calls.append((start, length, advice))
        return int(self.libc.madvise(start, length, advice))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.libc, name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise")
def test_a_cold_layer_asks_for_exactly_the_routed_experts_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fault in a file mapping reads the kernel's read-around window (8 MiB on some disks)
    # around it; the selected experts are asked for first (MADV_WILLNEED reads exactly the
    # span given), so the faults find them cached and read no neighbour
    from devicemap.run import pages
    from devicemap.run.experts import EXPERTS_ATTR

    model, _ = experts_on_disk("qwen3_moe", tmp_path)
    sources = [m.__dict__[EXPERTS_ATTR] for m in model.modules() if EXPERTS_ATTR in m.__dict__]
    libc = _Recording(pages._LIBC)
    monkeypatch.setattr(pages, "_LIBC", libc)
    monkeypatch.setattr(pages, "any_missing", lambda *_: True)  # as if nothing were cached
    with torch.no_grad():
        model(IDS[:, :1])  # one token: 2 of the 4 experts of each layer
    asked = [(a, n) for a, n, advice in libc.calls if advice == pages.MADV_WILLNEED]
    chosen = [span for s in sources for e in sorted(s.touched) for span in s.pages(e).spans]
    assert sorted(asked) == sorted(chosen) and all(len(s.touched) == 2 for s in sources)
    populated = [(a, n) for a, n, advice in libc.calls if advice == pages.MADV_POPULATE_READ]
    assert sorted(populated) == sorted(chosen)  # and mapped in, the same spans
    devicemap.release(model)


def test_a_conversion_that_is_not_a_concatenation_keeps_the_fused_path() -> None:
    from devicemap.load.convert import Recipe
    from devicemap.load.experts import expert_pieces
    from devicemap.model.checkpoint import TensorInfo

    def info(name: str) -> TensorInfo:
        return TensorInfo(name, Path("x"), torch.float32, (2, 3), 0, 24)

    class Swapped:  # a converter whose output is not the inputs stacked in order
        source_patterns = ("experts.*.w.weight",)

        def add_tensor(self, layer: str, name: str, pattern: str, read: Any) -> None:
            self.read = [*getattr(self, "read", []), read]

        def convert(self, layer: str, **kwargs: Any) -> dict[str, torch.Tensor]:
            tensors = [read() for read in self.read]
            return {"m.experts.w": torch.stack(tensors[::-1])}

    names = [f"m.experts.{e}.w.weight" for e in range(2)]
    recipe = Recipe(
        ("m.experts.w",),
        ((2, 2, 3),),
        tuple(map(info, names)),
        ("experts.*.w.weight",) * 2,
        "m.experts.w",
        Swapped(),
    )
    assert expert_pieces(recipe, (2, 2, 3), torch.nn.Module()) is None
