"""A model's transformers config: loading it, its dtype, its model class, its fingerprint."""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, RemoteCodeNotTrusted
from .checkpoint import ModelSource

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
# config keys that change between saves of the same model, or that the plan's dtype overrides
_VOLATILE_KEYS = frozenset({"transformers_version", "_name_or_path", "dtype", "torch_dtype"})


def load_config(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of `source`, checked to name a model class and to have sizes a
    model can be built from (`check_sizes`), and its generation_config.json checked to be one.

    A model whose code ships with it (`auto_map`, a model type transformers lacks) is
    refused before any of that code runs unless `trust_remote_code` is True."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    check_sizes(read_json_object(source.config_path), source.config_path)
    if not trust_remote_code:
        refuse_untrusted_code(source)
    # a directory, so transformers finds a custom model's configuration_*.py beside it
    where = source.root if source.config_path.name == "config.json" else source.config_path
    try:
        config = AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StrictDataclassError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__  # one line, clipped
        raise ConfigError(
            f"{source.config_path}: transformers cannot read this config ({reason}). "
            "Check that it is a model's config.json with a known `model_type`."
        ) from exc
    architectures = getattr(config, "architectures", None)
    if not architectures:
        raise ConfigError(
            f"{source.config_path} has no `architectures` entry, so devicemap cannot tell which "
            'model class to build. Add the class, e.g. "architectures": ["LlamaForCausalLM"] '
            "(the name is on the model card, or in the config of the original release)."
        )
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ConfigError(
            f"{source.config_path}: `architectures` is {json.dumps(architectures)}; it must be a"
            ' list of model class names, e.g. "architectures": ["LlamaForCausalLM"]'
        )
    check_generation_config(source.root / "generation_config.json")
    return config


def read_json_object(
    path: Path, *, fix: str = "copy it again from where the model came from"
) -> dict[str, Any]:
    """The JSON object in `path` (a config file); ConfigError naming the file, what is wrong
    and `fix` when it is unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); {fix}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config; {fix}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path} holds a JSON {kind}, not an object of settings; {fix}")
    return data


def check_generation_config(path: Path) -> None:
    """ConfigError naming `path` when a model's generation_config.json is there but broken.

    It is not skipped: it holds the end-of-sequence tokens and the defaults transformers
    generates with, and a reply generated without them can run past its end unnoticed."""
    if not path.is_file():
        return
    from transformers import GenerationConfig

    fix = (
        "devicemap reads it for the model's end-of-sequence tokens and generation defaults:"
        " fix it, or delete it to generate with the defaults in config.json"
    )
    data = read_json_object(path, fix=fix)
    try:
        GenerationConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {' '.join(str(exc).split())}; {fix}") from None
    bad_ids = [
        f"{key} is {json.dumps(data[key])}"
        for key in _TOKEN_ID_KEYS
        if data.get(key) is not None and not all(map(_is_int, _as_list(data[key])))
    ]
    if bad_ids:
        raise ConfigError(f"{path}: {', '.join(bad_ids)}, but token ids are whole numbers; {fix}")


_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


# --- sizes --------------------------------------------------------------------

MAX_LAYERS = 10_000  # 80x the deepest released LLMs; planning builds each (~3 ms a layer)
MAX_SIZE = 1 << 24  # a width, head count, vocabulary or expert count: 100x any released one
MAX_WEIGHTS = 10**15  # more weights than the memory and disks of any one machine hold

_LAYER_KEYS = (
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_encoder_layers",
    "num_decoder_layers", "encoder_layers", "decoder_layers", "depth",
)  # fmt: skip
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_SIZE_KEYS = (
    *_HIDDEN_KEYS, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
    "decoder_attention_heads", "num_key_value_heads", "num_kv_heads", "head_dim", "d_kv",
    "intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size",
)  # fmt: skip
# 0 is valid for these: a dense model, a layer without shared experts
_COUNT_KEYS = (
    "num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size",
)  # fmt: skip
_WINDOW_KEYS = ("sliding_window", "attention_window")  # 0 (or null): no window
_LIMITS: dict[str, tuple[int, int]] = {  # key -> (least, most)
    **dict.fromkeys(_WINDOW_KEYS, (0, 1 << 40)),
    **dict.fromkeys(_LAYER_KEYS, (1, MAX_LAYERS)),
    **dict.fromkeys(_SIZE_KEYS, (1, MAX_SIZE)),
    **dict.fromkeys(_COUNT_KEYS, (0, MAX_SIZE)),
}


def check_sizes(raw: dict[str, Any], path: Path) -> None:
    """ConfigError listing every size in config.json (`raw`) and its sub-configs (text_config,
    vision_config, encoder, ...) no model can be built from: not a whole number, zero heads or
    layers, negative, or more than any machine holds (each checked against _LIMITS).

    It runs before transformers reads the config, so a config with 10**9 layers fails here at
    once, and zero heads or a negative width never reach a division or torch."""
    problems = []
    for prefix, cfg in _sub_configs(raw):
        problems += [prefix + problem for problem in _size_problems(cfg) or _weight_problems(cfg)]
    if problems:
        raise ConfigError(
            f"{path}: {'; '.join(problems)}. Fix these values in the config (the model card or"
            " the original release's config.json has the real ones)"
        )


def _sub_configs(raw: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """[("", raw), ("text_config.", {...}), ...]: a config and each config nested in it."""
    found = [(prefix, raw)]
    for key, value in raw.items():
        if isinstance(value, dict) and (key.endswith("_config") or key in ("encoder", "decoder")):
            found += _sub_configs(value, f"{prefix}{key}.")
    return found


def _size_problems(cfg: dict[str, Any]) -> list[str]:
    problems = []
    for key, (least, most) in _LIMITS.items():
        value = cfg.get(key)
        if value is None:
            continue  # absent or null: transformers' default
        if key == "head_dim" and "qk_rope_head_dim" in cfg:
            least = 0  # multi-head latent attention: head_dim is the RoPE part, 0 without RoPE
        # a list holds per-layer values (Gemma-3n's MLP widths), each checked
        wrong = [w for item in _as_list(value) if (w := _wrong_size(item, least, most))]
        if wrong:
            problems.append(f"{key} is {json.dumps(value)}{wrong[0]}")
    return problems


def _wrong_size(value: Any, least: int, most: int) -> str:
    """What is wrong with one size, '' if nothing: ', not a whole number; write 32', ..."""
    if not _is_int(value):
        return f", not a whole number{_write(value)}"
    if value < least:
        return f"; it must be at least {least}"
    if value > most:
        return f", more than the {most} devicemap plans"
    return ""


def _weight_problems(cfg: dict[str, Any]) -> list[str]:
    """A lower bound on the weights: the embedding and one hidden x hidden matrix per layer."""
    hidden, layers, vocab = (
        _first(cfg, keys) for keys in (_HIDDEN_KEYS, _LAYER_KEYS, ("vocab_size",))
    )
    least = vocab * hidden + layers * hidden * hidden
    if least <= MAX_WEIGHTS:
        return []
    return [
        f"its sizes (hidden size {hidden}, {layers} layers, vocab_size {vocab}) make at least"
        f" {least:.2g} weights, more than the memory and disks of any machine hold"
    ]


def _first(cfg: dict[str, Any], keys: Sequence[str]) -> int:
    """The first of `keys` the config gives (the largest, for a per-layer list); 0 if none."""
    value = next((cfg[k] for k in keys if cfg.get(k) is not None), 0)
    return int(max(_as_list(value), default=0))


def _as_list(value: Any) -> list[Any]:
    """A size's values: a list's items, a dict's values (LXMERT's layers per part), or itself."""
    if isinstance(value, dict):
        return list(value.values())
    return value if isinstance(value, list) else [value]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _write(value: Any) -> str:
    """How to write a number given as a string or a float: '; write 32'."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return ""
    if isinstance(number, float) and number.is_integer() and number >= 0:
        return f"; write {int(number)}" + (" without quotes" if isinstance(value, str) else "")
    return ""


def refuse_untrusted_code(source: ModelSource) -> None:
    """RemoteCodeNotTrusted naming the files that would run, if building `source` needs code
    shipped with it (an `auto_map` entry, and a model type or class transformers lacks)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        raw = json.loads(source.config_path.read_text())
    except (OSError, ValueError):
        return  # unreadable: load_config reports it
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    if not isinstance(auto_map, dict) or not auto_map:
        return
    architectures = raw.get("architectures") or []
    native_type = raw.get("model_type") in CONFIG_MAPPING_NAMES
    native_class = bool(architectures) and hasattr(transformers, str(architectures[0]))
    if native_type and (native_class or not architectures):
        return  # transformers builds it itself; the shipped code is not needed
    files = sorted({_code_file(ref) for ref in _references(auto_map)})
    shown = ", ".join(str(source.root / f) if "--" not in f else f for f in files)
    raise RemoteCodeNotTrusted(
        f"{source.name} ships its own model code, which would run to build it: {shown}"
        " (auto_map in its config.json). devicemap runs it only when you trust it: pass"
        " trust_remote_code=True in Python, or --trust-remote-code on the command line"
    )


def _references(auto_map: dict[str, Any]) -> list[str]:
    refs = []
    for value in auto_map.values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str):
                refs.append(ref)
    return refs


def _code_file(reference: str) -> str:
    """'modeling_x.Model' -> 'modeling_x.py'; 'owner/repo--modeling_x.Model' -> 'owner/repo:
    modeling_x.py' (code from another repository)."""
    repo, sep, rest = reference.rpartition("--")
    module = rest.rsplit(".", 1)[0]
    return f"{repo}--{module}.py" if sep else f"{module}.py"


def parse_dtype(dtype: torch.dtype | str | None, config: Any) -> torch.dtype:
    """The plan dtype: `dtype` if given (a torch dtype or a name), else (None or "auto") the
    config's, else fp32."""
    where = "the dtype"
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        dtype = None  # "auto": the checkpoint's own, as transformers' torch_dtype="auto"
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        where = "config.json's `dtype` (or `torch_dtype`)"
        if dtype is None or dtype == "auto":
            return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    if isinstance(name, str) and name.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[name.lower().removeprefix("torch.")]
    shown = repr(name)[:60]
    if where == "the dtype":
        raise ConfigError(f"unknown dtype {shown}; choose one of: auto, {', '.join(DTYPES)}")
    raise ConfigError(
        f"{where} is {shown}, not a dtype weights are planned in; give --dtype, one of:"
        f" {', '.join(DTYPES)}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": how plans and messages name a dtype."""
    return str(dtype).removeprefix("torch.")


_AUTO_CLASSES = (
    "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq",
    "AutoModelForSeq2SeqLM", "AutoModel",
)  # fmt: skip  # which auto_map entry builds the model, when none names the architecture


def model_class(config: Any, source: ModelSource, *, trust_remote_code: bool = False) -> type:
    """The class named first in `config.architectures`, from transformers or the model's code."""
    import transformers

    name = config.architectures[0]
    cls = getattr(transformers, name, None)
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    auto_map = getattr(config, "auto_map", None) or {}
    refs = [r for r in _references(auto_map) if r.split(".")[-1] == name]
    refs += [r for key in _AUTO_CLASSES for r in _references({key: auto_map.get(key)})]
    if trust_remote_code and refs:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(refs[0], str(source.root))  # type: ignore[no-any-return]
    if refs:
        refuse_untrusted_code(source)
    found = "is not a model class in" if cls is not None else "is not in"
    raise ConfigError(
        f"{source.config_path}: `architectures` names {name!r}, which {found} transformers"
        f" {transformers.__version__}; it must name the model class to build, such as"
        f" LlamaForCausalLM{_did_you_mean(name)}. Check the spelling, or upgrade transformers"
        " if the architecture is newer."
    )


def _did_you_mean(name: str) -> str:
    """' (did you mean LlamaForCausalLM?)' for a near miss among transformers' model classes."""
    import transformers

    classes = [n for n in dir(transformers) if "For" in n or n.endswith("Model")]
    close = difflib.get_close_matches(name, classes, n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def fingerprint_config(config: Any) -> str:
    """sha256 of the config's canonical JSON, without volatile keys (version, path, dtype)."""
    text = json.dumps(_without_volatile(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in _VOLATILE_KEYS}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def max_positions(config: Any) -> int | None:
    """The longest context the config allows (text config for VLMs); None when it has no limit
    (none given, or a non-positive value: XLNet's -1 means unlimited)."""
    for cfg in (config, config.get_text_config(decoder=True)):
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value if value > 0 else None
    return None
