"""The memory model of one block, per token per sequence, from the model's config.

KV cache: K and V of every caching attention layer, at the plan dtype, with the layer
types (sliding, chunked, KV-less) that transformers' cache uses. Activations: the values
live at a layer's peak (attention or MLP phase, SDPA assumed). Logits: fp32 over the
vocabulary. The planner multiplies these rates by context, prefill and batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
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


# --- vision towers and audio encoders: tokens per image / clip, from their configs -------


def image_tokens(vision: Any, top: Any, *, side: int = 0) -> int | None:
    """Patches a vision tower processes for one image (every crop or tile of it); 0 for a
    config that is no vision tower; None for one that does not say its image size (dynamic
    resolution: Qwen2-VL) unless `side` (pixels, from the processor's config) does."""
    patch = _side(attr_any(vision, "patch_size"))
    if not patch:
        return 0
    size = _side(attr_any(vision, "image_size")) or side
    if not size:
        return None
    return ((size // patch) ** 2 + 1) * crops(vision, top)  # + a class token


def crops(vision: Any, top: Any) -> int:
    """Crops one image becomes, where the config says: MiniCPM-V's slices (+ the whole image),
    LLaVA-NeXT's largest grid (+ the base image), Mllama's tiles; else 1."""
    if attr_any(top, "slice_mode") and (slices := attr_int(top, "max_slice_nums")):
        return slices + 1
    grid = attr_any(top, "image_grid_pinpoints")
    size = _side(attr_any(vision, "image_size"))
    if isinstance(grid, (list, tuple)) and grid and size:
        cells = [int(h) * int(w) for h, w in grid if isinstance(h, int) and isinstance(w, int)]
        return max(cells, default=0) // (size * size) + 1
    return attr_int(vision, "max_num_tiles") or 1


def audio_tokens(cfg: Any) -> int:
    """Frames an audio encoder processes for one clip (Whisper's 1500); 0 if not one."""
    if attr_int(cfg, "num_mel_bins") or "audio" in str(attr_any(cfg, "model_type")):
        return attr_int(cfg, "max_source_positions") or 0
    return 0


def attr_any(cfg: Any, key: str) -> Any:
    try:
        return getattr(cfg, key, None)
    except Exception:  # a per-layer attribute (Gemma 4)
        return None


def _side(value: Any) -> int:
    """An image or patch side: 336, or (448, 448) -> 448; 0 when not given."""
    if isinstance(value, (list, tuple)) and value:
        value = max(v for v in value if isinstance(v, int))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def largest_image_side(root: Path | None) -> int:
    """The largest image side a model's processor lets through (preprocessor_config.json:
    `max_pixels`, `size`), in pixels; 0 when it does not say."""
    if root is None:
        return 0
    try:
        data = json.loads((root / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(data, dict):
        return 0
    if isinstance(data.get("max_pixels"), int):
        return math.isqrt(data["max_pixels"])
    size = data.get("size")
    if isinstance(size, dict):
        sides = [v for k, v in size.items() if k in _SIDES and isinstance(v, int)]
        if "max_pixels" in size and isinstance(size["max_pixels"], int):
            sides.append(math.isqrt(size["max_pixels"]))
        return max(sides, default=0)
    return size if isinstance(size, int) else 0


_SIDES = ("longest_edge", "height", "width", "shortest_edge")
