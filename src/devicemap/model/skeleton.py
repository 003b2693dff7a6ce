"""The model built on the meta device, cut into placeable blocks in execution order.

`build_skeleton` loads a config with transformers, builds the model class named in
its `architectures` on the meta device (parameters have shape and dtype, no data),
makes the non-persistent buffers (rotary `inv_freq`, `position_ids`) real on CPU,
and cuts the module tree into blocks: the no-split units (decoder layers) and the
loose modules between them. A forward pass on meta tensors records the order the
blocks run in. Sizes and ties come from the same build; the per-token memory of each
block (KV cache, activations, logits) from memory.py.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Container, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .checkpoint import ModelSource, resolve_model
from .config import (
    fingerprint_config,
    load_config,
    max_positions,
    model_class,
    parse_dtype,
)
from .memory import act_bytes_per_token, block_kv, kv_layers, logits_bytes_per_token

H = TypeVar("H", bound=Hashable)


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
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    config = load_config(source, trust_remote_code=trust_remote_code)
    fingerprint = fingerprint_config(config)  # before the build writes the dtype into it
    plan_dtype = parse_dtype(dtype, config)
    cls = model_class(config, source, trust_remote_code=trust_remote_code)
    module = build_on_meta(cls, config, plan_dtype)
    units = set(getattr(module, "_no_split_modules", None) or ()) | set(no_split)
    parts = find_parts(module, units)
    scratch = lambda: build_on_meta(cls, copy.deepcopy(config), plan_dtype)  # noqa: E731
    parts, order = order_parts(parts, scratch, units, config)
    materialize_buffers(module)
    blocks = make_blocks(module, parts, config, plan_dtype)
    return Skeleton(
        model=module,
        config=config,
        source=source,
        dtype=plan_dtype,
        blocks=blocks,
        order=order,
        tied=tied_groups(module, parts),
        output_block=output_block(module, parts),
        logits_bytes_per_token=logits_bytes_per_token(config),
        max_positions=max_positions(config),
        fingerprint=fingerprint,
    )


# --- the meta build -----------------------------------------------------------


def build_on_meta(cls: type, config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """`cls(config)` with every tensor on meta, at `dtype`, keep-in-fp32 modules in fp32."""
    with torch.device("meta"):
        module: torch.nn.Module = cls._from_config(config, dtype=dtype)  # type: ignore[attr-defined]
    keep_fp32(module, dtype)
    return module.eval()


def keep_fp32(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give parameters that transformers loads in fp32 (its keep-in-fp32 plan) the fp32 dtype.

    transformers 5 keeps `_keep_in_fp32_modules` in fp32 only when loading in fp16, and
    `_keep_in_fp32_modules_strict` in fp32 under fp16 and bf16; patterns match by search.
    """
    get_plan = getattr(module, "_get_dtype_plan", None)
    patterns = list(get_plan(dtype)) if get_plan is not None else []
    if not patterns:
        return
    pattern = re.compile("|".join(p.replace("*", ".*") for p in patterns))
    for name, param in module.named_parameters():
        if pattern.search(name) and param.is_floating_point():
            param.data = param.data.to(torch.float32)


def materialize_buffers(module: torch.nn.Module) -> None:
    """Recompute the non-persistent buffers (rotary inv_freq, position_ids) on CPU.

    They are not in checkpoints, so the loader needs their values. Each module that owns
    one gets fresh CPU buffers and is re-initialised by the `_init_weights` of its nearest
    transformers model (as `from_pretrained` does); its parameters stay on meta.
    """
    from transformers import PreTrainedModel

    with torch.no_grad():
        for owner, sub in _modules_with_owner(module, PreTrainedModel):
            names = [n for n in sub._non_persistent_buffers_set if sub._buffers.get(n) is not None]
            for name in names:
                buffer = sub._buffers[name]
                assert buffer is not None
                sub._buffers[name] = torch.empty_like(buffer, device="cpu")
            if names and owner is not None:
                owner._init_weights(sub)


def _modules_with_owner(
    module: torch.nn.Module, owner_type: type, owner: Any = None
) -> Iterator[tuple[Any, torch.nn.Module]]:
    """Every module with the nearest enclosing `owner_type` module (itself included)."""
    owner = module if isinstance(module, owner_type) else owner
    yield owner, module
    for child in module.children():
        yield from _modules_with_owner(child, owner_type, owner)


# --- blocks -------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """A block before sizing: a module (or one tensor of a module) and where it sits."""

    name: str
    module: torch.nn.Module  # the module it is, or the module owning its single tensor
    tensor: str | None  # set when the block is one direct tensor of a module holding units
    no_split: bool


def find_parts(module: torch.nn.Module, units: set[str]) -> list[_Part]:
    """No-split units and the maximal unit-free subtrees holding tensors, in registration order."""
    contains: dict[int, bool] = {}
    _mark_units(module, units, contains)
    parts: list[_Part] = []
    _collect(module, "", units, contains, parts)
    return parts


def _mark_units(module: torch.nn.Module, units: set[str], contains: dict[int, bool]) -> bool:
    """Fill `contains[id(m)]`: does m's subtree hold a no-split unit (m itself included)?"""
    found = type(module).__name__ in units
    for child in module.children():
        found = _mark_units(child, units, contains) or found
    contains[id(module)] = found
    return found


def _collect(
    module: torch.nn.Module,
    prefix: str,
    units: set[str],
    contains: dict[int, bool],
    parts: list[_Part],
) -> None:
    if prefix and type(module).__name__ in units:
        parts.append(_Part(prefix, module, None, no_split=True))
        return
    if prefix and not contains[id(module)]:
        if _has_tensors(module):
            parts.append(_Part(prefix, module, None, no_split=False))
        return
    # holds units (or is the root): its own tensors become blocks, its children are visited
    direct = [*module._parameters.items(), *module._buffers.items()]
    for name, tensor in direct:
        if tensor is not None:
            parts.append(_Part(_join(prefix, name), module, name, no_split=False))
    for name, child in module.named_children():
        _collect(child, _join(prefix, name), units, contains, parts)


def _has_tensors(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def make_blocks(
    module: torch.nn.Module, parts: list[_Part], config: Any, dtype: torch.dtype
) -> tuple[Block, ...]:
    """Blocks in `parts` order: state_dict keys, bytes (each tensor once), memory per token."""
    keys = _keys_by_part(module, parts)
    seen: set[int] = set()  # ids of tensors already counted (ties count once)
    owners = _config_owners(module)
    kv = kv_layers(config, dtype)
    blocks = []
    for part in parts:
        cfg = owners.get(id(part.module), config)
        kv_bytes, window = (0, None) if part.tensor is not None else block_kv(part.module, kv)
        blocks.append(
            Block(
                name=part.name,
                params=tuple(keys[part.name]),
                nbytes=_count_bytes(_tensors(part), seen),
                no_split=part.no_split,
                kv_bytes_per_token=kv_bytes,
                kv_window=window,
                act_bytes_per_token=act_bytes_per_token(cfg, dtype, layer=part.no_split),
            )
        )
    return tuple(blocks)


def _config_owners(module: torch.nn.Module) -> dict[int, Any]:
    """id(module) -> the config of its nearest enclosing transformers model (VLM sub-configs)."""
    from transformers import PreTrainedModel

    return {
        id(sub): owner.config
        for owner, sub in _modules_with_owner(module, PreTrainedModel)
        if owner is not None
    }


def _keys_by_part(module: torch.nn.Module, parts: list[_Part]) -> dict[str, list[str]]:
    """state_dict key -> the block whose prefix it has; every key lands in exactly one block."""
    keys: dict[str, list[str]] = {p.name: [] for p in parts}
    orphans = []
    for key in module.state_dict(keep_vars=True):
        owner = _owner(key, keys)
        if owner:
            keys[owner].append(key)
        else:
            orphans.append(key)
    assert not orphans, f"state_dict keys in no block: {orphans}"
    return keys


def _owner(key: str, names: Container[str]) -> str:
    """The block owning `key`: its longest prefix (itself included) in `names`; "" if none."""
    prefix = key
    while prefix not in names and "." in prefix:
        prefix = prefix.rsplit(".", 1)[0]
    return prefix if prefix in names else ""


def _tensors(part: _Part) -> list[torch.Tensor]:
    if part.tensor is not None:
        tensor = getattr(part.module, part.tensor)
        return [tensor]
    params = [p for _, p in part.module.named_parameters(remove_duplicate=False)]
    buffers = [b for _, b in part.module.named_buffers(remove_duplicate=False)]
    return params + buffers


def _count_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the tensors not yet in `seen` (at the dtype they were built with)."""
    total = 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


# --- execution order ----------------------------------------------------------


class _MetaScalars(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Answers the data-dependent questions a forward asks of meta tensors.

    `.item()` / `bool()` on meta returns 1 / True (masks "all ones", checks pass), and
    `nonzero` returns no rows (MoE routing selects no expert). Only the call order matters.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        aten = torch.ops.aten
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device.type == "meta":
            if func is aten._local_scalar_dense.default:
                return True if first.dtype == torch.bool else 1
            if func is aten.nonzero.default:
                return torch.empty((0, first.dim()), dtype=torch.long, device="meta")
        return func(*args, **(kwargs or {}))


def order_parts(
    parts: list[_Part], build: Callable[[], torch.nn.Module], units: set[str], config: Any
) -> tuple[list[_Part], Literal["forward", "registration"]]:
    """Parts in the order a forward on meta tensors first calls them; uncalled ones last.

    The forward runs on a scratch build (`build()`, with its own config): a forward may
    install hooks (transformers' output capturing) and the trace sets eager MoE experts,
    neither of which may stay on the skeleton's model. It first
    runs with each stack of no-split units cut to its first two (meta ops run in Python:
    80 full layers cost ~0.3 s), then whole; if both fail on meta, registration order.
    """
    for shorten in (True, False):
        scratch = build()
        try:
            called = _called_names(scratch, find_parts(scratch, units), config, shorten=shorten)
        except Exception:  # any failure on meta: try the next way
            continue
        first = {name: i for i, name in enumerate(called)}
        ranked = sorted(enumerate(parts), key=lambda ip: (first.get(ip[1].name, len(first)), ip[0]))
        return [p for _, p in ranked], "forward"
    return parts, "registration"


def _called_names(
    scratch: torch.nn.Module, parts: list[_Part], config: Any, *, shorten: bool
) -> list[str]:
    """Names of `scratch`'s parts in first-call order during one meta forward (mutates it).

    With `shorten`, each ModuleList of three or more no-split units runs only its first two
    and the rest are placed after the second: a stack of layers runs in index order.
    """
    names: dict[int, list[str]] = {}  # id(module) -> parts it carries
    for part in parts:
        names.setdefault(id(part.module), []).append(part.name)
    calls: list[str] = []
    seen: set[int] = set()

    def record(m: torch.nn.Module, args: Any) -> None:
        if id(m) not in seen:
            seen.add(id(m))
            calls.extend(names[id(m)])

    for part in parts:
        part.module.register_forward_pre_hook(record)
    stacks = _unit_stacks(scratch, {id(p.module) for p in parts if p.no_split}) if shorten else []
    for parent, attr, stack, _ in stacks:
        parent._modules[attr] = torch.nn.ModuleList(list(stack)[:2])
    _trace_forward(scratch, config)
    for _, _, stack, prefix in stacks:
        at = calls.index(f"{prefix}.1") + 1  # ValueError if the stack did not run: full trace
        calls[at:at] = [f"{prefix}.{i}" for i in range(2, len(stack))]
    return calls


def _unit_stacks(
    module: torch.nn.Module, unit_ids: set[int], prefix: str = ""
) -> list[tuple[torch.nn.Module, str, torch.nn.ModuleList, str]]:
    """(parent, attribute, list, prefix) of every ModuleList of 3+ modules that are all units."""
    stacks = []
    for attr, child in module.named_children():
        name = _join(prefix, attr)
        if isinstance(child, torch.nn.ModuleList) and _all_units(child, unit_ids):
            stacks.append((module, attr, child, name))
            continue
        stacks += _unit_stacks(child, unit_ids, name)
    return stacks


def _all_units(stack: torch.nn.ModuleList, unit_ids: set[int]) -> bool:
    return len(stack) > 2 and all(id(m) in unit_ids for m in stack)


def _trace_forward(scratch: torch.nn.Module, config: Any) -> None:
    """One forward of `scratch` on meta inputs (`trace_inputs`), MoE experts in eager mode."""
    can_set_experts = getattr(scratch, "_can_set_experts_implementation", None)
    if can_set_experts is not None and can_set_experts():
        scratch.set_experts_implementation("eager")  # type: ignore[operator]  # grouped_mm: bf16 only
    with torch.no_grad(), _MetaScalars():  # type: ignore[no-untyped-call]
        scratch(**trace_inputs(config), use_cache=False)


def trace_inputs(config: Any) -> dict[str, torch.Tensor]:
    """Meta inputs: input_ids [1, 8]; decoder ids and pixels where the model takes them."""
    ids = torch.zeros((1, 8), dtype=torch.long, device="meta")  # [B, T]
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    vision = getattr(config, "vision_config", None)
    if vision is not None and getattr(vision, "image_size", None):
        size, channels = vision.image_size, getattr(vision, "num_channels", 3)
        inputs["pixel_values"] = torch.zeros((1, channels, size, size), device="meta")
    return inputs


# --- ties and the output ------------------------------------------------------


def tied_groups(module: torch.nn.Module, parts: list[_Part]) -> tuple[tuple[str, ...], ...]:
    """Groups of blocks sharing a tensor: transformers' tie mapping plus ties made in __init__."""
    mapping = getattr(module, "all_tied_weights_keys", None) or {}
    keys: list[tuple[str, str]] = list(mapping.items())  # (target, source) state_dict keys
    first_name: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        keys.append((first_name.setdefault(id(param), name), name))
    names = {p.name for p in parts}
    pairs = [(_owner(one, names), _owner(other, names)) for one, other in keys]
    groups = connected_groups(pairs, [p.name for p in parts])
    return tuple(tuple(g) for g in groups if len(g) > 1)


def connected_groups(pairs: Iterable[tuple[H, H]], order: Iterable[H]) -> list[list[H]]:
    """The items of `order` grouped by the `pairs` joining them (pairs naming others are
    ignored): singletons included, each group and the groups in `order` (union-find)."""
    parent = {item: item for item in order}

    def root(item: H) -> H:
        while parent[item] != item:
            parent[item] = parent[parent[item]]  # path halving
            item = parent[item]
        return item

    for a, b in pairs:
        if a in parent and b in parent:
            parent[root(a)] = root(b)
    groups: dict[H, list[H]] = {}
    for item in parent:
        groups.setdefault(root(item), []).append(item)
    return list(groups.values())


def output_block(module: torch.nn.Module, parts: list[_Part]) -> str | None:
    """The block holding `get_output_embeddings()` (the LM head), if the model has one."""
    get = getattr(module, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return None
    for part in parts:
        if part.module is head or any(m is head for m in part.module.modules()):
            return part.name
    return None
