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

import contextlib
import copy
import os
import re
from collections.abc import Callable, Container, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from ..errors import ConfigError, DevicemapError
from .checkpoint import ModelSource, resolve_model
from .config import (
    fingerprint_config,
    load_config,
    max_positions,
    model_class,
    parse_dtype,
)
from .init import initialize, runtime_buffers, with_owner
from .memory import (
    act_bytes_per_token,
    audio_tokens,
    block_kv,
    image_tokens,
    kv_layers,
    largest_image_side,
    logits_bytes_per_token,
)
from .trace import Part, Trace, trace

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
    # a loose tensor (a parameter or buffer directly on a module that holds blocks, like
    # BART's final_logits_bias): the block it goes with, kept on that block's execution device
    anchor: str | None = None
    state_bytes: int = 0  # recurrent state per sequence, whatever the context (Mamba, RWKV)
    # tokens it processes per image (a vision tower's patches, every crop) or per audio clip
    # (an audio encoder's frames): its workspace is counted at these, not at the prompt
    image_tokens: int = 0  # -1: a vision tower that does not say its image size
    audio_tokens: int = 0
    # a piece of an MoE layer cut around its routed experts: the layer's module prefix
    # ("model.layers.3"); the pieces that are not the experts (attention, norms, router,
    # shared experts) are that layer's dense part and always share a device
    layer: str | None = None
    experts: bool = False  # the layer's routed experts (stored anywhere, computed there)
    expert_count: int = 0  # how many routed experts that block holds

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert (the slot an expert cache gives it)."""
        return self.nbytes // self.expert_count if self.expert_count else 0

    @property
    def loose(self) -> bool:
        return self.anchor is not None


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
    # classes of routed experts not computed through transformers' experts interface
    # (DBRX, JetMoE, Llama 4...): their layers are placed whole
    whole_moe: tuple[str, ...] = ()


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
    module = _built(cls, config, plan_dtype, source)
    units = set(getattr(module, "_no_split_modules", None) or ()) | set(no_split)
    parts = find_parts(module, units)
    scratch = lambda: build_on_meta(cls, copy.deepcopy(config), plan_dtype)  # noqa: E731
    parts, order, found = order_parts(parts, scratch, units, config)
    materialize_buffers(module)
    blocks = make_blocks(module, parts, config, plan_dtype, found, source.root)
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
        whole_moe=unsplit_experts(parts),
    )


# --- the meta build -----------------------------------------------------------


def _built(cls: type, config: Any, dtype: torch.dtype, source: ModelSource) -> torch.nn.Module:
    """build_on_meta, with what the model's own constructor refuses (a value the config
    checks let through: an activation name, a padding id past the vocabulary, a rope
    setting) reported as ConfigError naming config.json."""
    try:
        return build_on_meta(cls, config, dtype)
    except DevicemapError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AssertionError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConfigError(
            f"{source.config_path}: {cls.__name__} cannot be built from this config"
            f" ({type(exc).__name__}: {reason}); check the values it names against the"
            " model's original config.json"
        ) from exc


def build_on_meta(cls: type, config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """`cls(config)` with every tensor on meta, at `dtype`, keep-in-fp32 modules in fp32."""
    from transformers import initialization

    # as from_pretrained builds (meta, linspace on CPU for custom code), minus the
    # initialisers, which only cost time on meta tensors
    safe_ops = getattr(initialization, "meta_device_safe_creation_ops", contextlib.nullcontext)
    with torch.device("meta"), initialization.no_init_weights(), safe_ops():
        module: torch.nn.Module = cls._from_config(config, dtype=dtype)  # type: ignore[attr-defined]
    tie = getattr(module, "tie_weights", None)
    if tie is not None:  # what post_init does on meta, which no_init_weights skipped
        tie()
    to_meta_weights(module)
    keep_fp32(module, dtype)
    return module.eval()


def to_meta_weights(module: torch.nn.Module) -> None:
    """Parameters and persistent buffers made off meta anyway (a model calling
    `torch.normal(..., size=...)`, which takes no device from the context) go to meta: the
    checkpoint fills them."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and not param.is_meta:
                meta = torch.empty_like(param, device="meta")
                sub._parameters[name] = torch.nn.Parameter(meta, param.requires_grad)
        for name, buffer in sub._buffers.items():
            persistent = name not in sub._non_persistent_buffers_set
            if buffer is not None and persistent and not buffer.is_meta:
                sub._buffers[name] = torch.empty_like(buffer, device="meta")


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
    """Compute the non-persistent buffers (rotary inv_freq, position_ids, masks) on CPU, as
    `from_pretrained` does (init.py); parameters stay on meta."""
    names = []
    for prefix, sub in module.named_modules():
        for leaf in runtime_buffers(sub):
            buffer = sub._buffers[leaf]
            assert buffer is not None
            sub._buffers[leaf] = torch.empty_like(buffer, device="cpu")
            names.append(f"{prefix}.{leaf}" if prefix else leaf)
    initialize(module, names)


# --- blocks -------------------------------------------------------------------


def find_parts(module: torch.nn.Module, units: set[str]) -> list[Part]:
    """No-split units and the maximal unit-free subtrees holding tensors, in registration order."""
    contains: dict[int, bool] = {}
    _mark_units(module, units, contains)
    parts: list[Part] = []
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
    parts: list[Part],
) -> None:
    if prefix and type(module).__name__ in units:
        pieces = expert_pieces(module, prefix)
        parts.extend(pieces or [Part(prefix, module, None, no_split=True)])
        return
    if prefix and not contains[id(module)]:
        if _has_tensors(module):
            parts.append(Part(prefix, module, None, no_split=False))
        return
    # holds units (or is the root): its own tensors become blocks, its children are visited
    direct = [*module._parameters.items(), *module._buffers.items()]
    for name, tensor in direct:
        if tensor is not None:
            parts.append(Part(_join(prefix, name), module, name, no_split=False))
    for name, child in module.named_children():
        _collect(child, _join(prefix, name), units, contains, parts)


def is_experts(module: torch.nn.Module) -> bool:
    """Routed experts transformers computes through its experts interface (a class decorated
    with `use_experts_implementation`: 3-D expert weights, one function for all of them)."""
    return hasattr(module, "is_concatenated") and hasattr(type(module), "_apply_gate")


def unsplit_experts(parts: list[Part]) -> tuple[str, ...]:
    """Class names of modules that look like routed experts (an `experts` submodule, or a
    class named *Experts*) inside whole no-split layers: devicemap cannot compute them one
    by one, so those layers stay whole."""
    found = set()
    for part in parts:
        if not part.no_split:
            continue
        for name, sub in part.module.named_modules():
            kind = type(sub).__name__
            if name.rsplit(".", 1)[-1] == "experts" or "Experts" in kind:
                found.add(kind)
    return tuple(sorted(found))


def expert_pieces(layer: torch.nn.Module, prefix: str) -> list[Part] | None:
    """An MoE layer cut so its routed experts are a block of their own: the experts module,
    and around it every sibling on the way down (attention, norms, router, shared experts)
    as blocks, direct tensors on the way as loose ones. None for a layer without experts."""
    targets = {id(m) for m in layer.modules() if is_experts(m)}
    if not targets:
        return None
    pieces: list[Part] = []
    _around(layer, prefix, targets, layer, pieces)
    return pieces


def _around(
    module: torch.nn.Module, prefix: str, targets: set[int], layer: torch.nn.Module,
    pieces: list[Part],
) -> None:  # fmt: skip
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if tensor is not None:
            pieces.append(Part(_join(prefix, name), module, name, no_split=False, layer=layer))
    for name, child in module.named_children():
        path = _join(prefix, name)
        if id(child) in targets:
            pieces.append(Part(path, child, None, no_split=False, layer=layer, experts=True))
        elif any(id(m) in targets for m in child.modules()):
            _around(child, path, targets, layer, pieces)
        elif _has_tensors(child):
            pieces.append(Part(path, child, None, no_split=False, layer=layer))


def _has_tensors(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def make_blocks(
    module: torch.nn.Module,
    parts: list[Part],
    config: Any,
    dtype: torch.dtype,
    found: Trace | None = None,
    root: Path | None = None,
) -> tuple[Block, ...]:
    """Blocks in `parts` order: state_dict keys, bytes (each tensor once), memory per token;
    loose tensors with the block each goes with. The cache each block keeps is what the
    traced forward measured; without a trace, the config's formula (memory.py)."""
    anchors = {**_nearest_anchors(parts), **(found.anchors if found else {})}
    measured = found.cache if found else {}
    keys = _keys_by_part(module, parts)
    seen: set[int] = set()  # ids of tensors already counted (ties count once)
    owners = _config_owners(module)
    kv = kv_layers(config, dtype)
    images = _image_tokens(owners, config, root)
    layers = {id(m): name for name, m in module.named_modules()}  # a cut layer's prefix
    blocks = []
    for part in parts:
        cfg = owners.get(id(part.module), config)
        kv_bytes, window = (0, None) if part.tensor is not None else block_kv(part.module, kv)
        use = measured.get(part.name)
        in_layer = part.no_split or (part.layer is not None and part.tensor is None)
        blocks.append(
            Block(
                name=part.name,
                params=tuple(keys[part.name]),
                nbytes=_count_bytes(_tensors(part), seen),
                no_split=part.no_split,
                kv_bytes_per_token=use.per_token if use is not None else kv_bytes,
                kv_window=window,
                act_bytes_per_token=act_bytes_per_token(cfg, dtype, layer=in_layer),
                anchor=anchors[part.name] if part.tensor is not None else None,
                state_bytes=use.state if use is not None else 0,
                image_tokens=images.get(id(cfg), 0) if part.no_split else 0,
                audio_tokens=audio_tokens(cfg) if part.no_split and cfg is not config else 0,
                layer=layers.get(id(part.layer)) if part.layer is not None else None,
                experts=part.experts,
                expert_count=_expert_count(part.module) if part.experts else 0,
            )
        )
    return tuple(blocks)


def _expert_count(module: torch.nn.Module) -> int:
    """Routed experts in an experts module: its `num_experts`, else its 3-D weights' first dim."""
    count = getattr(module, "num_experts", None)
    if isinstance(count, int) and count > 0:
        return count
    shapes = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3]
    return int(shapes[0]) if shapes else 0


def _image_tokens(owners: dict[int, Any], config: Any, root: Path | None) -> dict[int, int]:
    """id(vision config) -> patches per image; -1 for a vision tower whose config does not
    say how large its images are (dynamic resolution) and whose processor config does not
    either: the planner then needs --images 0, or an image_size."""
    sized: dict[int, int] = {}
    for cfg in {id(c): c for c in owners.values()}.values():
        if cfg is config:
            continue
        tokens = image_tokens(cfg, config)
        if tokens is None:
            side = largest_image_side(root)
            patch = image_tokens(cfg, config, side=side) if side else None
            tokens = -1 if patch is None else patch
        if tokens:
            sized[id(cfg)] = tokens
    return sized


def _nearest_anchors(parts: list[Part]) -> dict[str, str]:
    """Loose part -> the next module part in `parts` order (else the previous one)."""
    modules = [i for i, p in enumerate(parts) if p.tensor is None]
    anchors = {}
    for i, part in enumerate(parts):
        if part.tensor is not None and modules:
            after = [j for j in modules if j > i]
            anchors[part.name] = parts[after[0] if after else modules[-1]].name
    return anchors


def _config_owners(module: torch.nn.Module) -> dict[int, Any]:
    """id(module) -> the config of its nearest enclosing transformers model (VLM sub-configs)."""
    from transformers import PreTrainedModel

    return {
        id(sub): owner.config
        for owner, sub in with_owner(module, PreTrainedModel)
        if owner is not None
    }


def _keys_by_part(module: torch.nn.Module, parts: list[Part]) -> dict[str, list[str]]:
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


def _tensors(part: Part) -> list[torch.Tensor]:
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


def order_parts(
    parts: list[Part], build: Callable[[], torch.nn.Module], units: set[str], config: Any
) -> tuple[list[Part], Literal["forward", "registration"], Trace | None]:
    """Parts in the order a forward on meta tensors first calls them (trace.py), uncalled
    ones last, each loose tensor right after its block; registration order if the model
    cannot run on meta."""
    found = trace(build, lambda scratch: find_parts(scratch, units), config)
    if found is None:
        return parts, "registration", None
    first: dict[str, float] = {name: i for i, name in enumerate(found.calls)}
    for loose, anchor in found.anchors.items():
        first[loose] = first.get(anchor, len(found.calls)) + 0.5  # right after its block
    ranked = sorted(enumerate(parts), key=lambda ip: (first.get(ip[1].name, len(first)), ip[0]))
    return [p for _, p in ranked], "forward", found


# --- ties and the output ------------------------------------------------------


def tied_groups(module: torch.nn.Module, parts: list[Part]) -> tuple[tuple[str, ...], ...]:
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


def output_block(module: torch.nn.Module, parts: list[Part]) -> str | None:
    """The block holding `get_output_embeddings()` (the LM head), if the model has one."""
    get = getattr(module, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return None
    for part in parts:
        if part.module is head or any(m is head for m in part.module.modules()):
            return part.name
    return None
