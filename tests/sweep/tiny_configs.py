"""Tiny configs for every model type transformers ships, from its default config.

`tiny_config("llama")` starts from `AutoConfig.for_model("llama")` (the released sizes)
and shrinks every size it knows in the config and each sub-config (text, vision, audio,
VQ-VAE...): width 64, 4 heads of 16, 2 KV heads, MLP 128, 4 experts (top 2), a 512-token
vocabulary (special token ids moved into it), small images (4x4 patches of 4 pixels), and
sliding windows / attention chunks of 4 tokens (shorter than the check's prompt, so they
matter).

Layers: 2, or one layer of each distinct kind (at most 4) where the config describes its
layers one by one (`layer_types`, `mlp_layer_types`, a hybrid pattern string, lists of
layer indices, per-layer overrides, KV-shared tail layers): a hybrid keeps its attention
layers next to its linear-attention / Mamba ones, a sliding-window model a full one.

Every config is built again from its shrunk fields (sub-configs first), so what a config
derives in `__post_init__` (head_dim, attention sizes, Mamba ranks, layer lists it computes
from a pattern...) is derived again from the tiny sizes, and the strict validators run.
Per-type fixes live in `OVERRIDES` (and `CONSTRUCT`, for defaults that do not build), each
with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any

VOCAB = 512
LAYERS = 2
MAX_LAYERS = 4  # a config with more distinct layer kinds keeps one layer of each value
WIDTH = 64
HEADS = 4
HEAD_DIM = 16
KV_HEADS = 2
MLP = 128
EXPERTS = 4
SLIDING = 4  # sliding-window attention span

_LAYER_KEYS = (
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
    "decoder_layers", "num_decoder_layers", "num_encoder_layers", "depth",
    "text_num_hidden_layers", "vision_num_hidden_layers", "num_blocks",
)  # fmt: skip
_WIDTH_KEYS = (
    "hidden_size", "d_model", "n_embd", "embed_dim", "dim", "model_dim", "hidden_dim",
    "word_embed_proj_dim", "projection_dim", "text_hidden_size", "vision_hidden_size",
    "output_hidden_size", "out_hidden_size", "projector_hidden_size", "mm_hidden_size",
    "encoder_hidden_size", "embedding_dim", "emb_dim", "lru_width", "backbone_hidden_size",
    "hidden_size_global", "projector_input_dim", "projector_output_dim",
)  # fmt: skip
_HEAD_KEYS = (
    "num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
    "decoder_attention_heads", "attention_heads", "index_n_heads",
)  # fmt: skip
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
_HEAD_DIM_KEYS = (
    "head_dim", "d_kv", "kv_channels", "attention_head_dim", "v_head_dim", "d_head",
    "dim_head", "attention_head_size", "swa_head_dim", "index_head_dim", "linear_head_dim",
    "linear_key_head_dim", "linear_value_head_dim",
)  # fmt: skip
_MLP_KEYS = (
    "intermediate_size", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner",
    "ffn_hidden_size", "mlp_dim", "inner_hidden_size", "d_inner", "dff", "dim_ff",
    "shared_intermediate_size", "feed_forward_size", "alignment_intermediate_size",
    "projection_intermediate_size",
)  # fmt: skip
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = (
    "num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "num_experts_per_token",
    "top_k_experts", "moe_k",
)  # fmt: skip
_EXPERT_MLP_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "expert_ffn_hidden_size")
_SHARED_MLP_KEYS = (
    "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", "share_expert_dim",
)  # fmt: skip
_LINEAR_HEAD_KEYS = ("linear_num_key_heads", "linear_num_value_heads", "linear_num_heads")
_STATE_KEYS = ("state_size", "ssm_state_size", "mamba_d_state")
# (heads, head dim, expansion) of a Mamba-2 mixer: heads * head_dim = expand * hidden_size
_MAMBA = (
    ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
    ("mamba_num_heads", "mamba_head_dim", "expand"),
    ("n_mamba_heads", "mamba_headdim", "mamba_expand"),
    ("num_heads", "head_dim", "expand"),
)
_RANK_KEYS = (("q_lora_rank", 32), ("kv_lora_rank", 16), ("o_lora_rank", 32))
_SEQ_KEYS = ("max_position_embeddings", "n_positions")
# values that keep their meaning whatever the layer count (not one entry per layer)
_NOT_PER_LAYER = ("mrope_section", "image_size", "patch_size", "architectures")
_WIDTHISH = ("_size", "_dim", "_width", "_channels", "_channel", "hidden")
_ID_SUFFIXES = ("_token_id", "_token_index", "_id", "_token_ids")


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A small config of `model_type` (every sub-config shrunk), `overrides` applied last."""
    from transformers import AutoConfig

    fixes = {**OVERRIDES.get(model_type, {}), **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoConfig.for_model(model_type, **CONSTRUCT.get(model_type, {}))
        moved: dict[int, int] = {}
        _collect_ids(base, moved, seen=set())
        widths: set[int] = set()
        _collect_widths(base, widths, seen=set())
        config = _rebuild(base, "", fixes, moved, widths)
    for key, value in fixes.items():  # again: a parent's __post_init__ may have overwritten them
        _set_path(config, key, value)
    if (
        getattr(config, "is_encoder_decoder", False)
        and config_get(config, "decoder_start_token_id") is None
    ):
        text = config.get_text_config(decoder=True)
        start = config_get(config, "pad_token_id", config_get(text, "pad_token_id")) or 0
        config.decoder_start_token_id = start  # generate needs one
    decoder = vars(config).get("decoder")
    start = config_get(config, "decoder_start_token_id")
    if (
        _is_config(decoder)
        and start is not None
        and config_get(decoder, "decoder_start_token_id") is None
    ):
        decoder.decoder_start_token_id = start  # the decoder alone (MusicgenForCausalLM) too
    _validate(config, seen=set())
    return config


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """An attribute a config may lack (transformers 5 declares only the fields a model uses)."""
    try:
        value = getattr(config, key)
    except AttributeError:
        return default
    return default if value is None else value


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def _validate(config: Any, seen: set[int]) -> None:
    """The strict validators now, so a bad tiny config fails here, not at save time."""
    if id(config) in seen:
        return
    seen.add(id(config))
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    for value in vars(config).values():
        if _is_config(value):
            _validate(value, seen)


# -- rebuilding -------------------------------------------------------------------------


def _rebuild(
    config: Any, path: str, fixes: dict[str, Any], moved: dict[int, int], widths: set[int]
) -> Any:
    """`config` built again from shrunk fields; its sub-configs first."""
    cls = type(config)
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    values = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    for alias, real in (getattr(cls, "attribute_map", None) or {}).items():
        if alias in fields and real in values and real not in fields:
            values[alias] = values.pop(real)  # a field stored under its alias (n_layers)
    derived = _derived(cls, fields, values)
    for key, value in values.items():
        if _is_config(value):
            values[key] = _rebuild(value, f"{path}{key}.", fixes, moved, widths)
    spec = vars(config).get("_heterogeneity_spec")
    per_layer = dict(spec.per_layer_overrides) if spec is not None else None
    mrope = "mrope_section" in (getattr(config, "ignore_keys_at_rope_validation", None) or ())
    ours = {k[len(path) :]: v for k, v in fixes.items() if k.startswith(path)}
    ours = {k: v for k, v in ours.items() if "." not in k}

    def arguments() -> dict[str, Any]:
        left = set(derived)  # _shrink takes out those it sets
        kwargs = _shrink(values, left, per_layer, widths, mrope)
        kwargs = {k: v for k, v in kwargs.items() if k not in left}
        _move_ids(kwargs, moved)
        return {**kwargs, **ours}

    kwargs = arguments()
    try:
        probe = cls(**kwargs)
    except Exception:  # the second try below says why
        probe = None
    if probe is not None:
        # "derived" fields the tiny sizes did not change (a constant default, or a value a
        # parent passed in): not derived after all, shrink them as given
        constant = {k for k in derived if k in fields and _same(vars(probe).get(k), values[k])}
        if not constant:
            return probe
        derived -= constant
        kwargs = arguments()
    try:
        return cls(**kwargs)
    except Exception as error:
        error.add_note(f"building the tiny {cls.__name__} ({path or 'top level'})")
        raise


def _same(new: Any, old: Any) -> bool:
    """`new` is None or equals `old` (tuples and lists alike)."""
    if new is None:
        return True
    if isinstance(new, (list, tuple)) and isinstance(old, (list, tuple)):
        return list(new) == list(old)
    try:
        return bool(new == old)
    except Exception:  # tensors and the like: not the same
        return False


def _derived(cls: type, fields: dict[str, Any], values: dict[str, Any]) -> set[str]:
    """Names whose value `__post_init__` computes (left out, so it computes them again): fields
    that default to None (or a placeholder string like "auto") but hold a value, and
    attributes that are no field but that a default instance also has."""
    out = set()
    for name, field in fields.items():
        value = values.get(name)
        if value is None or _is_config(value) or name.endswith(_ID_SUFFIXES):
            continue
        if name in ("rope_parameters", "layer_types") or name.endswith("_config"):
            continue
        default = field.default
        if default is dataclasses.MISSING:
            continue
        if default is None or (isinstance(default, str) and not isinstance(value, str)):
            out.add(name)
    try:
        fresh = vars(cls())
    except Exception:  # a default that does not build: keep every extra
        fresh = {}
    out.update(k for k in values if k not in fields and k in fresh and not _is_config(values[k]))
    return out


# -- shrinking one config ---------------------------------------------------------------


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(_int(x) for x in value)


def _shrink(
    values: dict[str, Any],
    derived: set[str],
    per_layer: dict | None,
    widths: set[int],
    mrope: bool = False,
) -> dict[str, Any]:
    """`values` shrunk. The derived ones a rule here sets leave `derived` (they are passed to
    the constructor); the rest of `derived` is left for `__post_init__` to compute."""
    d = {k: v if _is_config(v) else copy.deepcopy(v) for k, v in values.items()}
    explicit: set[str] = set()  # derived names a rule sets anyway

    def put(key: str, value: Any) -> None:
        d[key] = value
        explicit.add(key)

    def fit(keys: tuple[str, ...], value: int) -> None:
        """Ints over `value` (and lists of them) set to `value`."""
        for key in keys:
            if key in derived:
                continue
            current = d.get(key)
            if _int(current) and current > value:
                d[key] = value
            elif _ints(current):
                d[key] = type(current)(min(x, value) for x in current)

    orig = values
    hidden0 = next((orig[k] for k in _WIDTH_KEYS if _int(orig.get(k))), None)
    heads0 = next((orig[k] for k in _HEAD_KEYS if _int(orig.get(k))), None)
    head_dim0 = orig.get("head_dim") if _int(orig.get("head_dim")) else None
    if head_dim0 is None and hidden0 and heads0:
        head_dim0 = hidden0 // heads0

    _shrink_layers(d, put, per_layer)
    fit(_WIDTH_KEYS, WIDTH)
    for key in (*_WIDTH_KEYS, "hidden_sizes"):
        if _ints(d.get(key)) and key not in derived:  # per-stage widths: keep their ratios
            d[key] = type(orig[key])(_scaled_list(orig[key], WIDTH))
    fit(_HEAD_KEYS, HEADS)
    for key in _KV_KEYS:
        if key in derived or not _int(orig.get(key)):
            continue
        if heads0 is not None and orig[key] == heads0:
            d[key] = d.get("num_attention_heads", HEADS)  # plain multi-head: stays so
        elif orig[key] > KV_HEADS:
            d[key] = KV_HEADS
    fit(_HEAD_DIM_KEYS, HEAD_DIM)
    fit(_MLP_KEYS, MLP)
    fit(_EXPERT_KEYS, EXPERTS)
    fit(_TOPK_KEYS, 2)
    fit(_EXPERT_MLP_KEYS, 32)
    fit(_SHARED_MLP_KEYS, 64)
    fit(_LINEAR_HEAD_KEYS, HEADS)
    fit(_STATE_KEYS, 16)
    fit(("n_shared_experts", "num_shared_experts"), 1)
    fit(("n_group", "topk_group", "num_expert_group"), 1)
    fit(("first_k_dense_replace", "num_dense_layers"), 1)
    fit(("zero_expert_num",), 2)
    fit(("num_query_tokens", "latent_query_num"), 4)  # Q-Former / resampler outputs
    fit(("mm_tokens_per_image",), 4)  # Gemma 3 pools the 4x4 patches of a tiny image to 2x2
    fit(("resampler_n_latents",), 4)  # Idefics2's perceiver
    if d.get("image_grid_pinpoints") and "image_grid_pinpoints" not in derived:
        d["image_grid_pinpoints"] = [[16, 16], [16, 32], [32, 16]]  # LLaVA-NeXT tiles of 16px
    fit(("canvas_length",), 4)  # block diffusion
    if "head_dim" in d and d["head_dim"] is None and _int(d.get("hidden_size")):
        heads = d.get("num_attention_heads")
        if _int(heads) and heads > 0:  # a default the model cannot use (head_dim ** -0.5)
            d["head_dim"] = d["hidden_size"] // heads
    if any(_int(d.get(k)) and d[k] > 1 for k in _EXPERT_KEYS):  # MoE whose top-k is None
        for key in _TOPK_KEYS:
            if key in d and d[key] is None:
                d[key] = 2
    if d.get("num_key_value_heads", 0) is None and _int(d.get("num_attention_heads")):
        d["num_key_value_heads"] = d["num_attention_heads"]  # None means multi-head, spelled out
    fit(_SEQ_KEYS, 512)
    # sliding windows shorter than the test's 8-token prompt, so they matter
    fit(("sliding_window", "sliding_window_size", "attention_window_size"), SLIDING)
    fit(("attention_chunk_size",), SLIDING)  # Llama 4's chunked attention
    fit(("local_attention",), 2 * SLIDING)  # ModernBERT: a window of local_attention / 2
    for key in list(d):
        vocab = "vocab_size" in key or key.endswith("_vocab")
        if vocab and _int(d[key]) and d[key] > VOCAB and key not in derived:
            d[key] = VOCAB
    fit(("hidden_size_per_layer_input",), 16)
    _shrink_mla(d, derived, orig)
    _shrink_mamba(d, derived, put)
    _shrink_rotary(d, derived, head_dim0, orig.get("qk_rope_head_dim"), mrope)
    _shrink_images(d, derived)
    fit(("max_img_size", "max_image_size"), 64)  # sizes of position tables
    fit(("min_image_size",), 16)
    fit(("max_vit_seq_len", "img_max_token_num"), 256)
    fit(("downsample_hidden_size",), 32)  # audio conv stems
    fit(("base_channels",), 32)  # VQ-GAN encoders (GroupNorm of 32 groups)
    fit(("num_res_blocks",), 1)
    fit(("num_filters",), 4)  # audio codec encoders double it at each downsampling stage
    if _ints(d.get("conv_dim")) and "conv_dim" not in derived:  # wav2vec2-style feature convs
        d["conv_dim"] = type(d["conv_dim"])(_scaled_list(d["conv_dim"], 32))
    fit(("num_conv_pos_embeddings",), 16)
    if _ints(d.get("depths")) and "depths" not in derived:
        d["depths"] = type(d["depths"])([1] * len(d["depths"]))  # blocks per stage
    fit(("num_embeddings", "codebook_size"), 64)  # VQ codebooks
    fit(("output_channels",), 32)  # SAM necks
    if _ints(d.get("downsample_channels")):
        channels = d["downsample_channels"]
        d["downsample_channels"] = type(channels)(_scaled_list(channels, WIDTH))
    for key in d:
        if "feature_layer" in key and (_int(d[key]) or _ints(d[key])):
            put(key, _feature_layers(d[key]))
    if per_layer is not None:
        d["per_layer_config"] = _shrink_overrides(d.pop("per_layer_config", per_layer), orig, d)
        explicit.add("per_layer_config")
    for key, value in d.items():  # other widths: a size equal to a width somewhere
        if key in derived or not _int(value) or value <= WIDTH or value not in widths:
            continue
        named = key.endswith(_WIDTHISH) and not key.startswith(("num_", "max_"))
        other = any(word in key for word in ("vocab", "image", "patch", "kernel", "window"))
        if named and not other and value == orig[key]:
            d[key] = WIDTH
    derived -= explicit
    return d


def _feature_layers(value: int | list[int]) -> int | list[int]:
    """Vision layers a VLM takes features from (-2, [24, 18], [-2, -5, -8, -11]) as indices
    into a LAYERS-layer tower, their order kept: [24, 18] -> [1, 0]."""
    values = [value] if _int(value) else list(value)
    ahead = sorted({v for v in values if v >= 0}, reverse=True)
    behind = sorted({v for v in values if v < 0}, reverse=True)
    mapped = {v: max(0, LAYERS - 1 - n) for n, v in enumerate(ahead)}
    mapped |= {v: v if v >= -LAYERS else -min(LAYERS, n + 1) for n, v in enumerate(behind)}
    out = [mapped[v] for v in values]
    return out[0] if _int(value) else out


def _scaled_list(values: list[int], top: int) -> list[int]:
    """[128, 256, 512, 1024] -> [8, 16, 32, 64]: the largest becomes `top`, ratios kept."""
    largest = max(values)
    return [max(1, x * top // largest) for x in values]


def _shrink_layers(d: dict[str, Any], put: Any, per_layer: dict | None) -> None:
    """Keep one layer of each kind (see the module docstring); every per-layer value cut to
    the layers kept."""
    count = next((d[k] for k in _LAYER_KEYS if _int(d.get(k))), None)
    if count is None:
        return
    columns: dict[str, list[Any]] = {}
    for key, value in d.items():
        if key in _NOT_PER_LAYER or key.endswith(_ID_SUFFIXES):
            continue
        if _is_index_list(key, value, count):
            columns[key] = [i in set(value) for i in range(count)]
        elif isinstance(value, (list, tuple)) and len(value) == count and count > LAYERS:
            columns[key] = [repr(x) for x in value]
        elif isinstance(value, str) and len(value) == count > LAYERS and "pattern" in key:
            columns[key] = list(value)
    periods = [k[: -len("period")] for k in d if k.endswith("layer_period") and _int(d[k])]
    periods = [p for p in periods if _int(d.get(p + "offset")) and d[p + "period"] > 0]
    for p in periods:  # Jamba: attention where i % attn_layer_period == attn_layer_offset
        period, offset = d[p + "period"], d[p + "offset"]
        columns[p + "period"] = [i % period == offset for i in range(count)]
    shared = d.get("num_kv_shared_layers")
    if _int(shared) and 0 < shared <= count:
        columns["num_kv_shared_layers"] = [i >= count - shared for i in range(count)]
    if per_layer:
        # the kind of a layer: which values it overrides (not the values: Dots 3's vision
        # tower has a different expert count in each layer)
        columns["per_layer_config"] = [repr(sorted(per_layer.get(i, {}))) for i in range(count)]
    keep = _choose_layers(list(columns.values()), count)
    new = len(keep)
    for key in _LAYER_KEYS:
        value = d.get(key)
        if _int(value) and value == count:
            d[key] = new
        elif _int(value) and value > LAYERS:
            d[key] = LAYERS
    for key in columns:
        value = d[key] if key != "per_layer_config" else None
        if key == "num_kv_shared_layers":
            d[key] = sum(1 for i in keep if i >= count - shared)
        elif key.endswith("layer_period"):
            flags = [columns[key][i] for i in keep]
            period, offset = _period_for(flags, d[key], d[key[: -len("period")] + "offset"])
            d[key], d[key[: -len("period")] + "offset"] = period, offset
        elif key == "per_layer_config":
            d[key] = {n: per_layer[i] for n, i in enumerate(keep) if i in per_layer}  # type: ignore[index]
        elif isinstance(value, str):
            put(key, "".join(value[i] for i in keep))
        elif _is_index_list(key, value, count):
            put(key, [n for n, i in enumerate(keep) if i in set(value)])
        else:
            put(key, type(value)(value[i] for i in keep))


def _period_for(flags: list[bool], period: int, offset: int) -> tuple[int, int]:
    """The (period, offset) giving `flags` (True at i % period == offset), else the old."""
    for p in range(1, len(flags) + 1):
        for o in range(p):
            if all(flag == (i % p == o) for i, flag in enumerate(flags)):
                return p, o
    return period, offset


def _is_index_list(key: str, value: Any, count: int) -> bool:
    """A list of layer indices (`mlp_only_layers`, `fullatt_block_indexes`, ...)."""
    if not isinstance(value, (list, tuple)) or not all(_int(x) for x in value):
        return False
    if len(value) > count or list(value) != sorted(set(value)):
        return False
    if not any(word in key for word in ("layer", "block", "attn")):
        return False
    return all(0 <= x < count for x in value) and "feature" not in key


def _choose_layers(columns: list[list[Any]], count: int) -> list[int]:
    """One layer of each distinct combination of the per-layer kinds (strings, flags), in
    order; if there are more than MAX_LAYERS, one of each value of each column. Then one
    layer of each value of the numeric columns not covered yet; at least LAYERS layers."""
    kinds = [c for c in columns if not all(_is_number(x) for x in c)]
    numbers = [c for c in columns if c not in kinds and len(set(c)) <= MAX_LAYERS]
    chosen: set[int] = set()
    if kinds:
        first: dict[tuple, int] = {}
        for i in range(count):
            first.setdefault(tuple(c[i] for c in kinds), i)
        few = len(first) <= MAX_LAYERS
        chosen = set(first.values()) if few else _cover(kinds, count, set())
    chosen = _cover(kinds + numbers, count, chosen)
    for i in range(count):
        if len(chosen) >= LAYERS:
            break
        chosen.add(i)
    return sorted(chosen)


def _cover(columns: list[list[Any]], count: int, chosen: set[int]) -> set[int]:
    """`chosen` and more layers until every value of every column is in one (greedy)."""
    chosen = set(chosen)
    need = {(n, c[i]) for n, c in enumerate(columns) for i in range(count)}
    need -= {(n, c[i]) for n, c in enumerate(columns) for i in chosen}
    while need:
        gain = [sum((n, c[i]) in need for n, c in enumerate(columns)) for i in range(count)]
        best = max(range(count), key=lambda i: (gain[i], -i))
        chosen.add(best)
        need -= {(n, c[best]) for n, c in enumerate(columns)}
    return chosen


def _is_number(value: Any) -> bool:
    """A per-layer number (as its repr): a sparsity, a multiplier, a width."""
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return value not in ("True", "False")


def _shrink_overrides(per_layer: dict, orig: dict[str, Any], d: dict[str, Any]) -> dict:
    """Per-layer overrides (Gemma 4's wider full-attention heads) scaled as the global value
    was: head_dim 512 where the global 256 became 16 -> 32."""
    out = {}
    for layer, overrides in per_layer.items():
        new = {}
        for key, value in overrides.items():
            before, after = orig.get(key), d.get(key)
            if _int(value) and _int(before) and _int(after) and before:
                least = 2 if key in _EXPERT_KEYS else 1  # at least the top-k
                value = max(least, value * after // before)
            new[key] = value
        out[layer] = new
    return out


def _shrink_mla(d: dict[str, Any], derived: set[str], orig: dict[str, Any]) -> None:
    """Multi-head latent attention (DeepSeek-V2/V3): small ranks and head parts; a head_dim
    that was the rotary part stays it."""
    for key, value in (*_RANK_KEYS, ("qk_rope_head_dim", 8), ("qk_nope_head_dim", 8)):
        if _int(d.get(key)) and d[key] > value and key not in derived:
            d[key] = value
    if _int(d.get("qk_rope_head_dim")) and _int(d.get("qk_nope_head_dim")):
        if "qk_head_dim" in d and "qk_head_dim" not in derived:
            d["qk_head_dim"] = d["qk_rope_head_dim"] + d["qk_nope_head_dim"]
        if "head_dim" not in derived and orig.get("head_dim") == orig["qk_rope_head_dim"]:
            d["head_dim"] = d["qk_rope_head_dim"]


def _shrink_mamba(d: dict[str, Any], derived: set[str], put: Any) -> None:
    """Mamba-2 mixers: heads * head_dim must stay expand * hidden_size."""
    if not any(k in d for k in _STATE_KEYS):
        return
    hidden = d.get("hidden_size")
    for heads, head_dim, expand in _MAMBA:
        if heads not in d or not _int(hidden):
            continue
        factor = d.get(expand) if _int(d.get(expand)) else 2
        inner = factor * hidden
        size = d.get(head_dim) if _int(d.get(head_dim)) and head_dim not in derived else None
        size = min(size or HEAD_DIM, HEAD_DIM)
        if head_dim in d and head_dim not in derived:
            d[head_dim] = size
        put(heads, max(1, inner // size))
        if _int(d.get("mamba_d_ssm")):
            d["mamba_d_ssm"] = inner
        break
    for key in ("n_groups", "mamba_n_groups", "mamba_ngroups"):
        if _int(d.get(key)) and d[key] > 2:
            d[key] = 2
    if _int(d.get("mamba_dt_rank")) and "mamba_dt_rank" not in derived:
        d["mamba_dt_rank"] = max(1, math.ceil(d.get("hidden_size", WIDTH) / 16))
    for key in ("time_step_rank",):
        if _int(d.get(key)) and d[key] > 8:
            d[key] = 8


def _shrink_rotary(
    d: dict[str, Any], derived: set[str], head_dim0: int | None, rope0: int | None, mrope: bool
) -> None:
    """Rotary parts of a head scaled with the head (with the rotary part of an MLA head):
    rotary_dim, mrope_section. A multimodal-RoPE config (`mrope`) without mrope_section gets
    one (the model's default, [16, 24, 24] and the like, fits the released head only)."""
    head_dim = d.get("head_dim") if _int(d.get("head_dim")) else HEAD_DIM
    if _int(rope0) and _int(d.get("qk_rope_head_dim")):
        head_dim0, head_dim = rope0, d["qk_rope_head_dim"]
    if not head_dim0 or head_dim0 <= head_dim:
        return
    for key in ("rotary_dim", "rotary_emb_dim", "rope_dim"):
        if _int(d.get(key)) and key not in derived and d[key] > head_dim:
            d[key] = max(2, d[key] * head_dim // head_dim0 // 2 * 2)
    rope = d.get("rope_parameters")
    if mrope and isinstance(rope, dict) and "rope_type" in rope and "mrope_section" not in rope:
        rotary = head_dim * (rope.get("partial_rotary_factor") or 1.0)
        rope["mrope_section"] = _apportion([3, 3, 2], max(3, int(rotary) // 2))
        return
    for params in [rope, *(rope.values() if isinstance(rope, dict) else [])]:
        if isinstance(params, dict) and _ints(params.get("mrope_section")):
            section = params["mrope_section"]
            target = max(len(section), round(sum(section) * head_dim / head_dim0))
            params["mrope_section"] = _apportion(section, target)


def _apportion(parts: list[int], total: int) -> list[int]:
    """`parts` scaled to sum to `total` (largest remainders), each at least 1."""
    scale = total / sum(parts)
    out = [max(1, int(p * scale)) for p in parts]
    order = sorted(range(len(parts)), key=lambda i: -(parts[i] * scale - int(parts[i] * scale)))
    for i in order:
        if sum(out) >= total:
            break
        out[i] += 1
    while sum(out) > total:
        out[out.index(max(out))] -= 1
    return out


def _shrink_images(d: dict[str, Any], derived: set[str]) -> None:
    """Small images: a few patches per side (sizes as ints or [height, width] pairs)."""

    def square(key: str) -> int | None:
        value = d.get(key)
        if _ints(value) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        return value if _int(value) and key not in derived else None

    def put(key: str, value: int) -> None:
        d[key] = value if _int(d[key]) else type(d[key])([value, value])

    patch = square("patch_size")
    if patch is not None and patch > 4:
        put("patch_size", 4)
        patch = 4
    size = square("image_size")
    if size is not None and patch is not None and size > 8 * patch:
        merge = d.get("spatial_merge_size") or 1
        put("image_size", patch * 4 * (merge if _int(merge) else 1))


def _collect_widths(config: Any, widths: set[int], seen: set[int]) -> None:
    """Every width in the tree (its other sizes equal to one are that width too)."""
    if id(config) in seen:
        return
    seen.add(id(config))
    for key in _WIDTH_KEYS:
        value = vars(config).get(key)
        if _int(value) and value > WIDTH:
            widths.add(value)
    for value in vars(config).values():
        if _is_config(value):
            _collect_widths(value, widths, seen)


# -- special token ids ------------------------------------------------------------------


def _collect_ids(config: Any, moved: dict[int, int], seen: set[int]) -> None:
    """Special token ids past the tiny vocabulary, each given a distinct id at its top; the
    same mapping in every sub-config (a VLM's image_token_id and its text config's agree)."""
    if id(config) in seen:
        return
    seen.add(id(config))
    for key, value in vars(config).items():
        if not key.endswith(_ID_SUFFIXES) or key in ("layer_id", "model_id"):
            continue
        for v in value if _ints(value) else [value]:
            if _int(v) and v >= VOCAB - 16 and v not in moved:
                moved[v] = VOCAB - 1 - len(moved)
    for value in vars(config).values():
        if _is_config(value):
            _collect_ids(value, moved, seen)


def _move_ids(d: dict[str, Any], moved: dict[int, int]) -> None:
    for key, value in d.items():
        if not key.endswith(_ID_SUFFIXES) or key in ("layer_id", "model_id"):
            continue
        if _int(value):
            d[key] = moved.get(value, value)
        elif _ints(value):
            d[key] = [moved.get(v, v) for v in value]


def _set_path(config: Any, key: str, value: Any) -> None:
    """'text_config.hidden_size' -> config.text_config.hidden_size = value."""
    *path, last = key.split(".")
    for part in path:
        config = getattr(config, part)
    setattr(config, last, value)


# Arguments for AutoConfig.for_model where the default config does not build.
CONSTRUCT: dict[str, dict[str, Any]] = {
    # The default Gemma4AssistantConfig fails its own validator: its default text config has
    # per-layer inputs, which an assistant must not have.
    "gemma4_assistant": {
        "text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}
    },
}


def _image_vocabulary(name: Any, codes: int, first: int, **special: int) -> dict[str, int]:
    """A VQ model's vocabulary_map: the BPE id of each of `codes` image codes (from `first`)."""
    return {**special, **{name(i): first + i for i in range(codes)}}


def _chameleon_code(i: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(i)) + "Z"


# Per-type fixes, each with why the generic shrinking is not enough. Keys are attribute
# paths ("text_config.hidden_size"); they are constructor arguments of that (sub-)config and
# are set once more on the built config.
OVERRIDES: dict[str, dict[str, Any]] = {
    # The default Bamba / GraniteMoeHybrid configs are all Mamba (no attention layer, where
    # the released checkpoints are hybrid): one Mamba layer and one attention layer.
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # RecurrentGemma repeats its 3-entry block_types (recurrent, recurrent, attention): the
    # first 2 layers would have no attention.
    "recurrent_gemma": {"num_hidden_layers": 3},
    # CohereCompass reads rope_parameters[layer_type], and the default rope_parameters has
    # no entry for its default layer type (full_attention); mrope_section sums to head_dim/2.
    "cohere_compass": {
        "text_config.rope_parameters": {
            "full_attention": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [3, 3, 2],
            }
        }
    },
    "cohere_compass_text": {
        "rope_parameters": {
            "full_attention": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [3, 3, 2],
            }
        }
    },
    # DbrxAttention reads attn_config.rope_theta, which released DBRX configs carry and the
    # default DbrxAttentionConfig lacks.
    # Its clip_qkv defaults to None, and DbrxAttention clamps with it (torch refuses a clamp
    # with neither bound); released DBRX uses 8.
    "dbrx": {"attn_config.rope_theta": 500000.0, "attn_config.clip_qkv": 8.0},
    # Defaults of None where the model needs a number (released checkpoints set them).
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    # LFM2-MoE reads layer_types, which defaults to None: conv, conv, attention (the first
    # layer dense, num_dense_layers=1, the others MoE).
    "lfm2_moe": {"num_hidden_layers": 3, "layer_types": ["conv", "conv", "full_attention"]},
    # LFM2's default full_attn_idxs makes every layer attention; released LFM2s mostly run
    # short convolutions: one conv layer, one attention layer.
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_vl": {"text_config.layer_types": ["conv", "full_attention"]},
    # Qwen4-Exp's indexed-attention layers need the QSA indexer settings, all None by default.
    # A budget of 4 tokens in blocks of 2 so the selection matters within the 12-token test.
    **{
        t: {
            f"{prefix}indexer_n_heads": 2,
            f"{prefix}indexer_kv_heads": 1,
            f"{prefix}indexer_head_dim": 16,
            f"{prefix}indexer_budget": 4,
            f"{prefix}indexer_compress_ratio": 2,
        }
        for t, prefix in (("qwen4_exp", "text_config."), ("qwen4_exp_text", ""))
    },
    # Granite 4 Vision injects vision features into the LLM layers listed in
    # deepstack_layer_map (None by default, the model calls len() on it) and the spatial
    # target layers (the default [12, 15, 18, 21] index a 32-layer LLM).
    "granite4_vision": {
        "deepstack_layer_map": [[0, 0], [1, 1]],
        "spatial_target_layers": [0, 0, 1, 1],
        "downsample_rate": "1/2",
    },
    # The assistants' centroid embedder splits the vocabulary into num_centroids groups
    # (2048 default: more than the 512 tokens) and picks the top-k of them.
    **{
        t: {"num_centroids": 16, "centroid_intermediate_top_k": 4}
        for t in ("gemma4_assistant", "gemma4_unified_assistant")
    },
    # Dots 3 sliding layers have head_dim = their own qk_nope_head_dim (1.5x the global one)
    # + qk_rope_head_dim: 16 = 12 + 4.
    "dots3_note": {"text_config.qk_rope_head_dim": 4},
    "dots3_note_text": {"qk_rope_head_dim": 4},
    # PaddleOCR-VL's text model falls back to mrope_section [16, 24, 24] (for head_dim 128)
    # and, unlike the Qwen2-VL family, does not declare it (the generic rule misses it).
    "paddleocr_vl": {
        "text_config.rope_parameters": {
            "rope_type": "default",
            "rope_theta": 500000.0,
            "mrope_section": [2, 3, 3],
        }
    },
    # Apertus 1.5 lays its image and audio codebooks out in the vocabulary after the text
    # tokens (fixed offsets, 131072 and 4096 codes): small codebooks inside the 512 tokens.
    "apertus1p5": {
        "vision_config.codebook_size": 128,
        "audio_config.codebook_size": 64,
        "image_token_offset": 256,
        "audio_token_offset": 384,
    },
    # Chameleon and Emu3 map VQ codes to vocabulary tokens through vocabulary_map (None by
    # default, read at init): the 64 codes of the tiny codebook as tokens 300-363.
    "chameleon": {
        "vocabulary_map": _image_vocabulary(_chameleon_code, 64, 300, **{"<image>": 290})
    },
    "emu3": {
        "vocabulary_map": _image_vocabulary(
            "<|visual token{:06d}|>".format, 64, 300, **{"<image>": 290, "<|extra_200|>": 291}
        )
    },
    # DiffusionGemma's text layers always have an MoE block, with num_experts, top_k_experts
    # and moe_intermediate_size all None by default.
    "diffusion_gemma": {
        "text_config.num_experts": 4,
        "text_config.top_k_experts": 2,
        "text_config.moe_intermediate_size": 32,
    },
    # DeepSeek-OCR 2's text model reads mlp_layer_types, None by default.
    "deepseek_ocr2": {"text_config.mlp_layer_types": ["dense", "sparse"]},
    # BLIP-2 / InstructBLIP default to image_token_index None (the legacy path, which
    # prepends the Q-Former outputs); released configs mark num_query_tokens placeholders.
    "blip-2": {"image_token_index": 450},
    "instructblip": {"image_token_index": 450},
    "instructblipvideo": {"video_token_index": 450},
    # X-MOD runs one adapter per language and refuses to guess which: two languages, the
    # first the default.
    "xmod": {"languages": ["en_XX", "de_DE"], "default_language": "en_XX"},
    # Reformer: ReformerModelWithLMHead needs is_decoder; the axial position embedding
    # dims must sum to hidden_size and its shape multiply to max_position_embeddings.
    "reformer": {
        "is_decoder": True,
        "axial_pos_embds_dim": (16, 48),
        "axial_pos_shape": (16, 32),
    },
    # PI0 predicts chunk_size actions of max_action_dim from a max_state_dim state.
    "pi0": {"chunk_size": 4, "max_state_dim": 8, "max_action_dim": 8},
    # The Omni thinkers' get_rope_index reads vision_start_token_id, which released thinker
    # configs carry and the config class does not declare.
    "qwen2_5_omni_thinker": {"vision_start_token_id": 449},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 449},
    # xLSTM's cache rounds the q/k width (hidden_size * qk_dim_factor) up to a multiple of 64,
    # its layers do not: they agree only from hidden_size 128 on.
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},
    # Inkling's vision tower plans its downsampling scales over its layers and, with fewer
    # layers than scales, assigns them with scipy's linear_sum_assignment (scipy is not
    # installed): 4 layers cover the tiny image's scales.
    "inkling_mm_model": {"vision_config.num_hidden_layers": 4},
    # Aria's projector maps each patch count to its query count (for 1225 and 4900 patches):
    # the tiny image has 16.
    "aria": {
        "projector_patch_to_query_dict": {16: 4},
        "max_value_projector_patch_to_query_dict": 4,
    },
    # PP-FormulaNet's post convs take the SAM neck's output_channels (shrunk to 32).
    "pp_formulanet": {
        "vision_config.post_conv_in_channels": 32,
        "vision_config.post_conv_out_channels": 64,
    },
    # Dory runs input layers, then recurrent layers looped n_recurrent_loops times, then
    # output layers, and checks that the three counts add up: one of each.
    "dory": {
        "num_hidden_layers": 3,
        "n_input_layers": 1,
        "n_recurrent_layers": 1,
        "n_output_layers": 1,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    # Step 3.7 always builds a sliding-window mask, and sliding_window defaults to None.
    "step3p7": {"text_config.sliding_window": 4},
    # Zamba's hybrid layers share one transformer block and tie their weights to the first
    # one: it needs two of them (one of each kind leaves nothing to tie).
    "zamba": {
        "num_hidden_layers": 4,
        "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"],
    },
}
