"""One forward of the model on meta tensors, watched: the order its blocks run in, the block
each loose tensor goes with, and what each block writes into the generation cache.

Meta ops cost no memory and little time, so the skeleton learns from the model's own code
what no config states uniformly: execution order, where a bare parameter is used, and the
cache of every layer kind (attention K/V growing per token; the constant recurrent state of
Mamba, RWKV and linear-attention layers), measured at two prompt lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SHORT, LONG = 8, 16  # prompt tokens of the two measuring forwards
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache_params", "layer_past", "state")


@dataclass(frozen=True)
class Part:
    """A block before sizing: a module (or one tensor of a module) and where it sits."""

    name: str
    module: torch.nn.Module  # the module it is, or the module owning its single tensor
    tensor: str | None  # set when the block is one direct tensor of a module holding units
    no_split: bool
    # a piece of a no-split unit cut around its routed experts (an MoE layer): the unit
    layer: torch.nn.Module | None = None
    experts: bool = False  # the unit's routed experts


@dataclass(frozen=True)
class CacheUse:
    """What one block keeps in the generation cache, per sequence."""

    per_token: int  # bytes per token (K/V)
    state: int  # bytes whatever the context (recurrent and convolution states)


@dataclass
class Trace:
    calls: list[str]  # module parts in first-call order
    anchors: dict[str, str]  # loose part -> block it goes with
    cache: dict[str, CacheUse] = field(default_factory=dict)  # empty: not measured


class MetaScalars(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Answers the data-dependent questions a forward asks of meta tensors.

    `.item()` / `bool()` on meta returns 1 / True (masks "all ones", checks pass), and
    `nonzero` returns no rows (MoE routing selects no expert). Only the call order matters.
    `watch` (id(tensor) -> name): `on_use(name)` when an op first takes that tensor.
    """

    def __init__(
        self, watch: dict[int, str] | None = None, on_use: Callable[[str], None] | None = None
    ):
        super().__init__()  # type: ignore[no-untyped-call]
        self.watch = dict(watch or {})
        self.on_use = on_use

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.watch:
            self._saw(args, kwargs)
        aten = torch.ops.aten
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device.type == "meta":
            if func is aten._local_scalar_dense.default:
                return True if first.dtype == torch.bool else 1
            if func is aten.nonzero.default:
                return torch.empty((0, first.dim()), dtype=torch.long, device="meta")
        return func(*args, **(kwargs or {}))

    def _saw(self, args: Any, kwargs: Any) -> None:
        for value in [*args, *(kwargs or {}).values()]:
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if not isinstance(tensor, torch.Tensor):
                    continue
                name = self.watch.pop(id(tensor), None)
                if name is not None and self.on_use is not None:
                    self.on_use(name)


def trace(
    build: Callable[[], torch.nn.Module],
    find: Callable[[torch.nn.Module], list[Part]],
    config: Any,
) -> Trace | None:
    """The first way of tracing that works, or None when the model cannot run on meta.

    Each attempt runs on a fresh scratch build (`build()`; `find` cuts it into parts): a
    forward may install hooks (transformers' output capturing) and the trace sets eager
    MoE experts, neither of which may stay on the skeleton's model. Stacks of layers are
    first cut to one layer of each kind (meta ops run in Python: 80 full layers cost
    ~0.3 s), then run whole; with image inputs where the config describes images, then
    text only; with the cache (measured), then without (order only).
    """
    for pixels in (True, False) if _has_images(config) else (False,):
        for shorten in (True, False):
            for measure in (True, False):
                try:
                    return _attempt(build, find, config, pixels, shorten, measure)
                except Exception:  # any failure on meta: try the next way
                    continue
    return None


def _attempt(
    build: Callable[[], torch.nn.Module],
    find: Callable[[torch.nn.Module], list[Part]],
    config: Any,
    pixels: bool,
    shorten: bool,
    measure: bool,
) -> Trace:
    scratch = build()
    parts = find(scratch)  # before any stack is cut: the real names
    first = _Run(scratch, parts, config, shorten=shorten)
    first.forward(trace_inputs(config, SHORT, pixels=pixels), use_cache=measure)
    result = Trace(first.calls, first.anchors())
    first.close()
    if measure:  # the same scratch again, at another length: what grows is per token
        second = _Run(scratch, parts, config, shorten=shorten, stacks=first.stacks)
        second.forward(trace_inputs(config, LONG, pixels=pixels), use_cache=True)
        result.cache = _cache_uses(first.grown, second.grown)
        second.close()
    return result


def _cache_uses(short: dict[str, int], long: dict[str, int]) -> dict[str, CacheUse]:
    """Bytes grown per block at SHORT and LONG tokens -> per-token and constant parts."""
    uses = {}
    for name in short.keys() | long.keys():
        a, b = short.get(name, 0), long.get(name, 0)
        per_token = max(0, (b - a) // (LONG - SHORT))
        uses[name] = CacheUse(per_token=per_token, state=max(0, a - per_token * SHORT))
    return uses


class _Run:
    """One watched forward of a scratch model (mutated: hooks, cut stacks)."""

    def __init__(
        self,
        scratch: torch.nn.Module,
        parts: list[Part],
        config: Any,
        *,
        shorten: bool,
        stacks: list[_Stack] | None = None,
    ):
        self.scratch, self.config = scratch, config
        self.modules = {p.name: p for p in parts if p.tensor is None}
        self.watch = {id(getattr(p.module, p.tensor)): p.name for p in parts if p.tensor}
        self.calls: list[str] = []
        self.used_after: dict[str, int] = {}  # loose part -> blocks called before its use
        self.grown: dict[str, int] = {}  # block -> cache bytes it added
        self._caches: dict[int, Any] = {}
        self._found: dict[int, int] = {}  # id(cache) -> bytes it held when first seen
        self._receivers: dict[int, set[str]] = {}  # id(cache) -> blocks it was passed to
        self._before: dict[str, int] = {}
        self._seen: set[str] = set()
        units = {id(p.module) for p in parts if p.no_split}
        units |= {id(p.layer) for p in parts if p.layer is not None}
        self.stacks = _cut_stacks(scratch, units, shorten) if stacks is None else stacks
        self._handles = [
            handle
            for part in self.modules.values()
            for handle in (
                part.module.register_forward_pre_hook(self._pre(part.name), with_kwargs=True),
                part.module.register_forward_hook(self._post(part.name)),
            )
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def forward(self, inputs: dict[str, torch.Tensor], *, use_cache: bool) -> None:
        can_set_experts = getattr(self.scratch, "_can_set_experts_implementation", None)
        if can_set_experts is not None and can_set_experts():
            self.scratch.set_experts_implementation("eager")  # type: ignore[operator]  # grouped_mm: bf16 only
        with torch.no_grad(), MetaScalars(self.watch, self._used):
            self.scratch(**inputs, use_cache=use_cache)
        for stack in self.stacks:
            stack.expand(self)
        self._share_preallocated()

    def _share_preallocated(self) -> None:
        """A cache filled before any block saw it (RWKV allocates every layer's state up
        front) is shared out evenly among the blocks it was passed to."""
        for key, found in self._found.items():
            receivers = sorted(self._receivers[key])
            for name in receivers:
                self.grown[name] = self.grown.get(name, 0) + found // len(receivers)

    def _used(self, name: str) -> None:
        self.used_after.setdefault(name, len(self.calls))

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            if name not in self._seen:
                self._seen.add(name)
                self.calls.append(name)
            for cache in _caches_in(args, kwargs):
                if id(cache) not in self._caches:
                    self._caches[id(cache)] = cache
                    self._found[id(cache)] = _tensor_bytes(cache, set(), 0)
                self._receivers.setdefault(id(cache), set()).add(name)
            self._before[name] = self._cache_bytes()

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            grown = self._cache_bytes() - self._before.pop(name, 0)
            self.grown[name] = self.grown.get(name, 0) + grown

        return hook

    def _cache_bytes(self) -> int:
        seen: set[int] = set()
        return sum(_tensor_bytes(cache, seen, 0) for cache in self._caches.values())

    def anchors(self) -> dict[str, str]:
        """Each loose tensor's block: the last one called before the first op that takes it
        (the block whose output it meets: BART's final_logits_bias after lm_head), or, used
        before any block ran, the first one."""
        calls = self.calls
        return {n: calls[c - 1] if c else calls[0] for n, c in self.used_after.items() if calls}


@dataclass
class _Stack:
    """A ModuleList of no-split units cut to `kept` (one layer of each kind) for the trace."""

    prefix: str
    size: int
    kept: list[int]
    kinds: list[int]  # per layer: the kept position whose kind it has

    def expand(self, run: _Run) -> None:
        """Calls, uses and cache of the whole stack, from those of its kept layers (a kept
        layer may be one block, or the pieces of an MoE layer: `prefix.i.mlp.experts`)."""
        kept = [f"{self.prefix}.{i}" for i in self.kept]

        def layer_of(name: str) -> int | None:
            for j, stem in enumerate(kept):
                if name == stem or name.startswith(stem + "."):
                    return j
            return None

        stack_calls = [n for n in run.calls if layer_of(n) is not None]
        at = run.calls.index(stack_calls[0])  # IndexError if it did not run: full trace
        segments: list[list[str]] = [[] for _ in kept]
        for name in stack_calls:
            segments[layer_of(name) or 0].append(name)  # type: ignore[index]
        whole = [
            self._renamed(name, kept[self.kinds[i]], i)
            for i in range(self.size)
            for name in segments[self.kinds[i]]
        ]
        run.calls = [n for n in run.calls if layer_of(n) is None]
        run.calls[at:at] = whole
        for name, count in run.used_after.items():
            if count > at:
                run.used_after[name] = count + len(whole) - len(stack_calls)
        grown = dict(run.grown)
        for i in range(self.size):
            for name in segments[self.kinds[i]]:
                run.grown[self._renamed(name, kept[self.kinds[i]], i)] = grown.get(name, 0)
        for receivers in run._receivers.values():
            if any(layer_of(n) is not None for n in receivers):
                receivers.update(whole)

    def _renamed(self, name: str, stem: str, i: int) -> str:
        """`prefix.j.rest` of kept layer j as the same piece of layer i."""
        return f"{self.prefix}.{i}{name[len(stem) :]}"


def _cut_stacks(module: torch.nn.Module, unit_ids: set[int], shorten: bool) -> list[_Stack]:
    if not shorten:
        return []
    stacks = []
    for parent, attr, layers, prefix in _unit_stacks(module, unit_ids):
        kinds: list[int] = []
        kept: list[int] = []
        signatures: list[tuple[str, ...]] = []
        for i, layer in enumerate(layers):
            signature = _signature(layer)
            if signature not in signatures or len(kept) < 2:
                kept.append(i)
                signatures.append(signature)
            kinds.append(signatures.index(signature) if signature in signatures else 0)
        if len(kept) == len(layers):
            continue
        parent._modules[attr] = torch.nn.ModuleList([layers[i] for i in kept])
        stacks.append(_Stack(prefix, len(layers), kept, kinds))
    return stacks


def _signature(layer: torch.nn.Module) -> tuple[str, ...]:
    """What makes two layers of a stack alike: their submodules' names and classes."""
    return tuple(f"{name}:{type(sub).__name__}" for name, sub in layer.named_modules())


def _unit_stacks(
    module: torch.nn.Module, unit_ids: set[int], prefix: str = ""
) -> list[tuple[torch.nn.Module, str, torch.nn.ModuleList, str]]:
    """(parent, attribute, list, prefix) of every ModuleList of 3+ modules that are all units."""
    stacks = []
    for attr, child in module.named_children():
        name = f"{prefix}.{attr}" if prefix else attr
        if isinstance(child, torch.nn.ModuleList) and _all_units(child, unit_ids):
            stacks.append((module, attr, child, name))
            continue
        stacks += _unit_stacks(child, unit_ids, name)
    return stacks


def _all_units(stack: torch.nn.ModuleList, unit_ids: set[int]) -> bool:
    return len(stack) > 2 and all(id(m) in unit_ids for m in stack)


# --- caches ----------------------------------------------------------------------------


def _caches_in(args: Any, kwargs: Any) -> Iterator[Any]:
    """Cache objects a block receives: transformers Caches anywhere among its arguments, and
    whatever is passed as a cache keyword (RWKV's `state` list)."""
    from transformers.cache_utils import Cache

    for value in [*args, *kwargs.values()]:
        if isinstance(value, Cache):
            yield value
    for key in _CACHE_KWARGS:
        value = kwargs.get(key)
        if value is not None and not isinstance(value, Cache) and _holds_tensors(value):
            yield value


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)


def _tensor_bytes(value: Any, seen: set[int], depth: int) -> int:
    """Bytes of the tensors reachable from `value` (a Cache, its layers, dicts, lists)."""
    if depth > 6 or id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):  # scalars are bookkeeping (a window's length)
        return value.numel() * value.element_size() if value.dim() else 0
    if isinstance(value, dict):
        items: Sequence[Any] = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = value
    elif type(value).__module__.startswith("transformers"):
        items = list(vars(value).values())
    else:
        return 0
    return sum(_tensor_bytes(item, seen, depth + 1) for item in items)


# --- inputs ----------------------------------------------------------------------------


def _has_images(config: Any) -> bool:
    vision = getattr(config, "vision_config", None)
    return vision is not None and bool(getattr(vision, "image_size", None))


def trace_inputs(
    config: Any, tokens: int = SHORT, *, pixels: bool = True
) -> dict[str, torch.Tensor]:
    """Meta inputs: input_ids [1, tokens]; decoder ids and pixels where the model takes them."""
    ids = torch.zeros((1, tokens), dtype=torch.long, device="meta")  # [B, T]
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    if pixels and _has_images(config):
        vision = config.vision_config
        size, channels = vision.image_size, getattr(vision, "num_channels", 3)
        if isinstance(size, (list, tuple)):
            size = size[0]
        inputs["pixel_values"] = torch.zeros((1, channels, size, size), device="meta")
    return inputs
