"""GGUF files -> ordinary Hugging Face model directories, converted once into the devicemap cache.

`converted_dir(file.gguf)` loads the file through transformers' GGUF support (config from
its metadata, tokenizer and chat template from its vocabulary, weights de-quantised to
exact float32 values) and writes config, generation config, tokenizer and sharded float32
safetensors to `$DEVICEMAP_CACHE/gguf/<stem>-<fingerprint>`. Every later call finds that
directory and converts nothing. The demo model (cli/demo.py) goes through the same code
into `$DEVICEMAP_CACHE/demo`.

Even planning converts: the config comes out of the GGUF metadata only through the same
transformers load, and a plan names the converted checkpoint's tensors. So the first
`devicemap plan x.gguf` takes the conversion's time (about 20 s for a 135M model) and needs
RAM and cache disk for the whole model in float32; every later command reuses it.

A directory under the final name is always complete: the conversion writes a private
temporary sibling, marks it complete (`.complete`, written last) and renames it into place,
under a per-model lock so that concurrent processes convert once. A killed conversion leaves
only a temporary sibling, removed by the next one. The fingerprint covers the file's size,
its metadata header and samples of its tensor data, so a re-downloaded or re-quantised file
under the same name gets a new directory, and a reinstalled one (new mtime, same bytes)
does not.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CacheError, ConfigError, CorruptCheckpoint, DevicemapError, ModelNotFound

CONVERSION_VERSION = 1  # bump when the written directory changes; old caches are then ignored
MAX_SHARD_BYTES = 100 * 2**20  # a 135M model's 113 MB embedding gets a shard of its own
SUFFIX = ".gguf"

_COMPLETE = ".complete"  # written last inside the temporary dir; its presence proves completeness
_HEADER_BYTES = 2**20  # GGUF metadata (architecture, quant type, tokenizer) starts the file
_SAMPLES, _SAMPLE_BYTES = 16, 4096  # spread over the tensor data, for the fingerprint
_STALE_SECONDS = 3600  # without a lock, only temp dirs this old are assumed abandoned
_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # the GGUF versions the gguf package reads
_FIX = (
    "Download it again (or re-export it with llama.cpp's convert_hf_to_gguf.py), or give the"
    " model's Hugging Face checkpoint instead (a directory with config.json and safetensors)."
)
_UNSUPPORTED = re.compile(r"architecture \S+ is not supported")  # transformers' words
_loading = threading.Lock()  # transformers' progress settings are process-wide: one load at a time

T = TypeVar("T")


# --- where things are ----------------------------------------------------------


def is_gguf(path: Path) -> bool:
    """Whether `path` names a GGUF file (by its suffix, any case)."""
    return path.suffix.lower() == SUFFIX


def gguf_files(directory: Path) -> list[Path]:
    """The GGUF files directly inside `directory`, sorted by name."""
    return sorted(p for p in directory.iterdir() if is_gguf(p) and p.is_file())


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $DEVICEMAP_CACHE, else ~/.cache/devicemap (set but empty: unset)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("DEVICEMAP_CACHE") or "~/.cache/devicemap").expanduser()


def gguf_fingerprint(gguf: Path) -> str:
    """12 hex digits from the file size, its metadata header, samples of its tensor data and
    the conversion version (about 1 MiB read; never the mtime or the path)."""
    size = gguf.stat().st_size  # bytes
    digest = hashlib.sha256(f"v{CONVERSION_VERSION}:{size}:".encode())
    with gguf.open("rb") as f:
        digest.update(f.read(_HEADER_BYTES))
        if size > _HEADER_BYTES:  # two fine-tunes of one model share their metadata
            span = max(size - _HEADER_BYTES - _SAMPLE_BYTES, 0)
            for i in range(_SAMPLES):
                f.seek(_HEADER_BYTES + span * i // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:12]


def is_complete(directory: Path) -> bool:
    """True only for a directory that a finished conversion renamed into place."""
    return (directory / _COMPLETE).is_file()


# --- the public entry points ---------------------------------------------------


def converted_dir(gguf_path: str | os.PathLike[str], cache_dir: str | Path | None = None) -> Path:
    """The model directory converted from this GGUF file, converting it on first use.

    ModelNotFound when there is no such file; CorruptCheckpoint when it is not a readable
    GGUF file (not GGUF, truncated, damaged); ConfigError when transformers cannot convert
    its architecture; CacheError when the cache disk is full. Nothing half-written is left.
    """
    gguf = Path(gguf_path).expanduser()
    if not gguf.is_file():
        raise ModelNotFound(f"{gguf}: no such GGUF file.")
    final = cache_root(cache_dir) / "gguf" / f"{_dir_name(gguf.stem)}-{gguf_fingerprint(gguf)}"
    return ensure_converted(gguf, final)


def ensure_converted(gguf: Path, final: Path) -> Path:
    """`final`, converted from `gguf` unless a finished conversion is there already."""
    if is_complete(final):
        return final
    check_header(gguf)
    _check_reader_installed()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(final.parent / f".{final.name}.lock") as locked:
        if is_complete(final):  # another process finished while we waited for the lock
            return final
        _remove_leftovers(final, everything=locked)
        _convert(gguf, final)
    return final


def _dir_name(stem: str) -> str:
    """A file stem as a safe, visible directory name (no leading dot, no separators)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".")[:100]
    return name or "model"


# --- checks --------------------------------------------------------------------


def check_header(gguf: Path) -> None:
    """CorruptCheckpoint unless the file starts like a GGUF file that can be read."""
    with gguf.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"version "):  # "version https://git-lfs.github.com/spec/v1"
        raise CorruptCheckpoint(
            f"{gguf}: a Git LFS pointer, not the GGUF file itself: run `git lfs pull` in the"
            " model's repository, or download the file again."
        )
    if head[:4] != _MAGIC:
        raise CorruptCheckpoint(
            f"{gguf}: not a GGUF file: a GGUF file starts with the bytes b'GGUF', this one"
            f" with {head[:4]!r}. {_FIX}"
        )
    if len(head) < 8:
        raise CorruptCheckpoint(f"{gguf}: only {len(head)} bytes: a truncated GGUF file. {_FIX}")
    little, big = int.from_bytes(head[4:], "little"), int.from_bytes(head[4:], "big")
    if little not in _VERSIONS and big not in _VERSIONS:
        raise CorruptCheckpoint(
            f"{gguf}: GGUF version {little}, which the gguf reader does not know (it reads"
            f" versions {' and '.join(map(str, _VERSIONS))}). {_FIX}"
        )


def _check_reader_installed() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "reading GGUF files needs the `gguf` package, which is not installed. Install it"
            " with:  pip install 'gguf>=0.10'"
        )


def _unreadable(gguf: Path, error: Exception) -> DevicemapError:
    """The typed error for a GGUF file that transformers failed to load."""
    reason = _first_line(error)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf)
        architecture = _text_field(reader, "general.architecture")
    except Exception as e:  # the reader's own errors are ValueError, IndexError, struct.error...
        size = gguf.stat().st_size
        return CorruptCheckpoint(
            f"{gguf}: a truncated or damaged GGUF file ({size} bytes; reading it failed with"
            f" {type(e).__name__}: {_first_line(e)}). {_FIX}"
        )
    if _UNSUPPORTED.search(reason):
        return ConfigError(
            f"{gguf}: GGUF architecture {architecture!r} is not one this transformers can"
            f" convert (it converts {_convertible()}). Give the model's Hugging Face checkpoint"
            " instead (a directory with config.json and safetensors weights), or upgrade"
            " transformers if a newer one supports it."
        )
    return ConfigError(
        f"{gguf}: transformers cannot convert this GGUF file (architecture {architecture!r};"
        f" {type(error).__name__}: {reason}). Give the model's Hugging Face checkpoint instead"
        " (a directory with config.json and safetensors weights)."
    )


def _convertible() -> str:
    """The GGUF architectures transformers converts, in words."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return ", ".join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}))


def _text_field(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _first_line(error: BaseException) -> str:
    line = next(iter(str(error).strip().splitlines()), "")
    return line if len(line) <= 200 else line[:200] + "..."


# --- conversion ----------------------------------------------------------------


def _convert(gguf: Path, final: Path) -> None:
    """Load the GGUF through transformers, write it to a temp sibling, rename it to `final`."""
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        with console.status(f"converting {gguf.name} (once)") as status:
            try:
                model, tokenizer = _load_gguf(gguf, say=status.update)
            except (DevicemapError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as error:
                raise _unreadable(gguf, error) from error
            with _disk_space(final.parent, gguf):
                _write_model(model, tokenizer, tmp, say=status.update)
                _mark_complete(tmp, gguf=gguf, seconds=time.perf_counter() - start)
            _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    console.print(
        f"converted {gguf.name} in {time.perf_counter() - start:.0f} s: {final}", soft_wrap=True
    )


def _load_gguf(gguf: Path, *, say: Callable[[str], Any]) -> tuple[Any, Any]:
    """(model, tokenizer) from the GGUF file: de-quantised to exact float32 values.

    stderr is left alone (the caller's status line keeps animating there): transformers'
    own progress bars are turned off and its de-quantisation loop reports through `say`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_quiet(gguf, say):
        say(f"{gguf.name}: reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        say(f"{gguf.name}: reading the config and de-quantising the weights to float32")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    return model, tokenizer


@contextlib.contextmanager
def _transformers_quiet(gguf: Path, say: Callable[[str], Any]) -> Iterator[None]:
    """transformers' progress bars and info logs off; its GGUF loop's tqdm bar (a plain tqdm
    on stderr, which the logging API does not reach) replaced by reports through `say`."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    def progress(items: Iterable[T], *args: Any, **kwargs: Any) -> Iterator[T]:
        listed = list(items)
        for i, item in enumerate(listed, start=1):
            say(f"{gguf.name}: de-quantising tensor {i}/{len(listed)} to float32")
            yield item

    with _loading:
        bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        bar = getattr(gguf_utils, "tqdm", None)
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if bar is not None:
            gguf_utils.tqdm = progress
        try:
            yield
        finally:
            if bar is not None:
                gguf_utils.tqdm = bar
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _disk_space(where: Path, gguf: Path) -> Iterator[None]:
    """A full disk while writing -> CacheError naming the cache and the fix."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        raise CacheError(
            f"{where}: no space left to write the float32 copy of {gguf.name} (about"
            f" {_float32_estimate(gguf)}); nothing was kept. Free space there, or point"
            " DEVICEMAP_CACHE at a disk with room."
        ) from error


def _float32_estimate(gguf: Path) -> str:
    """Roughly 8x the size of a 4-bit file; said as a range, since the quant type varies."""
    gib = gguf.stat().st_size / 2**30
    return f"{2 * gib:.1f}-{8 * gib:.1f} GiB"


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
        say(f"writing {name}")
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
