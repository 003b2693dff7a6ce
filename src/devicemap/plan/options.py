"""The planning options and their literal types: what placement, shortfall and the Plan
all read, in one module below them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..devices import Device

Strategy = Literal["sequential", "balanced", "balanced_low_0"]
OffloadExec = Literal["gpu", "cpu"]
Logits = Literal["last", "all"]
# the dtype names `--dtype` offers; "auto" is the checkpoint's own (config.json's `dtype`),
# as leaving it out. plan() also takes a torch.dtype and the aliases model/config.py knows
Dtype = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass(frozen=True)
class PlanOptions:
    context: int  # tokens per sequence the KV cache must hold (prompt + reply)
    batch: int = 1  # sequences generated together
    prefill: int | None = None  # tokens in one prefill step; None = context
    strategy: Strategy = "balanced"
    pins: Mapping[str, Device] = field(default_factory=dict)  # module prefix -> device
    offload_exec: OffloadExec = "gpu"  # where cpu/disk-stored blocks run: first GPU, or CPU
    logits: Logits = "last"  # logits kept per prefill: the last token's (generate) or all
    images: int = 0  # images per prompt a vision tower's workspace is planned for
    # slots of the GPU expert cache on each GPU (run/expert_cache.py): routed experts stored
    # in RAM or on disk, copied in least-recently-used to be computed on the GPU; 0 = none
    expert_cache: int = 0
    # bytes of page cache the disk tier may keep: disk blocks beyond it are streamed through
    # (read each token, dropped once run) so the rest stay resident; None = keep them all
    page_cache: int | None = None

    def logits_tokens(self, context: int | None = None) -> int:
        """Tokens per sequence whose logits exist at once."""
        return 1 if self.logits == "last" else self.prefill_tokens(context)

    def prefill_tokens(self, context: int | None = None) -> int:
        """Tokens in the largest forward step: the prefill, never longer than the context."""
        context = self.context if context is None else context
        return context if self.prefill is None else min(self.prefill, context)
