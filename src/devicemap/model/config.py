"""A model's transformers config: loading it, its dtype, its model class, its fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..errors import ConfigError
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
    """The transformers config of `source`, checked to name a model class."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(source.config_path), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{source.config_path}: transformers cannot read this config ({exc}). "
            "Check that it is a model's config.json with a known `model_type`."
        ) from exc
    if not getattr(config, "architectures", None):
        raise ConfigError(
            f"{source.config_path} has no `architectures` entry, so devicemap cannot tell which "
            'model class to build. Add the class, e.g. "architectures": ["LlamaForCausalLM"] '
            "(the name is on the model card, or in the config of the original release)."
        )
    return config


def parse_dtype(dtype: torch.dtype | str | None, config: Any) -> torch.dtype:
    """The plan dtype: `dtype` if given (a torch dtype or a name), else the config's, else fp32."""
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if dtype is None or dtype == "auto":
            return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": how plans and messages name a dtype."""
    return str(dtype).removeprefix("torch.")


def model_class(config: Any, source: ModelSource, *, trust_remote_code: bool = False) -> type:
    """The class named first in `config.architectures`, from transformers or the model's code."""
    import transformers

    name = config.architectures[0]
    cls = getattr(transformers, name, None)
    if isinstance(cls, type):
        return cls
    auto_map = getattr(config, "auto_map", None) or {}
    refs = [r for r in auto_map.values() if isinstance(r, str) and r.split(".")[-1] == name]
    if trust_remote_code and refs:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(refs[0], str(source.root))  # type: ignore[no-any-return]
    hint = (
        " The config ships its own code (auto_map): pass trust_remote_code=True if you trust it."
        if refs
        else " Check the spelling, or upgrade transformers if the architecture is newer."
    )
    raise ConfigError(
        f"{source.config_path} names the architecture {name!r}, which transformers "
        f"{transformers.__version__} does not have.{hint}"
    )


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
    """The longest context the config allows (text config for VLMs); None when it has no limit."""
    for cfg in (config, config.get_text_config(decoder=True)):
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
    return None
