"""Checkpoint tensors -> model tensors: which make which, and a file of converted ones.

transformers 5 renames legacy keys and fuses per-expert MoE weights while it loads
(`conversion_mapping.py`, `core_model_loading.py`). Here the same transforms are
matched against the checkpoint index up front (no data read), checked on meta
tensors, and later run one group of target tensors at a time on lazily read
inputs, so loading never holds more than one group's inputs in RAM.

Converted tensors that live on disk go to one safetensors cache file (cache.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
from transformers import core_model_loading as cml
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.utils.loading_report import LoadStateDictInfo

from ..errors import KeyMismatch
from ..model.checkpoint import CheckpointIndex, TensorInfo

Shape = tuple[int, ...]
Reader = Callable[[TensorInfo], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """How one group of model tensors is made from checkpoint tensors."""

    targets: tuple[str, ...]  # model state_dict keys made together
    shapes: tuple[Shape, ...]  # the shape each target gets (from a dry run on meta tensors)
    inputs: tuple[TensorInfo, ...]  # checkpoint tensors read, in transformers' collection order
    patterns: tuple[str, ...]  # per input: the converter source pattern it feeds
    layer: str  # the name transformers keys the group by (its first target)
    converter: Any = None  # a transformers WeightConverter; None: a 1:1 copy, maybe renamed

    @property
    def is_copy(self) -> bool:
        return self.converter is None

    @property
    def input_bytes(self) -> int:
        return sum(info.nbytes for info in self.inputs)


@dataclass(frozen=True)
class KeyMap:
    """Every model tensor's recipe, and everything that does not line up."""

    recipes: tuple[Recipe, ...]
    missing: tuple[str, ...]  # model keys nothing makes (tied and ignorable keys excluded)
    unexpected: tuple[str, ...]  # checkpoint keys (after renaming) the model has no place for
    mismatched: tuple[tuple[str, Shape, Shape], ...]  # (key, model shape, checkpoint shape)
    failed: tuple[str, ...]  # conversions that cannot run on these inputs, with the reason
    not_loaded: frozenset[str]  # model keys no recipe makes, tied ones included (for tie_weights)
    # model keys the checkpoint lacks that transformers ignores as missing and initialises
    # (Marian's sinusoidal positions): the loader computes them the same way
    regenerated: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.failed)


def map_checkpoint(model: torch.nn.Module, index: CheckpointIndex) -> KeyMap:
    """Match every checkpoint key to the model's keys through transformers' conversion mapping."""
    expected = model.state_dict()  # on meta: names and shapes only
    groups, unexpected = _group_keys(model, index.tensors, expected)
    recipes, mismatched, failed = [], [], []
    for group in groups.values():
        recipe, error = _dry_run(model, group)
        if error is not None:
            failed.append(error)
            continue
        assert recipe is not None
        for target, shape in zip(recipe.targets, recipe.shapes, strict=True):
            if target not in expected:
                unexpected.add(target)
            elif tuple(expected[target].shape) != shape:
                mismatched.append((target, tuple(expected[target].shape), shape))
        recipes.append(recipe)
    made = {t for r in recipes for t in r.targets}
    not_loaded = frozenset(expected.keys() - made)
    untied = set(not_loaded) - _tied_covered(model, made)
    missing, unexpected = _ignorable_removed(model, untied, unexpected)
    order = {key: i for i, key in enumerate(expected)}
    recipes.sort(key=lambda r: min(order.get(t, len(order)) for t in r.targets))
    return KeyMap(
        recipes=tuple(recipes),
        missing=tuple(sorted(missing, key=lambda k: order.get(k, 0))),
        unexpected=tuple(sorted(unexpected, key=cml.dot_natural_key)),
        mismatched=tuple(mismatched),
        failed=tuple(failed),
        not_loaded=not_loaded,
        regenerated=frozenset(untied - missing),
    )


@dataclass
class _Group:
    layer: str  # transformers' key for the group: the (first) renamed target
    converter: Any  # WeightConverter, or None for a renamed 1:1 copy
    inputs: list[TensorInfo]
    patterns: list[str]


def _group_keys(
    model: torch.nn.Module, tensors: Mapping[str, TensorInfo], expected: Mapping[str, torch.Tensor]
) -> tuple[dict[str, _Group], set[str]]:
    """Rename each checkpoint key exactly as `convert_and_load_state_dict_in_model` does."""
    transforms = _conversions(model)
    renamings = [t for t in transforms if isinstance(t, cml.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, cml.WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None) or None
    groups: dict[str, _Group] = {}
    unexpected: set[str] = set()
    for key in sorted(tensors, key=cml.dot_natural_key):  # the order experts are stacked in
        renamed, pattern = cml.rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:  # renamed away from a valid key: undo
            renamed, pattern = cml.rename_source_key(key, [], [], prefix, expected)
        if renamed not in expected:
            if pattern is None:
                unexpected.add(renamed)
            else:
                targets = by_pattern[pattern].target_patterns
                unexpected.update(renamed.replace(targets[0], t) for t in targets)
            continue
        if pattern is None and renamed in groups:  # two checkpoint keys for one tensor
            unexpected.add(key)
            continue
        converter = None if pattern is None else by_pattern[pattern]
        group = groups.setdefault(renamed, _Group(renamed, converter, [], []))
        group.inputs.append(tensors[key])
        group.patterns.append(pattern or key)
    return groups, unexpected


def _conversions(model: torch.nn.Module) -> list[Any]:
    """transformers' transforms for this model (renamings, MoE fusions, legacy names)."""
    if not hasattr(model, "config") or not hasattr(model, "base_model_prefix"):
        return []  # a plain torch module: checkpoint keys are state_dict keys
    return list(get_model_conversion_mapping(model))


def _dry_run(model: torch.nn.Module, group: _Group) -> tuple[Recipe | None, str | None]:
    """The group's targets and shapes, from running its conversion on meta tensors."""
    recipe = Recipe(
        targets=(group.layer,),
        shapes=(tuple(group.inputs[0].shape),),
        inputs=tuple(group.inputs),
        patterns=tuple(group.patterns),
        layer=group.layer,
        converter=group.converter,
    )
    if recipe.is_copy:
        return recipe, None
    try:
        made = run_recipe(recipe, model, _meta_tensor)
    except Exception as error:  # transformers ops raise ValueError, RuntimeError, KeyError...
        names = ", ".join(info.name for info in group.inputs[:3])
        return None, f"{group.layer}: cannot convert from {names}...: {error}"
    targets = tuple(made)
    shapes = tuple(tuple(t.shape) for t in made.values())
    return Recipe(
        targets, shapes, recipe.inputs, recipe.patterns, recipe.layer, recipe.converter
    ), None


def _meta_tensor(info: TensorInfo) -> torch.Tensor:
    return torch.empty(info.shape, dtype=info.dtype, device="meta")


def run_recipe(recipe: Recipe, model: torch.nn.Module, read: Reader) -> dict[str, torch.Tensor]:
    """Make the recipe's target tensors from inputs that `read` produces one by one."""
    if recipe.is_copy:
        return {recipe.targets[0]: read(recipe.inputs[0])}
    converter = deepcopy(recipe.converter)  # transformers' converters collect inputs in place
    for info, pattern in zip(recipe.inputs, recipe.patterns, strict=True):
        converter.add_tensor(recipe.layer, info.name, pattern, lambda info=info: read(info))
    config = getattr(model, "config", None)
    made = converter.convert(recipe.layer, model=model, config=config)
    return {key: value[0] if isinstance(value, list) else value for key, value in made.items()}


def _tied_covered(model: torch.nn.Module, made: set[str]) -> set[str]:
    """Tied keys that need no tensor of their own: some member of their tie group is loaded."""
    tied: Mapping[str, str] = getattr(model, "all_tied_weights_keys", None) or {}
    members: dict[str, set[str]] = {}
    for target, source in tied.items():
        members.setdefault(source, {source}).add(target)
    return {key for group in members.values() if group & made for key in group}


def _ignorable_removed(
    model: torch.nn.Module, missing: set[str], unexpected: set[str]
) -> tuple[set[str], set[str]]:
    """Drop the keys transformers itself ignores (`_keys_to_ignore_on_load_*`, stale buffers)."""
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is None:
        return missing, unexpected
    info = LoadStateDictInfo(
        missing_keys=set(missing),
        unexpected_keys=set(unexpected),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    adjust(info)
    return info.missing_keys, info.unexpected_keys


def raise_on_mismatch(keys: KeyMap, checkpoint: str) -> None:
    """One KeyMismatch listing every missing, unexpected, mismatched and unconvertible key."""
    if keys.ok:
        return
    lines = [f"the checkpoint {checkpoint} does not match the model:"]
    lines += _section("missing from the checkpoint", keys.missing)
    lines += _section("in the checkpoint but not in the model", keys.unexpected)
    lines += _section(
        "shape mismatch (model vs checkpoint)",
        (f"{k}: model {list(a)} vs checkpoint {list(b)}" for k, a, b in keys.mismatched),
    )
    lines += _section("cannot be converted", keys.failed)
    lines.append(
        "Fix: load the checkpoint that belongs to this config (re-download incomplete shards),"
        " or fix config.json so its sizes match the checkpoint."
    )
    raise KeyMismatch("\n".join(lines))


def _section(title: str, items: Iterable[str]) -> list[str]:
    items = list(items)
    return [f"  {title} ({len(items)}):", *(f"    {item}" for item in items)] if items else []


# --- the converted cache file ---------------------------------------------------------
