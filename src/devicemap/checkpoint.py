"""Checkpoint index: tensor name -> (file, dtype, shape, offset), from file headers only.

Opens a model directory, a single weights file, a bare config.json, or a hub id
already in the local Hugging Face cache (offline). No tensor data is read here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Format = Literal["safetensors", "bin"]


@dataclass(frozen=True)
class ModelSource:
    """What a model argument resolved to on this machine."""

    name: str  # what the user typed (path or hub id), for messages
    config_path: Path  # the config.json
    root: Path  # the directory holding config (and weights, tokenizer) files
    weight_files: tuple[Path, ...]  # () for a bare config.json: planning only
    format: Format | None  # None when there are no weights


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the checkpoint."""

    name: str  # the key as stored in the checkpoint (before any conversion)
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the file to the data; -1 for pickled .bin
    nbytes: int


@dataclass(frozen=True)
class CheckpointIndex:
    source: ModelSource
    tensors: Mapping[str, TensorInfo]  # checkpoint key -> where it is

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def resolve_model(model: str | os.PathLike[str]) -> ModelSource:
    """Find config and weights for a directory, weights file, config.json or cached hub id."""
    raise NotImplementedError


def read_index(source: ModelSource) -> CheckpointIndex:
    """Read every tensor's location from the weight files' headers."""
    raise NotImplementedError
