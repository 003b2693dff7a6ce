"""Routed experts kept as the checkpoint's own per-expert tensors: no fused copy.

transformers 5 fuses a checkpoint's per-expert tensors (`experts.3.gate_proj.weight`, ...)
into 3-D parameters at load (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`), which for
experts on disk means a converted copy of every expert. For experts stored on cpu or disk
and computed by the CPU, the loader instead keeps each expert's tensors as they are in the
file (memory-mapped, copy-on-write) and hands them to run/experts.py, which computes only
the experts the router picked, straight from those pages.

Which checkpoint tensor is which piece of which expert comes from the conversion itself:
the converter's source patterns give the pieces in concatenation order and the expert
index; the guess is then checked by running transformers' own conversion on small tensors
of the same layout and comparing. Anything that does not check out keeps the fused path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..model.checkpoint import TensorInfo
from .convert import Recipe, run_recipe

Pieces = list[tuple[TensorInfo, ...]]  # per expert: the tensors of one fused target, in order


def expert_pieces(recipe: Recipe, shape: Sequence[int], model: torch.nn.Module) -> Pieces | None:
    """Per expert, the checkpoint tensors whose concatenation (dim 0) is `recipe`'s fused
    target of shape [E, out, in] (or [E, out] for biases); None if that is not how the
    conversion builds it."""
    if recipe.is_copy or len(recipe.targets) != 1 or not shape:
        return None
    patterns = list(dict.fromkeys(getattr(recipe.converter, "source_patterns", ())))
    by_pattern: dict[str, dict[int, TensorInfo]] = {p: {} for p in patterns}
    for info, pattern in zip(recipe.inputs, recipe.patterns, strict=True):
        index = _expert_index(info.name, pattern)
        if index is None or pattern not in by_pattern or index in by_pattern[pattern]:
            return None
        by_pattern[pattern][index] = info
    experts = shape[0]
    if any(sorted(found) != list(range(experts)) for found in by_pattern.values()):
        return None
    pieces = [tuple(by_pattern[p][e] for p in patterns) for e in range(experts)]
    if not all(_stacks_to(parts, shape[1:]) for parts in pieces):
        return None
    return pieces if _conversion_agrees(recipe, pieces, patterns, model) else None


def _expert_index(name: str, pattern: str) -> int | None:
    """'model.layers.3.mlp.experts.17.up_proj.weight' with '...experts.*.up_proj.weight' -> 17."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)") + "$"
    match = re.search(regex, name)
    return int(match.group(1)) if match and match.groups() else None


def _stacks_to(parts: tuple[TensorInfo, ...], shape: Sequence[int]) -> bool:
    """Concatenating `parts` along dim 0 gives `shape` (one expert of the fused target)."""
    if any(len(p.shape) != len(shape) for p in parts):
        return False
    rows = sum(p.shape[0] for p in parts)
    return rows == shape[0] and all(tuple(p.shape[1:]) == tuple(shape[1:]) for p in parts)


def _conversion_agrees(
    recipe: Recipe, pieces: Pieces, patterns: list[str], model: torch.nn.Module
) -> bool:
    """transformers' conversion, run on small stand-ins of the inputs (each piece k of expert
    e a tensor of 1 + k rows, 2 columns, every value unique), equals their concatenation."""
    fakes: dict[str, torch.Tensor] = {}
    stacked = []
    count = 0
    for parts in pieces:
        made = []
        for k, info in enumerate(parts):
            shape = (1 + k, 2)[: len(info.shape)] if len(info.shape) <= 2 else None
            if shape is None:
                return False
            numel = int(torch.tensor(shape).prod())
            fake = torch.arange(count, count + numel, dtype=torch.float32).view(shape)
            count += numel
            fakes[info.name] = fake
            made.append(fake)
        stacked.append(torch.cat(made))
    try:
        out = run_recipe(recipe, model, lambda info: fakes[info.name])
    except Exception:  # the conversion needs real sizes (or cannot run): keep it fused
        return False
    result = out.get(recipe.targets[0])
    return isinstance(result, torch.Tensor) and torch.equal(result, torch.stack(stacked))


def leaf(target: str) -> str:
    """'model.layers.3.mlp.experts.gate_up_proj' -> 'gate_up_proj'."""
    return target.rsplit(".", 1)[-1]


def experts_recipes(
    recipes: Sequence[Recipe], modules: Mapping[str, Any]
) -> dict[str, list[Recipe]]:
    """The recipes making each experts module's parameters (module name -> recipes)."""
    found: dict[str, list[Recipe]] = {}
    for recipe in recipes:
        owners = {target.rsplit(".", 1)[0] for target in recipe.targets}
        if len(owners) == 1 and (owner := owners.pop()) in modules:
            found.setdefault(owner, []).append(recipe)
    return found
