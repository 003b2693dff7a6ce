"""The memory model of one block, per token per sequence, from the model's config.

KV cache: K and V of every caching attention layer, at the plan dtype, with the layer
types (sliding, chunked, KV-less) that transformers' cache uses. Activations: the values
live at a layer's peak (attention or MLP phase, SDPA assumed). Logits: fp32 over the
vocabulary. The planner multiplies these rates by context, prefill and batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def logits_bytes_per_token(config: Any) -> int:
    """fp32 logits of one token over the (text) vocabulary; 0 when the config has none."""
    vocab = attr_int(config.get_text_config(decoder=True), "vocab_size") or 0
    return int(vocab * 4)


@dataclass(frozen=True)
class KVLayer:
    bytes_per_token: int  # K and V of one attention layer, per token per sequence
    window: int | None  # sliding window; None = whole context


def kv_layers(config: Any, dtype: torch.dtype) -> list[KVLayer]:
    """Per decoder layer index: KV bytes per token and window, as transformers' cache holds them.

    Layer types come from `get_layer_types_and_kwargs` (what DynamicCache uses): sliding and
    chunked layers keep a window; "dummy" layers (shared KV, MLP/MoE-only) and recurrent
    ones (Mamba, linear attention: a constant state, measured by trace.py) keep no K/V.
    Heads come from each layer's own config where the config is per-layer (Gemma 4).
    The fallback when no traced forward measured the cache.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    try:
        types, kwargs = get_layer_types_and_kwargs(text)
        layer_configs = list(text.per_layer_config)
    except Exception:  # no layer types this transformers can tell: no formula either
        return []
    layers = []
    for layer_type, layer_kwargs, cfg in zip(types, kwargs, layer_configs, strict=False):
        if layer_type in _NO_KV:
            layers.append(KVLayer(0, None))
        else:
            per_token = 2 * kv_heads(cfg) * head_dim(cfg) * dtype.itemsize  # K and V
            layers.append(KVLayer(per_token, layer_kwargs.get("sliding_window")))
    return layers


_NO_KV = frozenset({"dummy", "conv", "linear_attention", "mamba", "recurrent", "rwkv"})


def attr_int(cfg: Any, key: str) -> int | None:
    """An integer config attribute, or None: absent, per-layer (Gemma 4 raises on the global
    read), or not an int; a list of ints (Gemma-3n's per-layer MLP widths) gives its max."""
    try:
        value = getattr(cfg, key, None)
    except Exception:  # AmbiguousGlobalPerLayerAttributeError
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return int(max(value))
    return None


def kv_heads(cfg: Any) -> int:
    """Key/value heads of one attention layer (GQA configs have fewer than query heads); 0
    for a config without attention heads (Mamba, RWKV, a VQ-VAE)."""
    for key in ("num_key_value_heads", "num_attention_heads", "n_head", "num_heads"):
        value = attr_int(cfg, key)
        if value is not None and value > 0:
            return value
    return 0


def query_heads(cfg: Any) -> int:
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = attr_int(cfg, key)
        if value is not None and value > 0:
            return value
    return 0


def head_dim(cfg: Any) -> int:
    """Width of one attention head: `head_dim` / `d_kv`, else hidden size / query heads."""
    for key in ("head_dim", "d_kv"):
        value = attr_int(cfg, key)
        if value is not None and value > 0:
            return value
    heads = query_heads(cfg)
    return hidden_size(cfg) // heads if heads else 0


def hidden_size(cfg: Any) -> int:
    """Width of the residual stream (0 if the config does not say)."""
    for key in ("hidden_size", "n_embd", "d_model", "embed_dim", "dim"):
        value = attr_int(cfg, key)
        if value is not None:
            return value
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else None
    return hidden_size(text) if text is not None and text is not cfg else 0


def block_kv(module: torch.nn.Module, layers: list[KVLayer]) -> tuple[int, int | None]:
    """KV bytes per token of the caching attention layers in `module`, and their common window.

    A caching attention layer is the innermost module with a `layer_idx` that is a decoder
    (`is_decoder`, else `is_causal` not False): encoder and vision attention cache nothing.
    T5's cross-attention caches the encoder's K/V: counted per token like self-attention
    (exact when prompt and context are alike in length, an over-estimate otherwise).
    """
    found = [layers[i] for i in _caching_layer_indices(module) if 0 <= i < len(layers)]
    windows = {layer.window for layer in found if layer.bytes_per_token}
    window = windows.pop() if len(windows) == 1 else None  # mixed windows: whole context
    return sum(layer.bytes_per_token for layer in found), window


def _caching_layer_indices(module: torch.nn.Module) -> list[int]:
    indices = []
    for sub in module.modules():
        idx = getattr(sub, "layer_idx", None)
        if not isinstance(idx, int) or any(
            isinstance(getattr(m, "layer_idx", None), int) for m in list(sub.modules())[1:]
        ):
            continue
        decoder = getattr(sub, "is_decoder", None)
        if decoder if decoder is not None else getattr(sub, "is_causal", True) is not False:
            indices.append(idx)
    return indices


def act_bytes_per_token(cfg: Any, dtype: torch.dtype, *, layer: bool) -> int:
    """Activation workspace while a block runs, per token per sequence, at `dtype`.

    A `layer` (no-split unit) is a transformer layer (`layer_act_width`); every other block
    passes the residual stream through (embeddings, norms, LM head: logits are counted
    separately, `logits_bytes_per_token`).
    """
    width = layer_act_width(cfg) if layer else hidden_size(cfg)
    return width * dtype.itemsize


def layer_act_width(cfg: Any) -> int:
    """Values live per token at a transformer layer's peak: max of attention and MLP phases.

    Assumes SDPA/flash attention (no T x T score matrix). Attention phase: residual + normed
    input + q + k + v + attention output. MLP phase: residual + normed input + the gate, up
    and activated intermediates of each expert a token is routed to (`mlp_width`). A layer
    without attention heads (Mamba, RWKV, convolutions) has only the second.
    """
    hidden = hidden_size(cfg)
    q_width = query_heads(cfg) * head_dim(cfg)
    attention = 2 * hidden + 2 * q_width + 2 * kv_heads(cfg) * head_dim(cfg)
    return max(attention, 2 * hidden + 3 * mlp_width(cfg))


def mlp_width(cfg: Any) -> int:
    """Intermediate width a token passes through: dense MLP, or top-k experts + shared expert."""
    dense = next(
        (v for k in ("intermediate_size", "n_inner", "d_ff", "ffn_dim") if (v := attr_int(cfg, k))),
        4 * hidden_size(cfg),
    )
    top_k = attr_int(cfg, "num_experts_per_tok")
    if not top_k:
        return int(dense)
    expert = attr_int(cfg, "moe_intermediate_size") or dense
    shared = attr_int(cfg, "shared_expert_intermediate_size") or 0
    return int(top_k * expert + shared)
