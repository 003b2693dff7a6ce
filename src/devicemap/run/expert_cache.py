"""A GPU's pool of routed-expert slots, filled least-recently-used from the host.

With the dense part of an MoE layer on a GPU and its routed experts in RAM or on disk,
each decode step routes a few tokens to a few experts. Computed by the CPU (run/experts.py)
only hidden states cross; but a hot expert computed on the GPU is faster still, if it is
not copied again each time. `ExpertCache` holds a fixed number of slots on one device, each
the size of the largest expert, shared by every layer: the experts a step selects are
looked up by (layer, expert); a miss takes the least recently used slot no expert of this
step holds, and the expert's own tensors (checkpoint pages, faulted in exactly) are copied
in through a small page-locked staging ring, on the current stream, so the matmuls that
read the slot are ordered after the copy without a synchronisation. A step that selects
more experts than there are slots (a long prefill) is not cached: the caller computes it
where the experts are stored.

The pool is budgeted by the planner (`PlanOptions.expert_cache` slots on each GPU, shown as
`expert_cache` in the device's usage). The bookkeeping is plain Python over slot indices,
so on a machine without CUDA it runs, and is tested, with the pool on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .experts import CACHE_ATTR, EXPERTS_ATTR, ExpertWeights, Parts
from .offload import ALIGN, pin, unpin
from .pages import fault_in

RING = 2  # staging buffers: one is filled while the other's copy to the device runs


@dataclass
class CacheStats:
    hits: int = 0  # selected experts found in a slot
    misses: int = 0  # selected experts copied into a slot
    copied: int = 0  # bytes copied to the device
    uncached: int = 0  # calls that selected more experts than there are slots

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0


def slot_bytes(source: ExpertWeights, expert: int = 0) -> int:
    """Bytes one expert takes in a slot: each of its tensors at an ALIGN-aligned offset."""
    return sum(_aligned(_nbytes(t)) for t in source.tensors([expert]))


class ExpertCache:
    """`slots` expert slots of `size` bytes on `device`, least recently used replaced first."""

    def __init__(self, device: torch.device, size: int, slots: int):
        if slots < 1 or size < 1:
            raise ValueError(f"an expert cache needs at least one slot of some bytes, not {slots}")
        self.device, self.size, self.slots = device, size, slots
        self.stats = CacheStats()
        self._buffer = torch.empty(slots, size, dtype=torch.uint8, device=device)
        self._held: OrderedDict[tuple[str, int], int] = (
            OrderedDict()
        )  # (layer, e) -> slot, LRU first
        self._views: dict[int, Parts] = {}  # slot -> the views of the expert it holds
        self._free = list(range(slots - 1, -1, -1))
        self._cuda = device.type == "cuda"
        self._ring: list[torch.Tensor] = []
        self._pinned: list[torch.Tensor] = []
        self._ring_done: list[torch.cuda.Event] = []
        self._next = 0

    def holds(self, layer: str, expert: int) -> bool:
        return (layer, expert) in self._held

    def take(self, layer: str, source: ExpertWeights, experts: Sequence[int]) -> Parts | None:
        """The device copies of `experts` of `layer` (target -> expert -> its tensors), copied
        in where missing; None when this step selects more experts than there are slots."""
        if len(experts) > self.slots:
            self.stats.uncached += 1
            return None
        parts: Parts = {target: {} for target in source.parts}
        keep = {(layer, e) for e in experts}
        for expert in experts:
            key = (layer, expert)
            slot = self._held.get(key)
            if slot is None:
                slot = self._claim(keep)
                self._copy_in(source, expert, slot)
                self._held[key] = slot
                self.stats.misses += 1
            else:
                self._held.move_to_end(key)
                self.stats.hits += 1
            for target, views in self._views[slot].items():
                parts[target][expert] = views[expert]
        return parts

    def close(self) -> None:
        """Drop the pool and the staging ring (pinned memory unpinned)."""
        for buffer in self._pinned:
            unpin(buffer)
        self._pinned.clear()
        self._ring.clear()
        self._held.clear()
        self._views.clear()
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def _claim(self, keep: set[tuple[str, int]]) -> int:
        """A free slot, else the least recently used one no expert of this step holds."""
        if self._free:
            return self._free.pop()
        victim = next(key for key in self._held if key not in keep)  # exists: len(keep) <= slots
        slot = self._held.pop(victim)
        self._views.pop(slot, None)
        return slot

    def _copy_in(self, source: ExpertWeights, expert: int, slot: int) -> None:
        layout = self._layout(source, expert)
        fault_in(source.pages(expert), exact=True)  # read from disk exactly, if not in RAM
        row = self._buffer[slot]
        views: Parts = {target: {expert: ()} for target in source.parts}
        for target, tensor, offset in layout:
            view = row[offset : offset + _nbytes(tensor)].view(tensor.dtype).view(tensor.shape)
            views[target][expert] += (view,)
            if not self._cuda:
                view.copy_(tensor)
        if self._cuda:
            r, data = self._stage(layout)
            row[: data.numel()].copy_(data, non_blocking=True)
            self._ring_done[r].record()  # the ring buffer is free again once this has run
        self._views[slot] = views
        self.stats.copied += sum(_nbytes(t) for _, t, _ in layout)

    def _layout(self, source: ExpertWeights, expert: int) -> list[tuple[str, torch.Tensor, int]]:
        """(target, tensor, byte offset in a slot) of each of the expert's tensors, in order."""
        layout, offset = [], 0
        for target, per in source.parts.items():
            for tensor in per[expert]:
                if offset + _nbytes(tensor) > self.size:
                    raise ValueError(f"expert {expert} needs more than the {self.size}-byte slot")
                layout.append((target, tensor, offset))
                offset += _aligned(_nbytes(tensor))
        return layout

    def _stage(self, layout: list[tuple[str, torch.Tensor, int]]) -> tuple[int, torch.Tensor]:
        """The expert's bytes laid out as in a slot, in the next page-locked ring buffer
        (once its previous copy to the device has finished)."""
        if not self._ring:
            for _ in range(RING):
                buffer = torch.empty(self.size, dtype=torch.uint8)
                if pin(buffer):
                    self._pinned.append(buffer)
                self._ring.append(buffer)
                self._ring_done.append(torch.cuda.Event())  # type: ignore[no-untyped-call]
        r, self._next = self._next, (self._next + 1) % RING
        self._ring_done[r].synchronize()
        ring = self._ring[r]
        for _, tensor, offset in layout:
            flat = torch.as_strided(tensor.detach(), (tensor.numel(),), (1,)).view(torch.uint8)
            ring[offset : offset + flat.numel()].copy_(flat)
        _, last, end = layout[-1]
        return r, ring[: end + _nbytes(last)]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def install(
    modules: Sequence[tuple[str, torch.nn.Module]], device: torch.device, slots: int
) -> ExpertCache | None:
    """One pool of `slots` on `device` for these experts modules (name, module): each computes
    there from the pool when its tokens arrive on `device`. None if none of them has weights
    to copy (neither per-expert pieces nor loaded fused parameters)."""
    sources = []
    for name, module in modules:
        source = module.__dict__.get(EXPERTS_ATTR) or ExpertWeights.of_fused(module)
        if source is not None:
            sources.append((name, module, source))
    if not sources:
        return None
    size = max(slot_bytes(s, e) for _, _, s in sources for e in range(s.count))
    cache = ExpertCache(device, size, slots)
    for name, module, source in sources:
        module.__dict__[CACHE_ATTR] = (cache, name, source)
    return cache


def uninstall(model: torch.nn.Module) -> None:
    """Close every pool `install` gave `model`'s experts modules and detach them."""
    caches = {}
    for module in model.modules():
        held = module.__dict__.pop(CACHE_ATTR, None)
        if held is not None:
            caches[id(held[0])] = held[0]
    for cache in caches.values():
        cache.close()
