"""Tensors no checkpoint holds, computed as `from_pretrained` computes them.

Non-persistent buffers (rotary inv_freq, masks, Falcon-H1's mup_vector) and weights a
model regenerates at load (Marian's sinusoidal positions, declared in
`_keys_to_ignore_on_load_missing`) get their values from transformers' own
`initialize_weights`: every module's `_init_weights`, each sub-model's own, children
first, so a tensor filled by an ancestor's initialiser is filled too.

`initialize(model, names)` runs it so that only the tensors `names` can be written:
every other parameter and buffer is marked initialised for the duration (transformers'
init functions skip those) and, unless it is on meta already (where any write does
nothing), swapped for an empty meta tensor, then put back. Loaded weights, which may be
read-only maps of the checkpoint, are never touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_FLAG = "_is_hf_initialized"  # transformers' marker of tensors and modules already filled


def initialize(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Fill the (real, allocated) tensors `names` of `model` with transformers' initialisers."""
    wanted = set(names)
    if not wanted:
        return
    with _only_writable(model, wanted), torch.no_grad():
        _run_initializers(model)


def _run_initializers(model: torch.nn.Module) -> None:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        try:
            model.initialize_weights()
            return
        except Exception:  # an initialiser that needs real weights: each owner on its own
            _clear_flags(model)
    for owner, module in with_owner(model, PreTrainedModel):
        if owner is not None:
            owner._init_weights(module)


def with_owner(
    module: torch.nn.Module, owner_type: type, owner: Any = None
) -> Iterator[tuple[Any, torch.nn.Module]]:
    """Every module with the nearest enclosing `owner_type` module (itself included),
    children before their parent (transformers' order)."""
    owner = module if isinstance(module, owner_type) else owner
    for child in module.children():
        yield from with_owner(child, owner_type, owner)
    yield owner, module


@contextmanager
def _only_writable(model: torch.nn.Module, wanted: set[str]) -> Iterator[None]:
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    flagged: list[torch.Tensor] = []  # meta tensors: writes do nothing, a flag saves the time
    _clear_flags(model)
    try:
        for prefix, module in model.named_modules(remove_duplicate=False):
            for table in (module._parameters, module._buffers):
                for leaf, tensor in list(table.items()):
                    name = f"{prefix}.{leaf}" if prefix else leaf
                    if tensor is None or name in wanted:
                        continue
                    if tensor.is_meta:
                        setattr(tensor, _FLAG, True)
                        flagged.append(tensor)
                        continue
                    placeholder = torch.empty_like(tensor, device="meta")
                    if isinstance(tensor, torch.nn.Parameter):
                        placeholder = torch.nn.Parameter(placeholder, tensor.requires_grad)
                    setattr(placeholder, _FLAG, True)
                    swapped.append((table, leaf, tensor))
                    table[leaf] = placeholder
        yield
    finally:
        for table, leaf, tensor in reversed(swapped):
            table[leaf] = tensor
        for tensor in flagged:
            tensor.__dict__.pop(_FLAG, None)
        _clear_flags(model)


def _clear_flags(model: torch.nn.Module) -> None:
    """Forget which modules transformers marked initialised (a second run must run again)."""
    for module in model.modules():
        module.__dict__.pop(_FLAG, None)


def runtime_buffers(module: torch.nn.Module) -> list[str]:
    """Names of `module`'s own non-persistent buffers."""
    return [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]
