"""Moving the tensors inside a block's (nested) arguments to its device, once per forward.

The hooks dispatch.py attaches call `Mover.move` on every block from the first device
change on; a tensor already in place costs one device comparison, and one moved for an
earlier block is found in a per-forward memo.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch


def _copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # to a GPU: asynchronous on the current stream; to the CPU: the data is needed now
    return tensor.to(device, non_blocking=device.type == "cuda")


_Table = dict[int, Any]  # id(source tensor) -> (weakref to it, its version, moved copy)


def _forget(table: _Table, key: int, ref: weakref.ref[torch.Tensor]) -> None:
    entry = table.get(key)
    if entry is not None and entry[0] is ref:
        del table[key]  # the source tensor died: drop its moved copy with it


_TENSOR, _LEAF, _SEQ, _NAMED, _DICT, _OUTPUT, _DATACLASS = range(7)
_KINDS: dict[type, int] = {t: _LEAF for t in (type(None), bool, int, float, str, torch.dtype)}


def _kind(cls: type) -> int:
    """How the mover treats values of `cls`; worked out once per type (hooks are hot)."""
    kind = _KINDS.get(cls)
    if kind is None:
        if issubclass(cls, torch.Tensor):
            kind = _TENSOR
        elif issubclass(cls, tuple) and hasattr(cls, "_fields"):
            kind = _NAMED
        elif issubclass(cls, (tuple, list)):
            kind = _SEQ
        elif issubclass(cls, dict):
            kind = _OUTPUT if dataclasses.is_dataclass(cls) else _DICT  # ModelOutput: both
        elif dataclasses.is_dataclass(cls):
            kind = _DATACLASS
        else:
            kind = _LEAF  # Cache objects and anything else: passed through untouched
        _KINDS[cls] = kind
    return kind


class Mover:
    """Moves the tensors inside nested arguments to a device, each source once per forward.

    Descends into tuples (named too), lists, dicts and dataclasses (ModelOutput
    included); anything else (transformers Cache objects, numbers, strings) is passed
    through as is. Returns the very same object when nothing had to move. The memo
    holds a moved copy only while its source lives and is unmodified (version counter).
    """

    def __init__(self, copy: Callable[[torch.Tensor, torch.device], torch.Tensor] = _copy):
        self._copy = copy
        self._memo: dict[torch.device, _Table] = {}

    def reset(self) -> None:
        self._memo.clear()

    def move(self, obj: Any, device: torch.device) -> Any:
        table = self._memo.get(device)
        if table is None:
            table = self._memo[device] = {}
        return self._move(obj, device, table)

    def _move(self, obj: Any, device: torch.device, table: _Table) -> Any:
        kind = _KINDS.get(type(obj))
        if kind is None:
            kind = _kind(type(obj))
        if kind == _TENSOR:
            return obj if obj.device == device else self._tensor(obj, device, table)
        if kind == _LEAF:
            return obj
        if kind in (_SEQ, _NAMED):
            return self._sequence(obj, device, table, named=kind == _NAMED)
        if kind in (_DICT, _OUTPUT):
            return self._mapping(obj, device, table, output=kind == _OUTPUT)
        return self._dataclass(obj, device, table)

    def _sequence(self, obj: Any, device: torch.device, table: _Table, *, named: bool) -> Any:
        items: list[Any] | None = None  # built only once something moved
        for i, item in enumerate(obj):
            new = self._move(item, device, table)
            if new is not item:
                items = list(obj) if items is None else items
                items[i] = new
        if items is None:
            return obj
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if named else type(obj)(items)

    def _mapping(self, obj: Any, device: torch.device, table: _Table, *, output: bool) -> Any:
        changed: dict[Any, Any] | None = None
        for key, value in obj.items():
            new = self._move(value, device, table)
            if new is not value:
                changed = {} if changed is None else changed
                changed[key] = new
        if changed is None:
            return obj
        moved = {**obj, **changed}
        return type(obj)(**moved) if output else type(obj)(moved)

    def _dataclass(self, obj: Any, device: torch.device, table: _Table) -> Any:
        changes = {}
        for f in dataclasses.fields(obj):
            if f.init:
                value = getattr(obj, f.name)
                new = self._move(value, device, table)
                if new is not value:
                    changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj

    def _tensor(self, tensor: torch.Tensor, device: torch.device, table: _Table) -> Any:
        key = id(tensor)
        hit = table.get(key)
        if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
            return hit[2]
        moved = self._copy(tensor, device)
        ref = weakref.ref(tensor, functools.partial(_forget, table, key))
        table[key] = (ref, tensor._version, moved)
        return moved


def first_device(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.device | None:
    """The device of the first top-level tensor argument: where outputs go back to."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None
