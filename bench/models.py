"""Random-weight llamas of real shapes for benchmarks, saved once under the devicemap cache.

`smollm` is SmolLM2-135M's shape (30 layers, hidden 576, GQA 9/3, vocab 49152, tied);
`tinyllama` is TinyLlama-1.1B's (22 layers, hidden 2048, GQA 32/4, vocab 32000).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers as tf

SHAPES = {
    "smollm": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "tinyllama": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
    ),
}  # fmt: skip


def cache_root() -> Path:
    return Path(os.environ.get("DEVICEMAP_CACHE", Path.home() / ".cache" / "devicemap")) / "bench"


def bench_model(shape: str, dtype: torch.dtype) -> Path:
    """Directory of a saved random `shape` llama at `dtype` (sharded like a hub checkpoint)."""
    name = f"{shape}-{str(dtype).removeprefix('torch.')}"
    path = cache_root() / name
    if (path / "config.json").exists():
        return path
    cfg = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, bos_token_id=1,
                         eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    tmp = path.with_name(name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp, max_shard_size="500MB")
    tmp.rename(path)  # atomic: a half-written directory never has the final name
    return path


def decoder_layers(path: Path) -> int:
    return int(tf.AutoConfig.from_pretrained(path).num_hidden_layers)
