"""A model's transformers config: loading it, its dtype, its model class, its fingerprint."""

from __future__ import annotations

import hashlib
import json
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
    """The transformers config of `source`, checked to name a model class.

    A model whose code ships with it (`auto_map`, a model type transformers lacks) is
    refused before any of that code runs unless `trust_remote_code` is True."""
    from transformers import AutoConfig

    if not trust_remote_code:
        refuse_untrusted_code(source)
    # a directory, so transformers finds a custom model's configuration_*.py beside it
    where = source.root if source.config_path.name == "config.json" else source.config_path
    try:
        config = AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code)
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


_AUTO_CLASSES = (
    "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq",
    "AutoModelForSeq2SeqLM", "AutoModel",
)  # fmt: skip  # which auto_map entry builds the model, when none names the architecture


def model_class(config: Any, source: ModelSource, *, trust_remote_code: bool = False) -> type:
    """The class named first in `config.architectures`, from transformers or the model's code."""
    import transformers

    name = config.architectures[0]
    cls = getattr(transformers, name, None)
    if isinstance(cls, type):
        return cls
    auto_map = getattr(config, "auto_map", None) or {}
    refs = [r for r in _references(auto_map) if r.split(".")[-1] == name]
    refs += [r for key in _AUTO_CLASSES for r in _references({key: auto_map.get(key)})]
    if trust_remote_code and refs:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(refs[0], str(source.root))  # type: ignore[no-any-return]
    if refs:
        refuse_untrusted_code(source)
    raise ConfigError(
        f"{source.config_path} names the architecture {name!r}, which transformers"
        f" {transformers.__version__} does not have. Check the spelling, or upgrade"
        " transformers if the architecture is newer."
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
    """The longest context the config allows (text config for VLMs); None when it has no limit
    (none given, or a non-positive value: XLNet's -1 means unlimited)."""
    for cfg in (config, config.get_text_config(decoder=True)):
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value if value > 0 else None
    return None
