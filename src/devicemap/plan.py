"""The planner: a pure function from (skeleton, budgets, options) to a Plan.

No device calls in here: budgets arrive as bytes, so planning for hardware this
machine does not have is the same code path as planning for the one it has.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .devices import Device, DeviceLike, SizeLike
from .skeleton import Skeleton

Strategy = Literal["sequential", "balanced", "balanced_low_0"]
OffloadExec = Literal["gpu", "cpu"]
PLAN_FORMAT = 1  # bump when the JSON layout changes


@dataclass(frozen=True)
class PlanOptions:
    context: int  # tokens per sequence the KV cache must hold (prompt + reply)
    batch: int = 1  # sequences generated together
    prefill: int | None = None  # tokens in one prefill step; None = context
    strategy: Strategy = "balanced"
    pins: Mapping[str, Device] = field(default_factory=dict)  # module prefix -> device
    offload_exec: OffloadExec = "gpu"  # where cpu/disk-stored blocks run: first GPU, or CPU


@dataclass(frozen=True)
class DeviceUsage:
    """Bytes on one device under a plan."""

    device: Device
    budget: int
    weights: int  # blocks stored here
    kv_cache: int  # KV of the attention layers that execute here
    workspace: int  # activations of the largest block executing here, at the prefill length
    logits: int  # fp32 logits, on the LM head's execution device
    staging: int  # buffers that receive offloaded blocks streamed in to execute here

    @property
    def used(self) -> int:
        return self.weights + self.kv_cache + self.workspace + self.logits + self.staging

    @property
    def free(self) -> int:
        return self.budget - self.used


@dataclass(frozen=True)
class Plan:
    model: str  # the model's name or path, for messages
    fingerprint: str  # sha256 of config + dtype: a plan is only valid for its model
    dtype: torch.dtype
    options: PlanOptions
    device_map: dict[str, int | str]  # accelerate format: block -> 0 | "cpu" | "disk" | "mps"
    exec_map: dict[str, int | str]  # block -> where it executes (cpu/disk blocks: a GPU or cpu)
    devices: tuple[DeviceUsage, ...]  # placement order
    max_context: int  # the longest context this placement can hold at this batch
    order: Literal["forward", "registration"]
    reasons: tuple[str, ...]  # explanation lines, see explain()

    def explain(self) -> str:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        raise NotImplementedError


def make_plan(skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions) -> Plan:
    """Place every block; pure: same input -> same plan, linear in the number of blocks."""
    raise NotImplementedError


def plan(
    model: Any,
    *,
    max_memory: Mapping[DeviceLike, SizeLike] | None = None,
    gpus: int | list[DeviceLike] | None = None,
    context: int | None = None,
    batch: int = 1,
    dtype: torch.dtype | str | None = None,
    strategy: Strategy = "balanced",
    pins: Mapping[str, DeviceLike] | None = None,
    offload_exec: OffloadExec = "gpu",
    no_split: tuple[str, ...] = (),
    trust_remote_code: bool = False,
) -> Plan:
    """Plan where every part of `model` goes (a path, config.json, hub id or Skeleton)."""
    raise NotImplementedError
