"""What models are made of, beyond a stack of attention layers: one regression test per
class of model the skeleton, planner and loader once got wrong (issue 9).

Each builds a tiny model of a real transformers architecture, saves it as a sharded
checkpoint, and compares devicemap with transformers' own `from_pretrained` of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

import devicemap
from devicemap.model.config import max_positions
from devicemap.model.memory import attr_int
from devicemap.model.skeleton import build_skeleton
from devicemap.plan.place import kv_bytes

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 120, 33]])  # [B=1, T=8]
# a small decoder: 4 heads of 8, 2 KV heads
DECODER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def save(model: Any, directory: Path) -> Path:
    model.save_pretrained(directory, max_shard_size="100KB")
    return directory


def build(cls: type, config: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # std 1 embeddings: distinct logits per position
        model.get_input_embeddings().weight.normal_(0, 1)
    return model


def half_on_disk(path: Path, **options: Any) -> Any:
    """devicemap.load with about half the weights on disk, executing on the CPU."""
    skeleton = build_skeleton(path, dtype=options.pop("dtype", None))
    roomy = devicemap.plan(
        skeleton, max_memory={"cpu": "1GiB", "disk": "1GiB"}, context=64, offload_exec="cpu"
    )
    budget = roomy.usage("cpu").used - sum(b.nbytes for b in skeleton.blocks) // 2
    plan = devicemap.plan(
        skeleton, max_memory={"cpu": budget, "disk": "1GiB"}, context=64, offload_exec="cpu"
    )
    assert "disk" in plan.device_map.values()
    return devicemap.load(skeleton, plan=plan, progress=False, **options)


@torch.no_grad()
def logits(model: Any, **inputs: Any) -> torch.Tensor:
    return model(input_ids=IDS, **inputs, use_cache=False).logits  # type: ignore[no-any-return]


def assert_same(path: Path, cls: type, **inputs: Any) -> Any:
    """Half on disk: bit-equal logits and the same greedy tokens as from_pretrained."""
    expected = cls.from_pretrained(path).eval()
    model = half_on_disk(path)
    assert torch.equal(logits(model, **inputs), logits(expected, **inputs))
    want = expected.generate(IDS, max_new_tokens=4, do_sample=False, **inputs)
    assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False, **inputs), want)
    return model


# --- loose tensors: parameters and buffers right on a module that holds blocks ----------


def bart(directory: Path) -> Path:
    config = tf.BartConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    model = build(tf.BartForConditionalGeneration, config)
    with torch.no_grad():
        model.final_logits_bias.normal_()  # zeros in a fresh model: make it matter
    return save(model, directory)


def test_a_loose_parameter_goes_with_the_block_whose_output_it_meets(tmp_path: Path) -> None:
    path = bart(tmp_path / "bart")
    skeleton = build_skeleton(path)
    bias = next(b for b in skeleton.blocks if b.name == "final_logits_bias")
    assert bias.loose and bias.anchor == "lm_head" and bias.params == ("final_logits_bias",)
    names = [b.name for b in skeleton.blocks]
    assert names.index("final_logits_bias") == names.index("lm_head") + 1
    decoder = {"decoder_input_ids": IDS[:, :3]}
    model = assert_same(path, tf.BartForConditionalGeneration, **decoder)
    plan = model.devicemap_plan
    runs_on = plan.exec_map["lm_head"]
    assert plan.device_map["final_logits_bias"] == plan.exec_map["final_logits_bias"] == runs_on
    assert model.final_logits_bias.device == torch.device("cpu")
    assert any("final_logits_bias" in line and "lm_head" in line for line in plan.reasons)
    devicemap.release(model)


def test_a_loose_tensor_is_counted_where_it_is_kept_not_where_its_block_is_stored(
    tmp_path: Path,
) -> None:
    path = bart(tmp_path / "bart")
    skeleton = build_skeleton(path)
    pins = {"lm_head": "disk"}
    plan = devicemap.plan(
        skeleton, max_memory={"cpu": "1GiB", "disk": "1GiB"}, pins=pins, offload_exec="cpu"
    )
    assert plan.device_map["lm_head"] == "disk" and plan.device_map["final_logits_bias"] == "cpu"
    bias = next(b.nbytes for b in skeleton.blocks if b.name == "final_logits_bias")
    on_disk = sum(b.nbytes for b in skeleton.blocks if plan.device_map[b.name] == "disk")
    assert plan.usage("disk").weights == on_disk and bias > 0
    model = devicemap.load(skeleton, plan=plan, progress=False)
    expected = tf.BartForConditionalGeneration.from_pretrained(path).eval()
    decoder = {"decoder_input_ids": IDS[:, :3]}
    assert torch.equal(logits(model, **decoder), logits(expected, **decoder))
    devicemap.release(model)


def test_a_loose_non_persistent_buffer_is_placed_and_computed(tmp_path: Path) -> None:
    config = tf.GPTBigCodeConfig(vocab_size=128, n_embd=32, n_layer=3, n_head=2, n_positions=64)
    model = build(tf.GPTBigCodeForCausalLM, config)
    path = save(model, tmp_path / "bigcode")
    skeleton = build_skeleton(path)
    loose = [b for b in skeleton.blocks if b.loose]
    assert [b.name for b in loose] == ["transformer.bias"] and loose[0].params == ()
    assert_same(path, tf.GPTBigCodeForCausalLM)


# --- layers without attention heads: recurrent state, constant in the context ----------


def test_mamba_layers_hold_a_constant_state_and_no_kv(tmp_path: Path) -> None:
    config = tf.MambaConfig(
        vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=3, expand=2, conv_kernel=4
    )
    path = save(build(tf.MambaForCausalLM, config), tmp_path / "mamba")
    skeleton = build_skeleton(path)
    layers = [b for b in skeleton.blocks if b.no_split]
    inner = 2 * 32  # expand x hidden
    conv, ssm = inner * 4 * 4, inner * 8 * 4  # [inner, kernel] and [inner, state], fp32 bytes
    assert [(b.kv_bytes_per_token, b.state_bytes) for b in layers] == [(0, conv + ssm)] * 3
    short, long = (
        devicemap.plan(skeleton, max_memory={"cpu": "1GiB"}, context=c, batch=2) for c in (16, 256)
    )
    assert short.usage("cpu").kv_cache == long.usage("cpu").kv_cache == 3 * (conv + ssm) * 2
    assert_same(path, tf.MambaForCausalLM)


def test_rwkv_state_allocated_up_front_is_shared_among_its_layers(tmp_path: Path) -> None:
    config = tf.RwkvConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=3,
        attention_hidden_size=32,
        intermediate_size=64,
        context_length=64,
    )
    path = save(build(tf.RwkvForCausalLM, config), tmp_path / "rwkv")
    layers = [b for b in build_skeleton(path).blocks if b.no_split]
    assert all(b.kv_bytes_per_token == 0 and b.state_bytes > 0 for b in layers)
    assert sum(b.state_bytes for b in layers) == 5 * 32 * 3 * 4  # 5 states x hidden x layers, fp32
    assert_same(path, tf.RwkvForCausalLM)


def test_measured_kv_equals_heads_times_head_dim(tmp_path: Path) -> None:
    config = tf.LlamaConfig(
        **DECODER,
        num_hidden_layers=3,
    )
    path = save(build(tf.LlamaForCausalLM, config), tmp_path / "llama")
    layers = [b for b in build_skeleton(path, dtype=torch.bfloat16).blocks if b.no_split]
    assert {(b.kv_bytes_per_token, b.state_bytes) for b in layers} == {(2 * 2 * 8 * 2, 0)}
    assert kv_bytes(layers[0], 10, 3) == 2 * 2 * 8 * 2 * 10 * 3


# --- config attributes: lists, per-layer values, "unlimited" ---------------------------


def test_list_valued_and_unlimited_config_values() -> None:
    config = tf.Gemma3nTextConfig(intermediate_size=[64, 128, 96], num_hidden_layers=3)
    assert attr_int(config, "intermediate_size") == 128  # per-layer MLP widths: the widest
    assert tf.XLNetConfig().max_position_embeddings == -1
    assert max_positions(tf.XLNetConfig()) is None  # XLNet's -1: no limit, not a limit of -1


# --- construction: what the meta build and the checkpoint leave out ----------------------


def test_a_parameter_made_off_meta_is_still_loaded(tmp_path: Path) -> None:
    config = tf.DiffLlamaConfig(
        **DECODER,
        num_hidden_layers=2,
    )
    path = save(build(tf.DiffLlamaForCausalLM, config), tmp_path / "diffllama")
    skeleton = build_skeleton(path)  # its lambda parameters come from torch.normal(size=...)
    assert all(p.is_meta for p in skeleton.model.parameters())
    assert_same(path, tf.DiffLlamaForCausalLM)


def test_a_buffer_only_an_ancestor_initialises_is_right(tmp_path: Path) -> None:
    config = tf.FalconH1Config(
        **DECODER,
        num_hidden_layers=2,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_n_groups=1,
    )
    path = save(build(tf.FalconH1ForCausalLM, config), tmp_path / "falcon_h1")
    skeleton = build_skeleton(path)
    expected = tf.FalconH1ForCausalLM.from_pretrained(path)
    want = expected.model.layers[0].mamba.mup_vector
    assert torch.equal(skeleton.model.model.layers[0].mamba.mup_vector, want)
    assert_same(path, tf.FalconH1ForCausalLM)


def test_weights_the_model_regenerates_at_load_are_computed(tmp_path: Path) -> None:
    config = tf.MarianConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    path = save(build(tf.MarianMTModel, config), tmp_path / "marian")  # positions not saved
    model = assert_same(path, tf.MarianMTModel, decoder_input_ids=IDS[:, :3])
    positions = model.model.encoder.embed_positions.weight
    assert positions.abs().sum() > 0 and not positions.requires_grad  # as transformers makes it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameters_need_grad_as_from_pretrained_gives_them(tmp_path: Path, dtype: Any) -> None:
    path = bart(tmp_path / "bart")
    expected = tf.BartForConditionalGeneration.from_pretrained(path, dtype=dtype)
    model = half_on_disk(path, dtype=dtype)
    grads = {n: p.requires_grad for n, p in expected.named_parameters()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    devicemap.release(model)
