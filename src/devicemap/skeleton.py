"""The model built on the meta device, cut into placeable blocks in execution order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .checkpoint import ModelSource


@dataclass(frozen=True)
class Block:
    """One placeable unit: a no-split module (decoder layer) or a loose module between them."""

    name: str  # module prefix, as it appears in a device map ("model.layers.3", "lm_head")
    params: tuple[str, ...]  # state_dict keys it owns (parameters and persistent buffers)
    nbytes: int  # weights + buffers at the plan dtype; tied tensors count once
    no_split: bool  # a no-split unit (never divided between devices)
    kv_bytes_per_token: int  # KV cache of the attention layers inside, per token per sequence
    kv_window: int | None  # sliding window: at most this many tokens cached; None = whole context
    act_bytes_per_token: int  # activation workspace while it runs, per token per sequence


@dataclass(frozen=True)
class Skeleton:
    model: torch.nn.Module  # parameters on meta, non-persistent buffers real
    config: Any  # transformers PretrainedConfig
    source: ModelSource
    dtype: torch.dtype  # the dtype the weights will have
    blocks: tuple[Block, ...]  # in execution order
    order: Literal["forward", "registration"]  # how the order was found
    tied: tuple[tuple[str, ...], ...]  # groups of block names that must share a device
    output_block: str | None  # the block that computes logits (lm_head), if any
    logits_bytes_per_token: int  # fp32 logits per token per sequence (vocab * 4)
    max_positions: int | None  # the model's longest context, from its config
    fingerprint: str  # sha256 of the config (not the dtype)


def build_skeleton(
    model: str | os.PathLike[str] | ModelSource,
    *,
    dtype: torch.dtype | str | None = None,
    no_split: tuple[str, ...] = (),
    trust_remote_code: bool = False,
) -> Skeleton:
    """Build the model on meta and derive its blocks, sizes and ties."""
    raise NotImplementedError
