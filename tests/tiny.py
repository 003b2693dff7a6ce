"""Tiny random models of many architectures, saved as real (sharded) safetensors checkpoints.

`make_tiny("llama", dir)` writes config.json + model-0000N-of-0000M.safetensors + the
index, exactly as `save_pretrained` does for a real model, with fixed random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as tf

ARCHS = ("llama", "qwen2", "mistral", "phi3", "gpt2", "mixtral", "qwen2_moe", "t5", "llava")
CAUSAL = ("llama", "qwen2", "mistral", "phi3", "gpt2", "mixtral", "qwen2_moe")

_DECODER = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A transformers config for a small, fast model of `arch`."""
    if arch == "llama":
        cfg = tf.LlamaConfig(**_DECODER, tie_word_embeddings=False)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**_DECODER, tie_word_embeddings=True)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**_DECODER, sliding_window=32)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**{**_DECODER, "num_key_value_heads": 4}, pad_token_id=0)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=512,
            bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **_DECODER,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        )
    elif arch == "t5":
        cfg = tf.T5Config(
            vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
        )  # fmt: skip
    elif arch == "llava":
        vision = tf.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=28, patch_size=14, projection_dim=32,
        )  # fmt: skip
        text = tf.LlamaConfig(**{**_DECODER, "vocab_size": 320})
        cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=300)
    else:
        raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(ARCHS)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def model_class(arch: str) -> type:
    if arch == "t5":
        return tf.T5ForConditionalGeneration
    if arch == "llava":
        return tf.LlavaForConditionalGeneration
    return tf.AutoModelForCausalLM  # type: ignore[no-any-return]


def build_tiny(arch: str, *, seed: int = 0, **overrides: Any) -> Any:
    """The random model itself (float32, eval mode), reproducible from `seed`."""
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    cls = model_class(arch)
    model = cls.from_config(cfg) if cls is tf.AutoModelForCausalLM else cls(cfg)
    return model.eval()


def make_tiny(
    arch: str,
    directory: str | Path,
    *,
    shard_size: str | int = "200KB",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Save a random `arch` model to `directory` as sharded safetensors; return the directory."""
    directory = Path(directory)
    model = build_tiny(arch, seed=seed, **overrides).to(dtype)
    model.save_pretrained(directory, max_shard_size=shard_size)
    return directory


def make_tiny_chat(
    directory: str | Path, tokenizer: Any, *, arch: str = "llama", seed: int = 0, **overrides: Any
) -> Path:
    """A tiny `arch` model sized to `tokenizer`'s vocabulary, saved together with the tokenizer
    (chat template included), so the model directory is all that `devicemap run` needs."""
    directory = make_tiny(arch, directory, seed=seed, vocab_size=len(tokenizer), **overrides)
    tokenizer.save_pretrained(directory)
    return directory


def greedy_reply(
    directory: str | Path,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int,
    raw: bool = False,
) -> str:
    """Plain transformers: from_pretrained(directory), its chat template (unless `raw`: the
    messages' text as is), greedy `generate`; the new text without special tokens."""
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    model = tf.AutoModelForCausalLM.from_pretrained(directory).eval()
    if raw:
        text = "\n".join(m["content"] for m in messages)
        ids = tokenizer(text, return_tensors="pt").input_ids
    else:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    eos = model.generation_config.eos_token_id
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=eos[0] if isinstance(eos, list) else eos,
    )
    return str(tokenizer.decode(out[0, ids.shape[-1] :], skip_special_tokens=True))
