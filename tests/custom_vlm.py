"""A tiny MiniCPM-Llama3-V-2.5 look-alike saved as a local custom-code model (trust_remote_code).

`make_tiny_minicpmv(dir)` writes what a hub repo with its own code holds: config.json with
an `auto_map`, the model's .py files next to it (copied from tests/data/custom_vlm/),
random weights as sharded safetensors, a byte-level tokenizer with a Llama-3 chat template,
and a processor config. transformers then loads it offline with
`AutoModel.from_pretrained(dir, trust_remote_code=True)` (or AutoModelForCausalLM,
AutoTokenizer, AutoProcessor, AutoImageProcessor).

The build imports the model code straight from tests/data/custom_vlm/ as a private
package, so it writes nothing to transformers' dynamic-module cache (HF_MODULES_CACHE):
only loading the saved directory with trust_remote_code does; `isolated_modules_cache`
points that cache at a temporary folder for a while.

The checkpoint's top-level modules are those of the real model: `llm` (a LlamaForCausalLM:
`llm.model.embed_tokens`, `llm.model.layers.N`, `llm.model.norm`, `llm.lm_head`, untied),
`vpm` (an Idefics2 vision transformer: `vpm.embeddings`, `vpm.encoder.layers.N`,
`vpm.post_layernorm`) and `resampler` (bare parameters `resampler.query`,
`resampler.proj` plus `kv_proj`, `attn`, `ln_q`, `ln_kv`, `ln_post`, and the
non-persistent buffer `resampler.pos_embed`).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

SOURCE = Path(__file__).parent / "data" / "custom_vlm"
CODE_FILES = (
    "configuration_tiny_minicpmv.py",
    "modeling_tiny_minicpmv.py",
    "resampler.py",
    "image_processing_tiny_minicpmv.py",
    "processing_tiny_minicpmv.py",
)
ARCHITECTURE = "TinyMiniCPMV"
MODEL_TYPE = "tiny_minicpmv"
AUTO_MAP = {
    "AutoConfig": "configuration_tiny_minicpmv.TinyMiniCPMVConfig",
    "AutoModel": "modeling_tiny_minicpmv.TinyMiniCPMV",
    "AutoModelForCausalLM": "modeling_tiny_minicpmv.TinyMiniCPMV",
    "AutoImageProcessor": "image_processing_tiny_minicpmv.TinyMiniCPMVImageProcessor",
    "AutoProcessor": "processing_tiny_minicpmv.TinyMiniCPMVProcessor",
}

# Special tokens first (ids 0-9), then one token per byte: 266 in all.
SPECIAL_TOKENS = (
    "<unk>",  # 0: also the image placeholder, as in the real model
    "<|begin_of_text|>",  # 1: bos
    "<|end_of_text|>",  # 2: eos
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",  # 5: end of a chat turn
    "<image>",
    "</image>",
    "<slice>",
    "</slice>",
)
# Llama-3's own template, as MiniCPM-Llama3-V-2.5 ships it.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

LLM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    initializer_range=0.2,  # at 0.02 the image barely moves the logits: same greedy answers
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
VISION_EXTRAS = dict(
    query_num=4, slice_mode=True, max_slice_nums=4, scale_resolution=28, patch_size=14
)


def tokenizer() -> Any:
    """A byte-level tokenizer: the special tokens above, then one token per byte."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def source_package() -> ModuleType:
    """tests/data/custom_vlm/ imported as a package (its files import each other relatively)."""
    name = "_tiny_minicpmv_source"
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(SOURCE)]
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
    return sys.modules[name]


def source_module(stem: str) -> ModuleType:
    return importlib.import_module(f"{source_package().__name__}.{stem}")


def tiny_config(vocab_size: int, **overrides: Any) -> Any:
    config_cls = source_module("configuration_tiny_minicpmv").TinyMiniCPMVConfig
    fields: dict[str, Any] = {**LLM, **VISION_EXTRAS, "vision_config": dict(VISION)}
    fields.update(overrides)
    config = config_cls(vocab_size=vocab_size, **fields)
    config.architectures = [ARCHITECTURE]
    config.auto_map = dict(AUTO_MAP)
    return config


def build_tiny_minicpmv(vocab_size: int, *, seed: int = 0, **overrides: Any) -> Any:
    """The random model (float32, eval), reproducible from `seed`: token embeddings at std 1
    (at transformers' 0.02 every token looks alike and greedy output degenerates), the other
    llm weights at std 0.2 (`initializer_range`), so each image gets its own greedy answer."""
    model_cls = source_module("modeling_tiny_minicpmv").TinyMiniCPMV
    config = tiny_config(vocab_size, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        model.llm.model.embed_tokens.weight.normal_(0.0, 1.0)
    return model.eval()


def make_tiny_minicpmv(directory: Path, *, seed: int = 0) -> Path:
    """Write the tiny custom-code MiniCPM-V model into `directory`; return `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    model = build_tiny_minicpmv(len(tok), seed=seed)
    model.save_pretrained(directory, max_shard_size="200KB")
    tok.save_pretrained(directory)
    for name in CODE_FILES:
        shutil.copyfile(SOURCE / name, directory / name)
    image_processor_cls = source_module("image_processing_tiny_minicpmv").TinyMiniCPMVImageProcessor
    preprocessor = image_processor_cls.from_model_config(model.config).to_dict()
    preprocessor.update(
        image_processor_type="TinyMiniCPMVImageProcessor",
        processor_class="TinyMiniCPMVProcessor",
        auto_map={
            k: v for k, v in AUTO_MAP.items() if k in ("AutoImageProcessor", "AutoProcessor")
        },
    )
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return directory


def _dynamic_modules() -> dict[str, ModuleType]:
    return {
        name: module
        for name, module in sys.modules.items()
        if name == "transformers_modules" or name.startswith("transformers_modules.")
    }


@contextmanager
def isolated_modules_cache(path: str | os.PathLike[str]) -> Iterator[Path]:
    """While open, transformers copies and imports remote code under `path`, not ~/.cache.

    Setting the HF_MODULES_CACHE variable is not enough once transformers is imported: it
    reads it into `transformers.dynamic_module_utils.HF_MODULES_CACHE` at import. And the
    `transformers_modules` package stays bound to the first cache folder it was imported
    from (a later load from another folder fails with ModuleNotFoundError), so the
    `transformers_modules.*` entries of sys.modules are set aside while open and restored
    after, together with sys.path. Classes loaded inside stay usable after.
    """
    import transformers.dynamic_module_utils as dynamic

    path = Path(path)
    saved_modules = _dynamic_modules()
    saved_path = list(sys.path)
    saved_env = os.environ.get("HF_MODULES_CACHE")
    saved_cache = dynamic.HF_MODULES_CACHE
    for name in saved_modules:
        del sys.modules[name]
    os.environ["HF_MODULES_CACHE"] = str(path)
    dynamic.HF_MODULES_CACHE = str(path)
    importlib.invalidate_caches()
    try:
        yield path
    finally:
        for name in _dynamic_modules():
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        dynamic.HF_MODULES_CACHE = saved_cache
        if saved_env is None:
            os.environ.pop("HF_MODULES_CACHE", None)
        else:
            os.environ["HF_MODULES_CACHE"] = saved_env
        importlib.invalidate_caches()
