"""build_skeleton: blocks, order, sizes, ties and the memory model, on tiny and real configs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from devicemap.errors import ConfigError
from devicemap.model.skeleton import Skeleton, build_skeleton
from tiny import ARCHS, build_tiny, model_class, tiny_config

SHARED_CONFIGS = Path(__file__).parent / "data" / "configs"  # real models' config.json
_CACHE: dict[tuple[str, str], Skeleton] = {}


@pytest.fixture
def skeleton_of(tiny_models: dict[str, Path]) -> Any:
    """skeleton_of(arch, dtype) -> the skeleton of the saved tiny model, built once per session."""

    def get(arch: str, dtype: str = "float32") -> Skeleton:
        if (arch, dtype) not in _CACHE:
            _CACHE[arch, dtype] = build_skeleton(tiny_models[arch], dtype=dtype)
        return _CACHE[arch, dtype]

    return get


def unique_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each tensor once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def real_tiny(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    """The tiny model built on CPU the way from_pretrained builds it at `dtype`."""
    if dtype == torch.float32:
        return build_tiny(arch)  # type: ignore[no-any-return]
    cls = model_class(arch)
    cfg = tiny_config(arch)
    return (
        cls.from_config(cfg, dtype=dtype)
        if cls is tf.AutoModelForCausalLM
        else cls._from_config(cfg, dtype=dtype)
    )  # type: ignore[no-any-return]


def write_config(directory: Path, **fields: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


# --- blocks and sizes -----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_cover_state_dict_exactly_once(arch: str, skeleton_of: Any) -> None:
    skel = skeleton_of(arch)
    keys = [k for b in skel.blocks for k in b.params]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(build_tiny(arch).state_dict())
    assert len({b.name for b in skel.blocks}) == len(skel.blocks)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_sum_to_real_model_bytes(arch: str, dtype: torch.dtype, skeleton_of: Any) -> None:
    skel = skeleton_of(arch, str(dtype).removeprefix("torch."))
    assert skel.dtype == dtype
    assert sum(b.nbytes for b in skel.blocks) == unique_bytes(real_tiny(arch, dtype))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_split_blocks_are_the_outermost_no_split_modules(arch: str, skeleton_of: Any) -> None:
    real = build_tiny(arch)
    units = set(real._no_split_modules)
    expected = []
    for name, module in real.named_modules():
        inside = any(name.startswith(f"{e}.") for e in expected)
        if type(module).__name__ in units and not inside:
            expected.append(name)
    blocks = skeleton_of(arch).blocks
    # an MoE layer is cut around its routed experts: its pieces name it as their layer
    got = [b.name for b in blocks if b.no_split] + sorted({b.layer for b in blocks if b.layer})
    assert sorted(got) == sorted(expected)
    assert len(got) >= 4 if arch != "t5" else len(got) == 4


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_non_persistent_buffers_are_real_and_correct(arch: str, skeleton_of: Any) -> None:
    skel = skeleton_of(arch)
    real = dict(build_tiny(arch).named_non_persistent_buffers())
    mine = dict(skel.model.named_non_persistent_buffers())
    assert mine.keys() == real.keys() and real
    for name, value in real.items():
        assert mine[name].device.type == "cpu"
        torch.testing.assert_close(mine[name], value, rtol=0, atol=0)
    assert all(p.device.type == "meta" for p in skel.model.parameters())


# --- order ----------------------------------------------------------------------


def test_llama_order(skeleton_of: Any) -> None:
    skel = skeleton_of("llama")
    layers = [f"model.layers.{i}" for i in range(4)]
    expected = ["model.embed_tokens", "model.rotary_emb", *layers, "model.norm", "lm_head"]
    assert skel.order == "forward"
    assert [b.name for b in skel.blocks] == expected


def test_t5_runs_encoder_before_decoder(skeleton_of: Any) -> None:
    names = [b.name for b in skeleton_of("t5").blocks]
    assert skeleton_of("t5").order == "forward"
    enc = [i for i, n in enumerate(names) if n.startswith("encoder.")]
    dec = [i for i, n in enumerate(names) if n.startswith("decoder.")]
    assert max(enc) < min(dec)
    assert names.index("decoder.final_layer_norm") < names.index("lm_head")
    assert names[-1] == "shared"  # never called (the stacks use their tied copies): last


def test_llava_runs_vision_tower_before_language_layers(skeleton_of: Any) -> None:
    skel = skeleton_of("llava")
    names = [b.name for b in skel.blocks]
    assert skel.order == "forward"
    vision = [i for i, n in enumerate(names) if ".vision_tower." in n]
    text_layers = [i for i, n in enumerate(names) if ".language_model.layers." in n]
    assert vision and max(vision) < names.index("model.multi_modal_projector") < min(text_layers)
    assert names[-1] == "lm_head"


def test_forward_failure_falls_back_to_registration_order(
    skeleton_of: Any, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no forward on meta")

    monkeypatch.setattr("devicemap.model.trace._Run.forward", broken)
    skel = build_skeleton(tiny_models["t5"])
    registered = [n for n, _ in build_tiny("t5").named_children()]
    assert skel.order == "registration"
    assert [b.name.split(".")[0] for b in skel.blocks[:1]] == registered[:1]  # "shared" first


# --- ties and the output --------------------------------------------------------


def test_ties_from_transformers_mapping(skeleton_of: Any) -> None:
    assert skeleton_of("qwen2").tied == (("model.embed_tokens", "lm_head"),)
    assert skeleton_of("llama").tied == ()
    lm_head = next(b for b in skeleton_of("qwen2").blocks if b.name == "lm_head")
    assert lm_head.nbytes == 0  # counted in model.embed_tokens, which runs first


class TiedInInitLlama(tf.LlamaForCausalLM):
    """A model that ties a layer's norm to the final norm in __init__, outside any mapping."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model.norm.weight = self.model.layers[0].input_layernorm.weight


def test_tie_made_in_init_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the module transformers is now (its lazy module can be re-created after import)
    monkeypatch.setattr(
        sys.modules["transformers"], "TiedInInitLlama", TiedInInitLlama, raising=False
    )
    cfg = tiny_config("llama").to_dict() | {"architectures": ["TiedInInitLlama"]}
    skel = build_skeleton(write_config(tmp_path / "m", **cfg))
    assert skel.tied == (("model.layers.0", "model.norm"),)
    norm = next(b for b in skel.blocks if b.name == "model.norm")
    assert norm.nbytes == 0 and norm.params == ("model.norm.weight",)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_block_and_logits(arch: str, skeleton_of: Any) -> None:
    skel = skeleton_of(arch)
    vocab = tiny_config(arch).get_text_config(decoder=True).vocab_size
    assert skel.output_block == "lm_head"
    assert skel.logits_bytes_per_token == vocab * 4


# --- memory per token -----------------------------------------------------------


def test_llama_kv_bytes_per_layer(skeleton_of: Any) -> None:
    for block in skeleton_of("llama").blocks:
        expected = 2 * 2 * 16 * 4 if block.no_split else 0  # K,V x 2 kv heads x head_dim 16 x fp32
        assert (block.kv_bytes_per_token, block.kv_window) == (expected, None)
    layer = skeleton_of("llama", "bfloat16").blocks[2]
    assert layer.kv_bytes_per_token == 2 * 2 * 16 * 2  # cache at the plan dtype


def test_mistral_sliding_window(skeleton_of: Any) -> None:
    layers = [b for b in skeleton_of("mistral").blocks if b.no_split]
    assert {b.kv_window for b in layers} == {32}
    assert all(b.kv_bytes_per_token == 256 for b in layers)


def test_encoder_and_vision_blocks_cache_nothing(skeleton_of: Any) -> None:
    t5 = {b.name: b.kv_bytes_per_token for b in skeleton_of("t5").blocks}
    assert t5["encoder.block.0"] == 0
    assert t5["decoder.block.0"] == 2 * 2 * 4 * 16 * 4  # self + cross attention, 4 heads x d_kv 16
    llava = skeleton_of("llava").blocks
    assert all(b.kv_bytes_per_token == 0 for b in llava if ".vision_tower." in b.name)
    assert sum(b.kv_bytes_per_token for b in llava) == 4 * 256


def test_activation_workspace(skeleton_of: Any) -> None:
    blocks = {b.name: b.act_bytes_per_token for b in skeleton_of("llama").blocks}
    assert blocks["model.layers.0"] == (2 * 64 + 3 * 128) * 4  # MLP peak, fp32
    assert blocks["model.embed_tokens"] == blocks["lm_head"] == 64 * 4
    # an MoE layer's pieces each reserve the layer's peak
    mixtral = {b.name: b.act_bytes_per_token for b in skeleton_of("mixtral").blocks}
    assert mixtral["model.layers.0.mlp.experts"] == (2 * 64 + 3 * 2 * 128) * 4  # top-2 experts
    assert mixtral["model.layers.0.self_attn"] == mixtral["model.layers.0.mlp.experts"]
    qwen_moe = {b.name: b.act_bytes_per_token for b in skeleton_of("qwen2_moe").blocks}
    expected = (2 * 64 + 3 * (2 * 32 + 64)) * 4  # + shared expert
    assert qwen_moe["model.layers.0.mlp.experts"] == expected


# --- dtypes and keep-in-fp32 ----------------------------------------------------


def test_t5_keeps_wo_in_fp32_under_fp16_only(skeleton_of: Any) -> None:
    """transformers 5 keeps `_keep_in_fp32_modules` in fp32 when loading fp16, not bf16."""
    for dtype, wo_dtype in [("float16", torch.float32), ("bfloat16", torch.bfloat16)]:
        skel = skeleton_of("t5", dtype)
        params = dict(skel.model.named_parameters())
        wo = [n for n in params if ".wo." in n]
        assert wo and all(params[n].dtype == wo_dtype for n in wo)
        assert params["shared.weight"].dtype == getattr(torch, dtype)
    half = sum(b.nbytes for b in skeleton_of("t5", "float16").blocks)
    wo_numel = sum(p.numel() for n, p in build_tiny("t5").named_parameters() if ".wo." in n)
    assert half == unique_bytes(real_tiny("t5", torch.float16)) + 2 * wo_numel


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_dtype_names(name: Any, dtype: torch.dtype) -> None:
    skel = build_skeleton(SHARED_CONFIGS / "phi-3-mini-4k", dtype=name)
    assert skel.dtype == dtype
    assert all(p.dtype == dtype for p in skel.model.parameters())


def test_dtype_defaults_to_config() -> None:
    assert build_skeleton(SHARED_CONFIGS / "llava-1.5-7b").dtype == torch.float16


def test_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"'int3'.*bf16.*float32"):
        build_skeleton(SHARED_CONFIGS / "llama-3.1-8b", dtype="int3")


def test_fingerprint_ignores_dtype_and_path(tmp_path: Path) -> None:
    cfg = json.loads((SHARED_CONFIGS / "llama-3.1-8b" / "config.json").read_text())
    copy = build_skeleton(write_config(tmp_path / "copy", **cfg), dtype="fp16")
    original = build_skeleton(SHARED_CONFIGS / "llama-3.1-8b")
    other = build_skeleton(write_config(tmp_path / "other", **cfg | {"num_hidden_layers": 2}))
    assert copy.fingerprint == original.fingerprint != other.fingerprint


# --- config errors --------------------------------------------------------------


def test_config_without_architectures(tmp_path: Path) -> None:
    cfg = tiny_config("llama").to_dict()
    cfg.pop("architectures", None)
    directory = write_config(tmp_path / "m", **cfg)
    with pytest.raises(ConfigError, match=r'config\.json.*"architectures": \["LlamaForCausalLM"\]'):
        build_skeleton(directory)


def test_unknown_architecture(tmp_path: Path) -> None:
    cfg = tiny_config("llama").to_dict() | {"architectures": ["NoSuchModelForCausalLM"]}
    with pytest.raises(ConfigError, match="'NoSuchModelForCausalLM'"):
        build_skeleton(write_config(tmp_path / "m", **cfg))


# --- real-size configs ----------------------------------------------------------


def test_llama_3_70b() -> None:
    skel = build_skeleton(SHARED_CONFIGS / "llama-3-70b", dtype="bf16")
    assert sum(b.no_split for b in skel.blocks) == 80
    rope = 2 * 64 * 4  # inv_freq and original_inv_freq: 64 fp32 values each
    assert sum(b.nbytes for b in skel.blocks) == 70_553_706_496 * 2 + rope
    assert skel.blocks[2].kv_bytes_per_token == 2 * 8 * 128 * 2  # GQA: 8 kv heads
    assert (skel.output_block, skel.max_positions) == ("lm_head", 8192)


@pytest.mark.parametrize(
    ("name", "billions", "layers"),
    [
        ("mixtral-8x7b", 46.70, 32),
        ("qwen2.5-72b", 72.71, 80),
        ("phi-3-mini-4k", 3.82, 32),
        ("llama-3.1-8b", 8.03, 32),
        ("llava-1.5-7b", 7.06, 32 + 24 + 1),  # text layers + CLIP layers + CLIP embeddings
    ],
)
def test_real_configs_parameter_totals(name: str, billions: float, layers: int) -> None:
    skel = build_skeleton(SHARED_CONFIGS / name)
    params = sum(p.numel() for p in skel.model.parameters())
    assert abs(params / 1e9 - billions) < 0.005 + 1e-9
    layered = {b.layer for b in skel.blocks if b.layer}  # MoE layers, cut around their experts
    assert sum(b.no_split for b in skel.blocks) + len(layered) == layers
    assert skel.order == "forward"


def test_user_no_split_classes(tiny_models: dict[str, Path]) -> None:
    skel = build_skeleton(tiny_models["llama"], no_split=("LlamaRMSNorm", "LlamaMLP"))
    flags = {b.name: b.no_split for b in skel.blocks}
    assert flags["model.norm"] and flags["model.layers.0"]  # MLPs stay inside their layers
    assert not flags["lm_head"] and len(flags) == 8


@pytest.mark.parametrize("arch", ["mixtral", "llava"])
def test_trace_leaves_the_model_untouched(arch: str, skeleton_of: Any) -> None:
    """The order trace runs on a scratch copy: no hooks, no eager experts left behind."""
    skel = skeleton_of(arch)
    fresh = real_tiny(arch, torch.float32)
    assert skel.model.get_experts_implementation() == fresh.get_experts_implementation()
    for module in skel.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
